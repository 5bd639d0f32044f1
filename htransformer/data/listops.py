"""ListOps (Long Range Arena): seeded generator, fixed vocabulary and reader.

Generator
---------
Follows the rules of the Long Range Arena's ListOps generator (Tay et al.,
2021; Nangia & Bowman, 2018): operators MIN, MAX, MED (floor of the median) and
SM (sum mod 10) over the digits 0-9; a tree is sampled recursively from depth 1
with max depth 10, a node is a digit with probability 0.75 (always at max
depth) and otherwise an operator with a uniform 2..10 arguments, each sampled
one level deeper. The length of a tree counts operator tokens, digits and one
`]` per operator (not the parentheses). Trees with min_length < length <
max_length are kept, strings are distinct across all splits.

Unlike the original (unseeded, set-ordered) generator, the output is a pure
function of (seed, sizes, length bounds): trials are grouped into fixed chunks
of `_CHUNK_TRIALS` trees; chunk c draws from a `random.Random` seeded by
`np.random.SeedSequence(seed).spawn(...)[c]` (i.e. spawn_key=(c,)); chunks are
generated in worker processes but consumed in chunk order, deduplicated in
that order, and the first num_train / num_val / num_test distinct examples
form train / val / test. The number of workers therefore does not change the
data.

The string form is the LRA one: for an operator node (OP, [a1 .. an]) the
original `to_string` folded left over binary tuples
((((OP, a1), a2) ... an), ']'), each tuple written as `( x y )`, e.g.
`( ( ( [MAX 2 ) 9 ) ] )` for [MAX 2 9 ].

Files: `basic_{train,val,test}.tsv` with the header `Source<TAB>Target`, one
`<string><TAB><label>` line per example (the official `lra_release` layout,
under `listops-1000/`).

Vocabulary
----------
Fixed and sorted (the original built it from a Python set, so ids differed
between processes): 0 = <pad>, 1 = <unk>, then the 15 symbols in sorted
order. Parentheses are dropped by `encode`.

CLI:
  python -m htransformer.data.listops --output_dir=DIR --num_train=96000 \
      --num_val=2000 --num_test=2000 --seed=0 [--min_length=500 \
      --max_length=2000] [--workers=K]
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import random
import time
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from htransformer import data as data_lib
from htransformer.data import byte_source
from htransformer.data import cache

# ----------------------------------------------------------------------------
# Vocabulary.
# ----------------------------------------------------------------------------

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END_TOKEN = "]"
DIGITS = tuple(str(d) for d in range(10))
# The 15 symbols, sorted (a fixed literal order: never derived from a set).
SYMBOLS = tuple(sorted(DIGITS + OPERATORS + (END_TOKEN,)))
VOCAB = (PAD_TOKEN, UNK_TOKEN) + SYMBOLS
VOCAB_SIZE = len(VOCAB)  # 17
NUM_CLASSES = 10

_PARENS = ("(", ")")
_DROP = -1


class _TokenIds(dict):
  """token -> id; parentheses -> _DROP; anything else (incl. '<pad>') -> unk."""

  def __missing__(self, key):
    return UNK_ID


_TOKEN_TO_ID = _TokenIds({tok: i for i, tok in enumerate(SYMBOLS, start=2)})
for _p in _PARENS:
  _TOKEN_TO_ID[_p] = _DROP
del _p


def _encode_slow(source: str) -> np.ndarray:
  tokens = source.split()
  ids = np.fromiter(map(_TOKEN_TO_ID.__getitem__, tokens), dtype=np.int32,
                    count=len(tokens))
  return ids[ids != _DROP]


# Fast path for the usual form (ASCII, tokens separated by single spaces): the
# operators are replaced by one (lowercase, otherwise absent) byte each, so
# every token is one byte, and bytes.translate maps the bytes to ids (and
# deletes the parentheses). Anything else falls back to the exact
# str.split() path; both give the same ids.
_FAST_ALLOWED = b"0123456789()[] MAXEDINS"
_FAST_BYTE = {"[MAX": "a", "[MED": "b", "[MIN": "c", "[SM": "d"}
_FAST_REPLACE = tuple((op.encode(), c.encode()) for op, c in _FAST_BYTE.items())
_FAST_INVALID = 255
_FAST_TABLE = bytearray([_FAST_INVALID]) * 256  # byte -> id (parens deleted)
for _tok, _id in _TOKEN_TO_ID.items():
  if _id != _DROP:
    _FAST_TABLE[ord(_FAST_BYTE.get(_tok, _tok))] = _id
_FAST_TABLE = bytes(_FAST_TABLE)
del _tok, _id


def _encode_bytes(source: bytes) -> np.ndarray:
  """encode() of ASCII/UTF-8 bytes as a (possibly read-only) uint8 array."""
  if not source.translate(None, _FAST_ALLOWED):
    t = source
    for old, new in _FAST_REPLACE:
      t = t.replace(old, new)
    spaces = t[1::2]
    tokens = t[::2]
    # One-byte tokens at even positions, single spaces at odd positions.
    if (len(t) % 2 == 1 and spaces == b" " * len(spaces)
        and b" " not in tokens):
      ids = tokens.translate(_FAST_TABLE, b"()")
      if _FAST_INVALID not in ids:
        return np.frombuffer(ids, dtype=np.uint8)
  return _encode_slow(source.decode("utf-8", "replace")).astype(np.uint8)


def encode(source: str) -> np.ndarray:
  """Whitespace-splits `source`, drops `(` / `)` and maps tokens to ids.

  Unknown tokens (including a literal '<pad>' / '<unk>') map to UNK_ID.
  Returns an int32 array (no padding).
  """
  if source.isascii():
    return _encode_bytes(source.encode("ascii")).astype(np.int32)
  return _encode_slow(source)


def decode(ids: Sequence[int]) -> str:
  """Ids back to space-separated tokens (no parentheses), pads skipped."""
  return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD_ID)


# ----------------------------------------------------------------------------
# Generator.
# ----------------------------------------------------------------------------

MAX_DEPTH = 10
MAX_ARGS = 10
OPERATOR_PROB = 0.25  # a node is a digit with probability 0.75
SPLITS = ("train", "val", "test")
METADATA_FILE = "listops_generation.json"
# Trees sampled per chunk. Part of the definition of the dataset for a seed:
# changing it changes the generated data.
_CHUNK_TRIALS = 16384
GENERATOR_VERSION = 1


def split_filename(split: str) -> str:
  return f"basic_{split}.tsv"


# _OPEN_PREFIX[k * 4 + op] = "( " * (k + 1) + OPERATORS[op]: the opening of an
# operator node with k arguments (k + 1 binary groups).
_OPEN_PREFIX = tuple("( " * (k + 1) + op for k in range(MAX_ARGS + 1)
                     for op in OPERATORS)
_DIGIT_CLOSE = tuple(d + " )" for d in DIGITS)  # a digit argument + its ")"


def _median_floor(vals):
  vals = sorted(vals)
  n = len(vals)
  h = n // 2
  if n % 2:
    return vals[h]
  return (vals[h - 1] + vals[h]) // 2


_APPLY = (min, max, _median_floor, lambda vals: sum(vals) % 10)  # as OPERATORS


class _TooLong(Exception):
  pass


def _sample_tree(rand, min_length, max_length, max_depth=MAX_DEPTH,
                 max_args=MAX_ARGS):
  """Samples one tree with `rand` (a random.Random().random).

  Returns (string, label, length) if min_length < length < max_length, else
  None. The recursion is aborted as soon as the length reaches max_length.

  Random draws, in order, per node: if depth < max_depth one uniform decides
  operator (< OPERATOR_PROB) or digit; an operator then draws its argument
  count, its operator and its arguments (depth + 1, left to right); a digit
  draws its value. Digit arguments are handled inline (no recursive call) for
  speed; operator nodes recurse.
  """
  assert max_args <= MAX_ARGS
  out = []
  append = out.append
  length = 0
  nargs_range = max_args - 1  # uniform over 2..max_args
  open_prefix = _OPEN_PREFIX
  digit_close = _DIGIT_CLOSE
  n_ops = len(OPERATORS)
  apply = _APPLY

  def operator_node(depth):
    nonlocal length
    k = 2 + int(rand() * nargs_range)
    op = int(rand() * n_ops)
    length += 2
    if length >= max_length:
      raise _TooLong
    append(open_prefix[k * n_ops + op])
    vals = []
    child = depth + 1
    may_recurse = child < max_depth
    for _ in range(k):
      if may_recurse and rand() < OPERATOR_PROB:
        vals.append(operator_node(child))
        append(")")
      else:
        d = int(rand() * 10)
        length += 1
        if length >= max_length:
          raise _TooLong
        append(digit_close[d])  # "d )"
        vals.append(d)
    append("] )")
    return apply[op](vals)

  if 1 < max_depth and rand() < OPERATOR_PROB:
    try:
      label = operator_node(1)
    except _TooLong:
      return None
  else:  # a single digit
    label = int(rand() * 10)
    length = 1
    if length >= max_length:
      return None
    append(DIGITS[label])
  if length <= min_length:
    return None
  return " ".join(out), label, length


def _chunk_rng(seed: int, chunk: int) -> random.Random:
  # SeedSequence(seed, spawn_key=(c,)) == SeedSequence(seed).spawn(c + 1)[c].
  ss = np.random.SeedSequence(seed, spawn_key=(chunk,))
  state = ss.generate_state(8, dtype=np.uint32)
  return random.Random(int.from_bytes(state.tobytes(), "little"))


def _generate_chunk(args):
  """Worker: all accepted (string, label, length) of one chunk, in order."""
  seed, chunk, min_length, max_length = args
  rand = _chunk_rng(seed, chunk).random
  accepted = []
  for _ in range(_CHUNK_TRIALS):
    tree = _sample_tree(rand, min_length, max_length)
    if tree is not None:
      accepted.append(tree)
  return accepted


def _default_workers() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


def _iter_chunks(seed, min_length, max_length, workers) -> Iterator[list]:
  """Yields the chunks' results in chunk order (0, 1, 2, ...), forever."""
  if workers <= 1:
    chunk = 0
    while True:
      yield _generate_chunk((seed, chunk, min_length, max_length))
      chunk += 1
  # 'spawn': safe even when the caller has started threads (e.g. JAX). An
  # executor, not a multiprocessing.Pool: closing this generator must stop
  # the chunks still queued, and Pool.terminate() with many tasks in flight
  # can deadlock (seen with 64 workers: the data was never written).
  executor = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=data_lib.ignore_interrupts)
  try:
    pending = collections.deque()
    chunk = 0
    while True:
      while len(pending) < 2 * workers:
        pending.append(executor.submit(
            _generate_chunk, (seed, chunk, min_length, max_length)))
        chunk += 1
      yield pending.popleft().result()
  finally:  # Queued chunks are dropped; running ones (one per worker) end.
    executor.shutdown(wait=True, cancel_futures=True)


def check_settings(num_train, num_val, num_test, min_length, max_length, *,
                   nonempty: bool = False) -> dict:
  """The split sizes {split: n} if the generator can make them; else
  ValueError naming the setting. ``nonempty``: every split needs an example
  (a training run reads all three)."""
  sizes = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
  least = 1 if nonempty else 0
  if any(n < least for n in sizes.values()):
    raise ValueError(f"Split sizes (num_train, num_val, num_test) must be >= "
                     f"{least}, got {sizes}.")
  if min_length < 0 or max_length <= min_length + 1:
    raise ValueError(
        f"Need 0 <= min_length and min_length + 1 < max_length (lengths are "
        f"kept if min_length < length < max_length); got min_length="
        f"{min_length}, max_length={max_length}.")
  return sizes


def generate(output_dir: str, num_train: int, num_val: int, num_test: int,
             seed: int = 0, min_length: int = 500, max_length: int = 2000,
             workers: int | None = None) -> None:
  """Writes basic_{train,val,test}.tsv (+ listops_generation.json) to output_dir.

  Deterministic in (seed, num_*, min_length, max_length); independent of
  `workers` (default: the number of usable CPUs).
  """
  sizes = check_settings(num_train, num_val, num_test, min_length,
                         max_length)
  data_lib.check_output_dir(output_dir)
  workers = _default_workers() if not workers else int(workers)
  total = sum(sizes.values())
  os.makedirs(output_dir, exist_ok=True)
  start = time.time()
  logging.info("Generating ListOps (seed=%d, %s, %d < length < %d) into %s "
               "with %d worker(s).", seed, sizes, min_length, max_length,
               output_dir, workers)

  paths = {s: os.path.join(output_dir, split_filename(s)) for s in SPLITS}
  tmp_paths = {s: p + ".tmp" for s, p in paths.items()}
  files = {s: open(tmp_paths[s], "w", encoding="utf-8", newline="\n")
           for s in SPLITS}
  order = [s for s in SPLITS for _ in range(sizes[s])]
  seen = set()
  written = 0
  n_chunks = 0
  chunks_without_new = 0
  label_counts = np.zeros(NUM_CLASSES, np.int64)
  length_sum = 0
  last_log = start
  try:
    for f in files.values():
      f.write("Source\tTarget\n")
    chunks = _iter_chunks(seed, min_length, max_length, workers)
    try:
      while written < total:
        results = next(chunks)
        n_chunks += 1
        new = 0
        for string, label, length in results:
          if written >= total:
            break
          digest = hashlib.blake2b(string.encode("ascii"),
                                   digest_size=16).digest()
          if digest in seen:
            continue
          seen.add(digest)
          files[order[written]].write(f"{string}\t{label}\n")
          written += 1
          new += 1
          label_counts[label] += 1
          length_sum += length
        chunks_without_new = 0 if new else chunks_without_new + 1
        if chunks_without_new >= 200:
          raise RuntimeError(
              f"ListOps generation made no progress in 200 chunks ({written}/"
              f"{total} distinct examples with {min_length} < length < "
              f"{max_length}); the bounds admit too few distinct trees.")
        now = time.time()
        if now - last_log > 10:
          last_log = now
          logging.info("ListOps: %d/%d examples (%d chunks, %.0f s).",
                       written, total, n_chunks, now - start)
    finally:
      chunks.close()
  except BaseException:
    for f in files.values():
      f.close()
    for p in tmp_paths.values():
      if os.path.exists(p):
        os.remove(p)
    raise
  for f in files.values():
    f.close()
  for s in SPLITS:
    os.replace(tmp_paths[s], paths[s])
  elapsed = time.time() - start
  meta = {
      "generator": "htransformer.data.listops",
      "generator_version": GENERATOR_VERSION,
      "seed": int(seed),
      "num_train": sizes["train"], "num_val": sizes["val"],
      "num_test": sizes["test"],
      "min_length": int(min_length), "max_length": int(max_length),
      "max_depth": MAX_DEPTH, "max_args": MAX_ARGS,
      "chunk_trials": _CHUNK_TRIALS, "chunks": n_chunks,
      "mean_length": length_sum / max(total, 1),
      "label_counts": label_counts.tolist(),
      "seconds": round(elapsed, 2), "workers": workers,
  }
  with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  logging.info("ListOps: wrote %d examples to %s in %.1f s (%d chunks of %d "
               "trials, mean length %.1f).", total, output_dir, elapsed,
               n_chunks, _CHUNK_TRIALS, meta["mean_length"])


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def read_split(path: str) -> tuple[list[np.ndarray], np.ndarray]:
  """Reads one LRA ListOps tsv (header `Source<TAB>Target`).

  Returns (list of int32 token-id arrays without padding, int32 labels); the
  ids are those of `encode`. Tolerates CRLF line endings, a UTF-8 BOM,
  trailing newlines and blank lines. A row has exactly one tab and a label
  of digits ([0-9]+) from 0 to 9; anything else raises ValueError naming
  the file and line.
  """
  seqs, labels = _read_split_u8(path)
  return [s.astype(np.int32) for s in seqs], labels


def _read_split_u8(path: str) -> tuple[list[np.ndarray], np.ndarray]:
  """read_split with uint8 id arrays (4x less memory)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ListOps split file not found: {path}")
  seqs, labels = [], []
  with open(path, "rb") as f:
    header = f.readline().decode("utf-8", "replace").lstrip("\ufeff").strip()
    if [h.strip().lower() for h in header.split("\t")] != ["source", "target"]:
      raise ValueError(f"{path}: expected the header 'Source<TAB>Target', got "
                       f"{header[:80]!r}.")
    lineno = 1
    while True:
      lines = f.readlines(1 << 24)  # blocks of about 16 MB
      if not lines:
        break
      sources = []
      for line in lines:
        lineno += 1
        line = line.rstrip(b"\r\n")
        if not line.strip():
          continue
        source, sep, target = line.partition(b"\t")
        if not sep or b"\t" in target:
          columns = line.count(b"\t") + 1
          raise ValueError(
              f"{path}:{lineno}: expected '<source>\\t<label>' (exactly one "
              f"tab), got {columns} column(s): {_excerpt(line)}")
        target = target.strip(b" ")
        digit = target.lstrip(b"0") or b"0"
        # bytes.isdigit: ASCII digits only (int() would take "+3", "0_3").
        if not target.isdigit() or len(digit) != 1:
          raise ValueError(
              f"{path}:{lineno}: label {_excerpt(target)} is not one of the "
              f"digits 0-{NUM_CLASSES - 1}.")
        sources.append(source.strip())
        labels.append(int(digit))
      seqs.extend(_encode_bytes(x) for x in sources)
  return seqs, np.asarray(labels, dtype=np.int32)


def _excerpt(data: bytes, n: int = 80) -> str:
  return repr(data[:n]) + ("..." if len(data) > n else "")


_SUBDIRS = ("", "listops-1000", os.path.join("lra_release", "listops-1000"))


def _has_splits(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, split_filename(s)))
             for s in SPLITS)


def find_data_dir(data_dir: str | None, cache_dir: str | None, seed: int = 0,
                  num_train: int = 96000, num_val: int = 2000,
                  num_test: int = 2000, min_length: int = 500,
                  max_length: int = 2000, workers: int | None = None) -> str:
  """The folder holding basic_{train,val,test}.tsv.

  With `data_dir`: that folder, or its `listops-1000/` (or
  `lra_release/listops-1000/`) subfolder, as the official release ships it;
  FileNotFoundError if neither holds the three files. Without `data_dir`:
  generates (once) into cache_dir/listops_seed{seed}_{num_train}_{num_val}_
  {num_test}_{min_length}_{max_length}_v{GENERATOR_VERSION} and returns that
  folder (a new generator version builds a new folder, never reuses data
  an older generator wrote).
  """
  expected = ", ".join(split_filename(s) for s in SPLITS)
  if data_dir:
    byte_source.check_data_dir(
        data_dir, "ListOps",
        f"a folder with {expected}, directly or under listops-1000/")
    for sub in _SUBDIRS:
      folder = os.path.join(data_dir, sub) if sub else data_dir
      if _has_splits(folder):
        return folder
    raise FileNotFoundError(
        f"ListOps data_dir {data_dir} lacks the split files: expected {expected} "
        f"in {data_dir} or in its subfolder listops-1000/ (or "
        f"lra_release/listops-1000/). Leave data_dir empty to generate the "
        f"data instead.")

  if not cache_dir:
    raise ValueError("find_data_dir needs a cache_dir when data_dir is empty "
                     "(the generated ListOps data is written there).")
  name = (f"listops_seed{seed}_{num_train}_{num_val}_{num_test}_{min_length}_"
          f"{max_length}_v{GENERATOR_VERSION}")
  final = os.path.join(cache_dir, name)
  if _has_splits(final) and cache.is_complete(final):
    logging.info("Using generated ListOps data in %s.", final)
    return final
  logging.info("No ListOps data_dir given: generating ListOps (seed=%d, "
               "%d/%d/%d, %d < length < %d) into %s.", seed, num_train,
               num_val, num_test, min_length, max_length, final)
  cache.build_once(cache_dir, name, lambda folder: generate(
      folder, num_train, num_val, num_test, seed=seed, min_length=min_length,
      max_length=max_length, workers=workers))
  logging.info("Generated ListOps data is in %s.", final)
  return final


class ListOpsSource:
  """grain RandomAccessDataSource over one ListOps split.

  Item i: {"inputs": int32[max_length] (ids padded with PAD_ID = 0, longer
  sequences truncated as LRA did), "targets": int32 scalar}.
  """

  def __init__(self, path: str, max_length: int = 2000):
    if max_length <= 0:
      raise ValueError(f"max_length must be positive, got {max_length}.")
    seqs, labels = _read_split_u8(path)
    self._path = path
    self._max_length = int(max_length)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64,
                          count=len(seqs))
    self.lengths = lengths  # untruncated lengths
    n_long = int((lengths > max_length).sum())
    if n_long:
      logging.warning("ListOps %s: %d of %d examples are longer than "
                      "max_length=%d and are truncated (longest %d).", path,
                      n_long, len(seqs), max_length, int(lengths.max()))
    kept = np.minimum(lengths, max_length)
    self._offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(kept, out=self._offsets[1:])
    # Compact storage (ids < 256): one flat uint8 array.
    self._tokens = (np.concatenate([s[:max_length] for s in seqs])
                    if seqs else np.zeros(0, np.uint8))
    del seqs
    self.labels = labels
    unknown = np.flatnonzero(self._tokens == UNK_ID)
    if unknown.size:
      # LRA's files hold only the ListOps symbols: quotes, say, come from a
      # copy written by a CSV tool.
      rows = np.unique(np.searchsorted(self._offsets, unknown,
                                       side="right") - 1)
      logging.warning(
          "ListOps %s: %d of %d examples hold tokens outside the ListOps "
          "vocabulary, read as <unk> (the first: example %d). LRA's files "
          "hold none: quotes or other marks in the file?", path, rows.size,
          len(labels), int(rows[0]))

  @property
  def max_length(self) -> int:
    return self._max_length

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index):
    index = byte_source.check_index(index, len(self.labels))
    start, end = self._offsets[index], self._offsets[index + 1]
    inputs = np.zeros(self._max_length, dtype=np.int32)
    inputs[:end - start] = self._tokens[start:end]
    return {"inputs": inputs, "targets": np.int32(self.labels[index])}

  def __repr__(self) -> str:
    return (f"ListOpsSource(path={self._path!r}, max_length="
            f"{self._max_length}, size={len(self)})")


def load_sources(data_dir: str, max_length: int = 2000
                 ) -> dict[str, ListOpsSource]:
  """{'train', 'val', 'test'} -> ListOpsSource for a folder from find_data_dir.

  Raises ValueError if a split file holds no examples (training or
  evaluating on it would fail later, after the other splits were used).
  """
  path = lambda s: os.path.join(data_dir, split_filename(s))
  sources = {s: ListOpsSource(path(s), max_length) for s in SPLITS}
  data_lib.check_nonempty({s: len(v) for s, v in sources.items()},
                          "examples", path)
  return sources


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------


def _define_flags():
  # Defined only when run as a script, so importing this module never adds
  # (possibly clashing) flags to a trainer's flag set.
  from absl import flags
  flags.DEFINE_string("output_dir", None, "Folder for basic_{train,val,test}.tsv.")
  flags.DEFINE_integer("num_train", 96000, "Training examples.")
  flags.DEFINE_integer("num_val", 2000, "Validation examples.")
  flags.DEFINE_integer("num_test", 2000, "Test examples.")
  flags.DEFINE_integer("seed", 0, "Seed: the data is a function of it.")
  flags.DEFINE_integer("min_length", 500, "Keep trees with length > this.")
  flags.DEFINE_integer("max_length", 2000, "Keep trees with length < this.")
  flags.DEFINE_integer("workers", None,
                       "Worker processes (default: usable CPUs). Does not "
                       "change the data.")
  flags.mark_flag_as_required("output_dir")
  return flags.FLAGS


def _main(argv):
  del argv
  f = _FLAGS
  generate(f.output_dir, f.num_train, f.num_val, f.num_test, seed=f.seed,
           min_length=f.min_length, max_length=f.max_length,
           workers=f.workers)


if __name__ == "__main__":
  from absl import app
  _FLAGS = _define_flags()
  app.run(lambda argv: data_lib.run_cli(_main, argv))
