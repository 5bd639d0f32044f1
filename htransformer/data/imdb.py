"""Text classification (LRA "Text"): IMDb reviews, byte level.

Sources (one of):
* tfds ``imdb_reviews`` through ``tfds.data_source`` (splits ``train`` and
  ``test``; items ``{"text": bytes, "label": 0 neg / 1 pos}``), read when no
  local folder is given. tfds is imported lazily and never downloads: the
  dataset must be prepared (byte_source.tfds_source says how).
* a local ``aclImdb/`` folder as the Stanford archive unpacks
  (``aclImdb/{train,test}/{neg,pos}/<id>_<rating>.txt``; ``train/unsup`` is
  ignored). ``data_dir`` may be the ``aclImdb`` folder or its parent. Files
  are read in the order neg then pos, by name; label 0 = neg, 1 = pos (as
  tfds).

Splits: train = train; as in LRA, the test split doubles as validation
(val = test = the 25,000 test reviews).

Tokens: UTF-8 bytes, id = byte + 1, 0 = padding (vocabulary 257, fixed).
Reviews are truncated to ``max_length`` bytes: 4000 in the LRA
configuration (the LRA repository's own text config used 1000; both are in
configs/text.py). The model pools with a CLS token.
"""

from __future__ import annotations

import os

import numpy as np

from htransformer.data import byte_source

VOCAB_SIZE = byte_source.VOCAB_SIZE
NUM_CLASSES = 2
SPLITS = ("train", "val", "test")
_LOCAL_SPLIT = {"train": "train", "val": "test", "test": "test"}
_CLASSES = ("neg", "pos")
TFDS_NAME = "imdb_reviews"


class TextSource:
  """grain source: {"inputs": int32[max_length], "targets": int32}."""

  def __init__(self, texts, labels, max_length: int = 4000):
    self.labels = np.asarray(labels, np.int32)
    if len(texts) != len(self.labels):
      raise ValueError("texts and labels differ in length")
    self._packed = byte_source.PackedBytes(texts, max_length)

  @property
  def max_length(self):
    return self._packed.max_length

  @property
  def lengths(self):
    return self._packed.lengths

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    index = byte_source.check_index(index, len(self))
    return {"inputs": self._packed.padded(index),
            "targets": np.int32(self.labels[index])}

  def __repr__(self):
    return f"TextSource(size={len(self)}, max_length={self.max_length})"


def find_local_dir(data_dir: str) -> str:
  """The aclImdb folder (data_dir itself or data_dir/aclImdb)."""
  byte_source.check_data_dir(
      data_dir, "IMDb", "the aclImdb folder of the Stanford archive "
      "(aclImdb_v1.tar.gz) or its parent")
  for folder in (data_dir, os.path.join(data_dir, "aclImdb")):
    if all(os.path.isdir(os.path.join(folder, s, c))
           for s in ("train", "test") for c in _CLASSES):
      return folder
  raise FileNotFoundError(
      f"IMDb data_dir {data_dir} is not an aclImdb folder: expected "
      "{train,test}/{neg,pos}/*.txt in it or in its aclImdb/ subfolder. "
      "Leave data_dir empty to read tfds imdb_reviews instead.")


def read_local_split(folder: str, split: str) -> tuple[list[bytes], np.ndarray]:
  """(texts as bytes, int32 labels) of aclImdb/<split> (train or test)."""
  texts, labels = [], []
  for label, cls in enumerate(_CLASSES):
    d = os.path.join(folder, split, cls)
    names = [n for n in sorted(os.listdir(d)) if n.lower().endswith(".txt")]
    if not names:  # One class only: a model would learn nothing.
      raise FileNotFoundError(
          f"No reviews (*.txt) in {d}: every class folder of "
          f"{os.path.join(folder, split)} ({', '.join(_CLASSES)}) needs "
          "reviews.")
    for name in names:
      with open(os.path.join(d, name), "rb") as f:
        texts.append(f.read())
      labels.append(label)
  return texts, np.asarray(labels, np.int32)


def read_tfds_split(split: str, tfds_data_dir: str | None = None
                    ) -> tuple[list[bytes], np.ndarray]:
  src = byte_source.tfds_source(
      TFDS_NAME, split, tfds_data_dir,
      local="Or read the Stanford archive (aclImdb_v1.tar.gz) unpacked: "
      "--config.data_dir=PATH/aclImdb.")
  texts, labels = [], []
  for i in range(len(src)):
    ex = src[i]
    text = ex["text"]
    texts.append(text if isinstance(text, bytes) else str(text).encode())
    labels.append(int(ex["label"]))
  return texts, np.asarray(labels, np.int32)


def load_sources(data_dir: str | None, max_length: int = 4000,
                 tfds_data_dir: str | None = None) -> dict[str, TextSource]:
  """{'train', 'val', 'test'} -> TextSource (val is the test split)."""
  cache = {}
  for split in ("train", "test"):
    if data_dir:
      cache[split] = read_local_split(find_local_dir(data_dir), split)
    else:
      cache[split] = read_tfds_split(split, tfds_data_dir)
  built = {k: TextSource(*v, max_length) for k, v in cache.items()}
  return {split: built[_LOCAL_SPLIT[split]] for split in SPLITS}
