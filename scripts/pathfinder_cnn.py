#!/usr/bin/env python
r"""Is a Pathfinder folder's label learnable from its pixels? A CNN says.

  python scripts/pathfinder_cnn.py DATA_DIR [--resolution=32] \
      [--contour_length=14] [--epochs=20] [--batch_size=256] \
      [--learning_rate=1e-3] [--width=32] [--depth=8] [--seed=0] \
      [--marker_contrast=100]

Trains a small convolutional network (``depth`` 3x3 convolutions with
ReLU, every second one of stride 2, ``width`` channels doubling at each
stride; global mean pooling; a linear head; Adam, warm-up over a tenth of
the steps (at most 1,000), then a cosine decay) on the
same 80/10/10 split the training job reads (``pathfinder.load_sources``)
and prints one JSON line per epoch (training loss and accuracy, validation
accuracy) and the test accuracy of the final parameters. DATA_DIR is
anything the training job accepts as ``config.data_dir``.

``--marker_contrast=V`` (1-254) first redraws every image: the pixels of
its markers (lit pixels that survive a 3x3 erosion, which a snake is too
thin to, grown back by one pixel within the lit ones) at 255 and every
other lit pixel at V. The same images with markers that stand out
from the snakes: if the network learns those and not the originals,
finding the markers is what it fails at.

What it is for: when the attention models sit at 50%, a network with the
right bias for the task (local, translation-invariant filters) says
whether the images carry their label at all, i.e. whether the data or the
models are to blame. It needs a GPU for real-sized data (200k images: a
few seconds per epoch on one H200).
"""

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from htransformer.data import pathfinder  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_integer("resolution", 32, "Image size (32 or 128).")
  flags.DEFINE_integer("contour_length", 14, "Which curv_contour_length_<C>.")
  flags.DEFINE_integer("epochs", 20, "Passes over the training split.")
  flags.DEFINE_integer("batch_size", 256, "Images per step.")
  flags.DEFINE_float("learning_rate", 1e-3, "Peak Adam learning rate.")
  flags.DEFINE_integer("width", 32, "Channels of the first convolutions.")
  flags.DEFINE_integer("depth", 8, "Convolutions.")
  flags.DEFINE_integer("seed", 0, "Initialisation and shuffling seed.")
  flags.DEFINE_integer("marker_contrast", 0, "If set (1-254): markers "
                       "redrawn at 255, other lit pixels at this value.")


def check_settings(*, epochs: int, batch_size: int, learning_rate: float,
                   width: int, depth: int, seed: int,
                   marker_contrast: int = 0) -> None:
  """ValueError naming the first flag the training cannot use: settled
  before any image is read."""
  for name, value in (("epochs", epochs), ("batch_size", batch_size),
                      ("width", width), ("depth", depth)):
    if value < 1:
      raise ValueError(f"--{name} must be >= 1, got {value}.")
  if not learning_rate > 0:
    raise ValueError(f"--learning_rate must be > 0, got {learning_rate}.")
  if seed < 0:
    raise ValueError(f"--seed must be >= 0, got {seed}.")
  if marker_contrast and not 0 < marker_contrast < 255:
    raise ValueError(f"--marker_contrast must be in 1..254, got "
                     f"{marker_contrast}.")


class ConvNet(nnx.Module):
  """3x3 convolutions + ReLU (stride 2 at every second one), mean pool,
  linear head: [B, R, R] pixels in [0, 1] -> [B, 2] logits."""

  def __init__(self, *, width: int, depth: int, rngs: nnx.Rngs):
    self.convs = nnx.List()
    channels = 1
    for i in range(depth):
      stride = 2 if i % 2 == 1 else 1
      out = width * 2 ** (i // 2)
      self.convs.append(nnx.Conv(channels, out, kernel_size=(3, 3),
                                 strides=(stride, stride), rngs=rngs))
      channels = out
    self.head = nnx.Linear(channels, 2, rngs=rngs)

  def __call__(self, images):
    x = images[..., None]
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.head(x.mean(axis=(1, 2)))


def split_arrays(folder: str, resolution: int):
  """{'train', 'val', 'test'} -> (uint8 pixels [N, R, R], int32 labels)."""
  out = {}
  for split, src in pathfinder.load_sources(folder, resolution).items():
    batch = src.get_batch(np.arange(len(src)))
    pixels = batch["inputs"] - pathfinder.PIXEL_OFFSET
    out[split] = (pixels.reshape(-1, resolution, resolution).astype(np.uint8),
                  np.asarray(batch["targets"], np.int32))
  return out


def emphasise_markers(pixels: np.ndarray, value: int) -> np.ndarray:
  """uint8 [N, R, R]: markers (``pathfinder.marker_cores``, grown back by
  one pixel within the lit ones) at 255, other lit pixels at ``value``,
  the rest 0."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  out = np.zeros_like(pixels)
  for i, image in enumerate(pixels):
    lit, cores = pathfinder.marker_cores(image)
    markers = ndimage.binary_dilation(cores, pathfinder.EIGHT_CONNECTED) & lit
    out[i] = np.where(markers, 255, np.where(lit, value, 0))
  return out


def train(data, *, epochs: int, batch_size: int, learning_rate: float,
          width: int, depth: int, seed: int, log=print) -> dict:
  """Trains on data['train'], evaluates data['val'] every epoch and
  data['test'] at the end; returns the last line's numbers."""
  x_train, y_train = data["train"]
  steps_per_epoch = len(y_train) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{len(y_train)} training images are fewer than one "
                     f"batch of {batch_size}.")
  model = ConvNet(width=width, depth=depth, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  total = epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, min(1000, total // 10), total)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  def logits_of(params, pixels):
    return nnx.merge(graphdef, params)(pixels.astype(jnp.float32) / 255.0)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, pixels, labels):
    def loss_fn(params):
      logits = logits_of(params, pixels)
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      return loss, (logits.argmax(-1) == labels).mean()
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  @jax.jit
  def correct(params, pixels, labels):
    return (logits_of(params, pixels).argmax(-1) == labels).sum()

  def accuracy(params, split):
    x, y = data[split]
    hits = sum(int(correct(params, x[i:i + 1000], y[i:i + 1000]))
               for i in range(0, len(y), 1000))
    return hits / len(y)

  rng = np.random.default_rng(seed)
  line = {}
  for epoch in range(1, epochs + 1):
    start = time.time()
    order = rng.permutation(len(y_train))
    losses, accs = [], []
    for s in range(steps_per_epoch):
      idx = order[s * batch_size:(s + 1) * batch_size]
      params, opt_state, loss, acc = step(params, opt_state, x_train[idx],
                                          y_train[idx])
      losses.append(loss)
      accs.append(acc)
    line = {"epoch": epoch, "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accs)),
            "val_accuracy": accuracy(params, "val"),
            "seconds": round(time.time() - start, 1)}
    if epoch == epochs:
      line["test_accuracy"] = accuracy(params, "test")
    log(json.dumps(line))
  return line


def main(argv):
  if len(argv) != 2 or not argv[1]:
    raise app.UsageError("usage: pathfinder_cnn.py DATA_DIR [--flags]")
  try:
    check_settings(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                   learning_rate=FLAGS.learning_rate, width=FLAGS.width,
                   depth=FLAGS.depth, seed=FLAGS.seed,
                   marker_contrast=FLAGS.marker_contrast)
    folder = pathfinder.find_data_dir(argv[1], None, FLAGS.resolution,
                                      contour_length=FLAGS.contour_length)
    data = split_arrays(folder, FLAGS.resolution)
  except FileNotFoundError as e:
    raise SystemExit(pathfinder.folder_error(e, argv[1])) from None
  except ValueError as e:
    raise SystemExit(f"Error: {e}") from None
  if FLAGS.marker_contrast:
    data = {split: (emphasise_markers(x, FLAGS.marker_contrast), y)
            for split, (x, y) in data.items()}
  print(json.dumps({"folder": folder, "device": jax.devices()[0].device_kind,
                    "marker_contrast": FLAGS.marker_contrast,
                    **{k: len(v[1]) for k, v in data.items()}}), flush=True)
  try:
    train(data, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
          learning_rate=FLAGS.learning_rate, width=FLAGS.width,
          depth=FLAGS.depth, seed=FLAGS.seed,
          log=lambda s: print(s, flush=True))
  except ValueError as e:  # Too few images for one batch.
    raise SystemExit(f"Error: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
