#!/usr/bin/env python
r"""Does a trained classifier still look at its input? A collapse check.

  python scripts/inspect_classifier.py WORKDIR [--data_dir=DIR] \
      [--split=test] [--num_examples=64]

Reads the run's ``config.json`` and its latest checkpoint, takes the first
``num_examples`` of a split (all of it if it has fewer; ``--data_dir``
replaces the config's, e.g. when the run was made on another machine), and
prints, for the parameters at initialisation and for the checkpoint, one
JSON line each:

  examples          how many examples were read
  head_units_on     units of the head's first layer above zero on at least
                    one example (of head_units); 0 with a ReLU head means
                    no gradient reaches the encoder any more
  max_pre_activation  the largest of those pre-activations
  feature_spread    how much what the head reads (the pooled encoding)
                    differs between examples: the mean over features of
                    the standard deviation across examples
  logit_spread      the same for the logits; ~0 means the model gives
                    every input the same answer
  accuracy          on those examples

A model at chance with ``logit_spread`` near zero has stopped looking at
its input (docs/results.md, "Pathfinder-32 on generator version 3").

For a model with learned position embeddings over a square image without a
CLS token (Pathfinder, Path-X) it also prints how much those embeddings
know the image's grid (:func:`grid_similarity`), initial and trained.
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from htransformer import checkpoint as ckpt_lib  # noqa: E402
from htransformer import config_utils  # noqa: E402
from htransformer import input_pipeline  # noqa: E402
from htransformer import optim  # noqa: E402
from htransformer import tasks  # noqa: E402
from htransformer import train  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("data_dir", None, "Replaces the config's data_dir.")
  flags.DEFINE_string("split", "test", "Which split's examples to read.")
  flags.DEFINE_integer("num_examples", 64, "How many examples.")


def report(model, inputs, targets) -> dict:
  """The statistics above for one model on one batch."""
  features = model.features(jnp.asarray(inputs))
  pre = np.asarray(model.head1(features))
  logits = np.asarray(model.head(features))
  return {
      "examples": int(len(targets)),
      "head_units_on": int((pre > 0).any(axis=0).sum()),
      "head_units": int(pre.shape[1]),
      "max_pre_activation": float(pre.max()),
      "feature_spread": float(np.asarray(features).std(axis=0).mean()),
      "logit_spread": float(logits.std(axis=0).mean()),
      "accuracy": float((logits.argmax(-1) == np.asarray(targets)).mean()),
  }


def grid_similarity(table, side: int) -> dict:
  """Mean cosine similarity (rows centred first) of the position embeddings
  of pixels 1 and 4 apart along a row (``right1``, ``right4``) and along a
  column (``down1``, ``down4``: 32 and 128 tokens apart at 32 px), and of
  pixels at least 8 rows and 8 columns apart (``far``, 50,000 random
  pairs). An embedding that knows the grid has ``down`` close to
  ``right``; the sinusoidal table of the flattened sequence does not."""
  t = np.asarray(table, np.float64)[:side * side]
  t = t - t.mean(axis=0)
  t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
  g = t.reshape(side, side, -1)
  cos = lambda a, b: float((a * b).sum(-1).mean())
  rng = np.random.default_rng(0)
  i, j = rng.integers(0, side * side, (2, 50000))
  far = ((np.abs(i // side - j // side) >= 8)
         & (np.abs(i % side - j % side) >= 8))
  return {"right1": cos(g[:, :-1], g[:, 1:]), "down1": cos(g[:-1], g[1:]),
          "right4": cos(g[:, :-4], g[:, 4:]), "down4": cos(g[:-4], g[4:]),
          "far": cos(t[i[far]], t[j[far]])}


def _image_side(config) -> int | None:
  """The side of a square image the positions index, else None."""
  side = math.isqrt(int(config.max_length))
  square = side * side == int(config.max_length) and side >= 9
  plain = config.model.get("learned_positions") and config.model.pool != "CLS"
  return side if square and plain else None


def inspect(workdir: str, data_dir: str | None = None, split: str = "test",
            num_examples: int = 64) -> dict:
  """{"init": report, "trained": report plus "step"} for a run's workdir;
  both with "positions" (:func:`grid_similarity`) where it applies."""
  if num_examples < 2:
    raise ValueError(f"num_examples must be at least 2 (spreads across "
                     f"examples), got {num_examples}.")
  config = config_utils.read_run_config(workdir)
  if config.get("task") == "lm":  # Said before its data is read.
    raise ValueError("inspect_classifier reads classifiers; "
                     f"{workdir} trained a language model.")
  # Before any data is read (or generated): a workdir with no checkpoint
  # (a dry run's, or a run stopped before its first) has nothing to show.
  if ckpt_lib.latest_step(workdir) is None:
    raise FileNotFoundError(
        f"No checkpoint in {os.path.join(workdir, 'checkpoints')}: "
        f"{workdir} holds no trained parameters to inspect.")
  if data_dir is not None:
    config.data_dir = data_dir
  if "head_activation" not in config.model:  # runs from before the field
    config.model.head_activation = "relu"
  task = tasks.get_task(config, workdir)
  if split not in task.sources:
    raise ValueError(f"split must be one of {sorted(task.sources)}, got "
                     f"{split!r}.")
  # One batch of what the split holds, not num_examples rows of padding.
  num_examples = min(num_examples, len(task.sources[split]))
  if num_examples < 2:
    raise ValueError(f"The {split} split holds {num_examples} example(s); "
                     "the spreads across examples need at least 2.")
  model = train.build_model(config, task, config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
  step, trained = ckpt_lib.restore_params(
      workdir, train.abstract_state(params, tx))
  batch = next(iter(input_pipeline.eval_batches(task.sources[split],
                                                num_examples)))
  keep = np.asarray(batch["weights"]) > 0  # the last batch may be padded
  inputs, targets = batch["inputs"][keep], batch["targets"][keep]
  side = _image_side(config)
  out = {}
  for name, p in (("init", params), ("trained", trained)):
    m = nnx.merge(graphdef, p)
    out[name] = report(m, inputs, targets)
    if side:
      out[name]["positions"] = grid_similarity(m.encoder.positions[...], side)
  out["trained"]["step"] = int(step)
  return out


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: inspect_classifier.py WORKDIR [flags]")
  try:
    result = inspect(argv[1], FLAGS.data_dir, FLAGS.split, FLAGS.num_examples)
  except (FileNotFoundError, ValueError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  for name, r in result.items():
    print(json.dumps({"parameters": name, **r}))
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
