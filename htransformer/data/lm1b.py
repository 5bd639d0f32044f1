"""One Billion Word (tfds ``lm1b``) through ``tfds.data_source``.

Needs ``tensorflow_datasets`` (imported here only, lazily) and the dataset
prepared in ArrayRecord format under ``config.data_dir`` (or tfds's default
data dir); ``scripts/prepare_lm1b.py`` does that once where TensorFlow and
the internet are available. Reading needs neither.

Splits: the last ``config.data.lm1b_val_sentences`` sentences of tfds's
``train`` are our validation set, the rest train; ``test`` is tfds's test
split (306,688 sentences). The training sentences are tokenized once into
a flat token stream cached in ``CACHE/lm1b/<tokenizer hash>/train.bin``
(memory-mapped) and stream-packed; validation and test are one sentence per
row (``config.data.eval_packing="sentence"``) or stream-packed
(``"stream"``).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from htransformer import tf_util
from htransformer.data import byte_source
from htransformer.data import tokenizer as tokenizer_lib

_CHUNK = 100_000


def import_tfds():
  tf_util.import_tensorflow()  # GPUs hidden from it first (byte_source).
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "config.data.source='lm1b' needs tensorflow_datasets (`pip install "
        "tensorflow-datasets`) and the lm1b dataset prepared as ArrayRecord "
        "(`python scripts/prepare_lm1b.py`, which needs TensorFlow and the "
        "internet once). Without them, train on local text files: "
        "--config.data.source=text --config.data.eval_packing=stream "
        "--config.data.text_files='PATH/*.txt'."
    ) from e
  return tfds


def _text(example) -> str:
  t = example["text"]
  if isinstance(t, np.ndarray):
    t = t.item()
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


class Sentences:
  """Random access to the sentences (str) of a tfds source, or a range."""

  def __init__(self, source, start: int = 0, stop: int | None = None):
    self.source = source
    self.start = start
    self.stop = len(source) if stop is None else stop

  def __len__(self):
    return max(self.stop - self.start, 0)

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(i)
    return _text(self.source[self.start + i])

  def chunks(self, size: int = _CHUNK):
    """Lists of consecutive sentences, read in batches where possible."""
    for lo in range(0, len(self), size):
      keys = range(self.start + lo, self.start + min(lo + size, len(self)))
      try:
        items = self.source.__getitems__(list(keys))
      except (AttributeError, TypeError):
        items = [self.source[k] for k in keys]
      yield [_text(x) for x in items]

  def iter_texts(self):
    for chunk in self.chunks(10_000):
      yield from chunk


def load_sentences(data_dir: str | None, num_val: int) -> dict:
  """split -> Sentences (train, val, test).

  Validation is the last ``num_val`` sentences of tfds's train, at most a
  tenth of them (a small prepared copy keeps most for training).
  """
  if data_dir:
    byte_source.check_data_dir(
        data_dir, "lm1b", "a folder made by `python scripts/prepare_lm1b.py "
        "--data_dir=DIR`, passed as --config.data_dir=DIR (or leave it "
        "empty for tfds's default folder)")
  import_tfds()
  # Never starts a download (which needs TensorFlow); a folder without the
  # prepared dataset is named, with how to prepare it.
  local = "(`python scripts/prepare_lm1b.py --data_dir=DIR` does that.)"
  train = byte_source.tfds_source("lm1b", "train", data_dir,
                                  field="config.data_dir", local=local)
  test = byte_source.tfds_source("lm1b", "test", data_dir,
                                 field="config.data_dir", local=local)
  n = len(train)
  num_val = min(num_val, n // 10)
  return {"train": Sentences(train, 0, n - num_val),
          "val": Sentences(train, n - num_val, n),
          "test": Sentences(test)}


def tokenizer_digest(tok) -> str:
  if tok.kind == "byte":
    return "byte"
  with open(tok.path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def token_stream(sentences: Sentences, tok, cache_dir: str,
                 name: str) -> np.ndarray:
  """[eos] s1 [eos] s2 [eos] ..., cached as a memory-mapped file."""
  folder = os.path.join(cache_dir, "lm1b", tokenizer_digest(tok))
  dtype = tokenizer_lib.token_dtype(tok.vocab_size)
  path = os.path.join(folder, f"{name}-{len(sentences)}.bin")
  if not os.path.exists(path):
    os.makedirs(folder, exist_ok=True)
    print(f"Tokenizing {len(sentences):,} lm1b sentences into {path} (once)",
          flush=True)
    tmp = f"{path}.tmp{os.getpid()}"
    eos = tokenizer_lib.EOS_ID
    with open(tmp, "wb") as f:
      np.array([eos], dtype).tofile(f)
      for chunk in sentences.chunks():
        ids = tok.encode_batch(chunk)
        flat = np.fromiter(
            (t for s in ids for t in (*s, eos)), np.int64,
            count=sum(len(s) + 1 for s in ids))
        flat.astype(dtype).tofile(f)
    os.replace(tmp, path)
  return np.memmap(path, dtype=dtype, mode="r")
