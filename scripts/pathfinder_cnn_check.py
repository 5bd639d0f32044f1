r"""Is a Pathfinder dataset learnable? A small CNN answers in minutes.

Convolutional networks solve Pathfinder-32 well where Transformers sit at
chance for many epochs, so when a sequence model stays at 50% this tells
the data apart from the optimisation: a CNN well above 50% on the same
split means the images carry their labels in a learnable form.

  python scripts/pathfinder_cnn_check.py --data_dir=DIR [--resolution=32] \
      [--seconds=300] [--batch_size=64]

DIR is a Pathfinder folder in the LRA layout (what
``python -m htransformer.data.pathfinder`` writes, or the release's
``pathfinder32/curv_contour_length_14``). Trains on the training split
(80%, split seed 0 as the training job) for ``--seconds`` and prints the
validation accuracy after each epoch, then the test accuracy.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from htransformer.data import pathfinder  # noqa: E402


class SmallCNN(nnx.Module):
  """Three stages of two 3x3 convolutions and a 2x2 max-pool, then an MLP."""

  def __init__(self, resolution: int, rngs: nnx.Rngs):
    widths = [(1, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    self.convs = nnx.List([nnx.Conv(i, o, (3, 3), rngs=rngs)
                           for i, o in widths])
    flat = (resolution // 8) ** 2 * 128
    self.fc = nnx.Linear(flat, 128, rngs=rngs)
    self.head = nnx.Linear(128, 2, rngs=rngs)

  def __call__(self, x):
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i % 2 == 1:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
    return self.head(x)


def images(source, indices, resolution):
  batch = source.get_batch(np.asarray(indices))
  x = (batch["inputs"] - pathfinder.PIXEL_OFFSET).astype(np.float32) / 255.0
  return x.reshape(-1, resolution, resolution, 1), batch["targets"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=300)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  folder = pathfinder.find_data_dir(args.data_dir, None, args.resolution)
  sources = pathfinder.load_sources(folder, args.resolution)
  print({k: len(v) for k, v in sources.items()}, flush=True)
  model = SmallCNN(args.resolution, nnx.Rngs(args.seed))
  opt = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  @nnx.jit
  def predict(model, x):
    return jnp.argmax(model(x), axis=-1)

  def accuracy(split):
    source, correct = sources[split], 0
    for start in range(0, len(source), 500):
      idx = np.arange(start, min(start + 500, len(source)))
      x, y = images(source, idx, args.resolution)
      correct += int(np.sum(np.asarray(predict(model, x)) == y))
    return correct / len(source)

  rng = np.random.default_rng(args.seed)
  train = sources["train"]
  start, epoch = time.time(), 0
  while time.time() - start < args.seconds:
    perm = rng.permutation(len(train))
    losses = []
    for b in range(len(train) // args.batch_size):
      x, y = images(train, perm[b * args.batch_size:(b + 1) * args.batch_size],
                    args.resolution)
      losses.append(float(train_step(model, opt, x, y)))
      if time.time() - start > args.seconds:
        break
    epoch += 1
    print(f"epoch {epoch} ({time.time() - start:.0f} s): train loss "
          f"{np.mean(losses):.4f}, val accuracy {accuracy('val'):.4f}",
          flush=True)
  print(f"test accuracy {accuracy('test'):.4f}", flush=True)


if __name__ == "__main__":
  main()
