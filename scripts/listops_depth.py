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
  """An LRA ListOps string -> a tree: a digit (int) or (operator, [args]).
  ValueError if it is not one expression of operators, digits and ``]``
  (every operator closed, with at least one argument)."""
  stack = [("", [])]
  for token in source.split():
    if token in ("(", ")"):
      continue
    if token in _APPLY:
      stack.append((token, []))
    elif token == listops.END_TOKEN:
      if len(stack) == 1 or not stack[-1][1]:
        raise ValueError(f"Not one ListOps expression (a ']' closes no "
                         f"operator with arguments): {source[:80]!r}")
      node = stack.pop()
      stack[-1][1].append(node)
    elif token in listops.DIGITS:
      stack[-1][1].append(int(token))
    else:
      raise ValueError(f"Not a ListOps token: {token[:20]!r} in "
                       f"{source[:80]!r}")
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
  """Trees and labels of a split, read by the training job's reader;
  ValueError naming the file and example if one is not an expression, or
  if the split has none."""
  path = os.path.join(folder, listops.split_filename(split))
  seqs, labels = listops.read_split(path)
  seqs, labels = seqs[:limit], labels[:limit]
  if not seqs:
    raise ValueError(f"{path}: no examples.")
  trees = []
  for i, ids in enumerate(seqs):
    try:
      trees.append(parse(listops.decode(ids)))
    except ValueError as e:
      raise ValueError(f"{path}: example {i + 1}: {e}") from None
  return trees, labels


def _operators(tree) -> set:
  """The operators in a tree."""
  if isinstance(tree, int):
    return set()
  return {tree[0]}.union(*(_operators(a) for a in tree[1]))


def depth_accuracies(folder: str, max_depth: int = 6, train: int = 20000,
                     splits=("val", "test")) -> dict:
  """{split: [accuracy at depth 0..max_depth]} plus the guesses and the
  majority class's share of the training labels read. ValueError for
  max_depth < 0, train < 1, an operator of a split that the first
  ``train`` training expressions lack (it has no guess), or data that is
  not ListOps expressions."""
  if max_depth < 0:
    raise ValueError(f"--max_depth must be >= 0, got {max_depth}.")
  if train < 1:
    raise ValueError(f"--train must be >= 1 (the training expressions that "
                     f"set the guesses), got {train}.")
  train_trees, train_labels = _read(folder, "train", train)
  guess = most_frequent_values(train_trees)
  out = {"guess": guess, "majority_class": round(float(
      np.bincount(train_labels).max() / len(train_labels)), 4)}
  for split in splits:
    trees, labels = _read(folder, split)
    unguessed = sorted(set().union(*map(_operators, trees)) - set(guess))
    if unguessed:
      raise ValueError(
          f"The {split} split has operators {unguessed} that the first "
          f"{train} training expressions lack, so they have no most "
          f"frequent value: raise --train.")
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
  if len(argv) != 2 or not argv[1]:
    raise app.UsageError("Usage: listops_depth.py DATA_DIR [flags]")
  try:
    folder = listops.find_data_dir(argv[1], None)
    r = depth_accuracies(folder, FLAGS.max_depth, FLAGS.train)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"Error: {e}") from None
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
