"""Document retrieval (LRA "Retrieval"): ACL Anthology Network pairs, bytes.

Files (the LRA release's ``tsv_data/``): ``new_aan_pairs.{train,eval,test}.tsv``,
no header, one pair per line with 5 tab-separated columns
``label id1 id2 text1 text2`` (the label is ``0``, ``1``, ``0.0`` or
``1.0``, anything else is an error; as in LRA's reader no quoting is
interpreted, and any further tabs belong to text2). Every split must hold a
pair. ``data_dir`` may be the folder holding the files, its
``tsv_data/`` or ``lra_release/tsv_data/`` subfolder. Splits: train = train,
val = eval, test = test.

Tokens: UTF-8 bytes, id = byte + 1, 0 = padding (vocabulary 257, fixed);
each document is truncated to ``max_length`` bytes (4000 in LRA).

An item is ``{"inputs": int32[2, max_length], "targets": int32}``: row 0 is
document 1, row 1 document 2. ``models.DualEncoderClassifier`` encodes both
rows with one (shared) encoder.
"""

from __future__ import annotations

import os

import numpy as np

from htransformer import data as data_lib
from htransformer.data import byte_source

VOCAB_SIZE = byte_source.VOCAB_SIZE
NUM_CLASSES = 2
SPLITS = ("train", "val", "test")
_FILE_SPLIT = {"train": "train", "val": "eval", "test": "test"}
_SUBDIRS = ("", "tsv_data", os.path.join("lra_release", "tsv_data"))
# The label forms of the release's files (written as floats); anything else
# (0.7, inf, nan, 2) is an error, never rounded.
LABELS = {b"0": 0, b"1": 1, b"0.0": 0, b"1.0": 1}


def split_filename(split: str) -> str:
  return f"new_aan_pairs.{_FILE_SPLIT[split]}.tsv"


def find_data_dir(data_dir: str) -> str:
  if not data_dir:
    raise FileNotFoundError(
        "The Retrieval task needs config.data_dir: the LRA release's "
        "tsv_data/ folder (new_aan_pairs.{train,eval,test}.tsv). It cannot "
        "be generated.")
  byte_source.check_data_dir(
      data_dir, "Retrieval", "the folder holding new_aan_pairs.{train,eval,"
      "test}.tsv (the LRA release's tsv_data/) or a parent of it")
  for sub in _SUBDIRS:
    folder = os.path.join(data_dir, sub) if sub else data_dir
    if all(os.path.isfile(os.path.join(folder, split_filename(s)))
           for s in SPLITS):
      return folder
  raise FileNotFoundError(
      f"Retrieval data_dir {data_dir} lacks new_aan_pairs.{{train,eval,test}}"
      ".tsv (looked in it, tsv_data/ and lra_release/tsv_data/).")


def read_split(path: str, max_length: int | None = None
               ) -> tuple[list[bytes], list[bytes], np.ndarray]:
  """(documents 1, documents 2, int32 labels) of one tsv file.

  Documents are bytes, truncated to max_length when given.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Retrieval file not found: {path}")
  docs1, docs2, labels = [], [], []
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip(b"\r\n")
      if not line.strip():
        continue
      parts = line.split(b"\t", 4)
      if len(parts) != 5:
        raise ValueError(
            f"{path}:{lineno}: expected 5 tab-separated columns (label id1 "
            f"id2 text1 text2), got {len(parts)}: {line[:80]!r}")
      label = LABELS.get(parts[0].strip(b" "))
      if label is None:
        raise ValueError(
            f"{path}:{lineno}: label {parts[0][:20]!r} is not one of "
            f"{', '.join(k.decode() for k in LABELS)}.")
      docs1.append(parts[3][:max_length] if max_length else parts[3])
      docs2.append(parts[4][:max_length] if max_length else parts[4])
      labels.append(label)
  return docs1, docs2, np.asarray(labels, np.int32)


class RetrievalSource:
  """grain source: {"inputs": int32[2, max_length], "targets": int32}."""

  def __init__(self, path: str, max_length: int = 4000):
    docs1, docs2, labels = read_split(path, max_length)
    self._path = path
    self.labels = labels
    self._docs = (byte_source.PackedBytes(docs1, max_length),
                  byte_source.PackedBytes(docs2, max_length))
    self.max_length = int(max_length)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    index = byte_source.check_index(index, len(self))
    inputs = np.stack([d.padded(index) for d in self._docs])
    return {"inputs": inputs, "targets": np.int32(self.labels[index])}

  def __repr__(self):
    return (f"RetrievalSource(path={self._path!r}, size={len(self)}, "
            f"max_length={self.max_length})")


def load_sources(data_dir: str, max_length: int = 4000
                 ) -> dict[str, RetrievalSource]:
  """{'train', 'val', 'test'} -> RetrievalSource; every split non-empty."""
  folder = find_data_dir(data_dir)
  path = lambda s: os.path.join(folder, split_filename(s))
  sources = {s: RetrievalSource(path(s), max_length) for s in SPLITS}
  data_lib.check_nonempty({s: len(v) for s, v in sources.items()}, "pairs",
                          path)
  return sources
