#!/usr/bin/env python
r"""How deep into its tree must a model evaluate a ListOps example?

  python scripts/listops_depth.py DATA_DIR [--max_depth=6] [--train=20000]

DATA_DIR is anything the training job accepts as ``config.data_dir`` (a
folder with ``basic_{train,val,test}.tsv``, or the LRA release above
``listops-1000/``). For k = 0, 1, ..., it prints the accuracy, on
validation and test, of evaluating each expression exactly down to depth k
and answering every operator below that depth with the value most
frequent for that operator (counted over the subtrees of the first
``--train`` training expressions). Depth 0 reads the outermost operator
only (MAX: 9, MIN: 0, ...); depth 1 also applies it to its direct
arguments; and so on. A model's accuracy placed on this scale says how
much of the tree it has learned to compute. The last line is the result as
JSON.
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from htransformer.data import listops  # noqa: E402

FLAGS = flags.FLAGS
_APPLY = dict(zip(listops.OPERATORS, listops._APPLY))  # pylint: disable=protected-access


def _define_flags():
  """Defined when run as a script only (the tests import the module)."""
  flags.DEFINE_integer("max_depth", 6, "Evaluate to depths 0..max_depth.")
  flags.DEFINE_integer("train", 20000,
                       "Training expressions that set each operator's most "
                       "frequent value.")


def parse(source: str):
  """An LRA ListOps string -> a tree: a digit (int) or (operator, [args])."""
  stack = [("", [])]
  for token in source.split():
    if token in ("(", ")"):
      continue
    if token in _APPLY:
      stack.append((token, []))
    elif token == listops.END_TOKEN:
      node = stack.pop()
      stack[-1][1].append(node)
    else:
      stack[-1][1].append(int(token))
  if len(stack) != 1 or len(stack[0][1]) != 1:
    raise ValueError(f"Not one ListOps expression: {source[:80]!r}")
  return stack[0][1][0]


def evaluate(tree, depth=None, guess=None):
  """The value of ``tree``; below ``depth`` operators (None: no limit), an
  operator node is answered by ``guess[operator]``."""
  if isinstance(tree, int):
    return tree
  op, args = tree
  if depth is not None and depth <= 0:
    return guess[op]
  deeper = None if depth is None else depth - 1
  return _APPLY[op]([evaluate(a, deeper, guess) for a in args])


def most_frequent_values(trees) -> dict:
  """Each operator's most frequent value over all subtrees of ``trees``."""
  counts = collections.defaultdict(collections.Counter)

  def visit(tree):
    if isinstance(tree, int):
      return tree
    op, args = tree
    value = _APPLY[op]([visit(a) for a in args])
    counts[op][value] += 1
    return value

  for tree in trees:
    visit(tree)
  return {op: c.most_common(1)[0][0] for op, c in counts.items()}


def _read(folder, split, limit=None):
  """Trees and labels of a split, read by the training job's reader."""
  seqs, labels = listops.read_split(
      os.path.join(folder, listops.split_filename(split)))
  seqs, labels = seqs[:limit], labels[:limit]
  return [parse(listops.decode(ids)) for ids in seqs], labels


def depth_accuracies(folder: str, max_depth: int = 6, train: int = 20000,
                     splits=("val", "test")) -> dict:
  """{split: [accuracy at depth 0..max_depth]} plus the guesses and the
  majority class's share of the training labels read."""
  train_trees, train_labels = _read(folder, "train", train)
  guess = most_frequent_values(train_trees)
  out = {"guess": guess, "majority_class": round(float(
      np.bincount(train_labels).max() / len(train_labels)), 4)}
  for split in splits:
    trees, labels = _read(folder, split)
    out[split] = [round(float(np.mean(
        [evaluate(t, k, guess) == y for t, y in zip(trees, labels)])), 4)
                  for k in range(max_depth + 1)]
    depths = [operator_depth(t) for t in trees]
    out[f"{split}_operator_depth"] = [min(depths), max(depths)]
  return out


def operator_depth(tree) -> int:
  """Operators on the longest path from the root (a digit: 0)."""
  if isinstance(tree, int):
    return 0
  return 1 + max(operator_depth(a) for a in tree[1])


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Usage: listops_depth.py DATA_DIR [flags]")
  try:
    folder = listops.find_data_dir(argv[1], None)
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None
  r = depth_accuracies(folder, FLAGS.max_depth, FLAGS.train)
  print(f"{folder}: most frequent value per operator {r['guess']}; "
        f"majority class {r['majority_class']}")
  print(f"operators nested per expression (min, max): val "
        f"{r['val_operator_depth']}, test {r['test_operator_depth']}")
  print("depth | " + " | ".join(f"{s} acc." for s in ("val", "test")))
  for k in range(FLAGS.max_depth + 1):
    print(f"{k} | {r['val'][k]:.4f} | {r['test'][k]:.4f}")
  print(json.dumps(r))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
