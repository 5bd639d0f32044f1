"""Shared pieces of the byte-level LRA tasks (Text, Retrieval) and tfds.

Byte tokens: id = byte + 1 (1..256), 0 = padding; VOCAB_SIZE = 257. The
vocabulary is fixed (every byte value), so ids never depend on the data.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from htransformer import tf_util

PAD_ID = 0
BYTE_OFFSET = 1
VOCAB_SIZE = 257


def encode_bytes(data: bytes, max_length: int | None = None) -> np.ndarray:
  """bytes -> int32 ids (byte + 1), truncated to max_length, no padding."""
  if max_length is not None:
    data = data[:max_length]
  return np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET


def decode_ids(ids: Iterable[int]) -> bytes:
  """ids -> bytes, padding dropped."""
  return bytes(int(i) - BYTE_OFFSET for i in ids if int(i) != PAD_ID)


class PackedBytes:
  """Many byte strings (each truncated to max_length) in one flat array."""

  def __init__(self, texts: Sequence[bytes], max_length: int):
    if max_length <= 0:
      raise ValueError(f"max_length must be positive, got {max_length}.")
    self.max_length = int(max_length)
    kept = [t[:max_length] for t in texts]
    lengths = np.fromiter((len(t) for t in kept), np.int64, len(kept))
    self.offsets = np.zeros(len(kept) + 1, np.int64)
    np.cumsum(lengths, out=self.offsets[1:])
    self.data = np.frombuffer(b"".join(kept), np.uint8).copy()
    self.lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))

  def __len__(self):
    return len(self.offsets) - 1

  def padded(self, index: int) -> np.ndarray:
    """int32[max_length]: byte + 1, then zeros."""
    start, end = self.offsets[index], self.offsets[index + 1]
    out = np.zeros(self.max_length, np.int32)
    out[:end - start] = self.data[start:end]
    out[:end - start] += BYTE_OFFSET
    return out


def check_data_dir(data_dir: str, task: str, expected: str) -> None:
  """Raises FileNotFoundError unless ``data_dir`` is an existing folder,
  saying which it is: missing, or a file (an archive not unpacked, say).
  ``task`` names the task, ``expected`` what the folder should hold."""
  if os.path.isdir(data_dir):
    return
  if os.path.exists(data_dir):
    problem = ("is a file, not a folder (an archive? unpack it and pass the "
               "folder it makes)")
  else:
    problem = "does not exist"
  raise FileNotFoundError(f"{task} data_dir {problem}: {data_dir}; expected "
                          f"{expected}.")


def check_index(index, n: int) -> int:
  index = int(index)
  if index < 0:
    index += n
  if not 0 <= index < n:
    raise IndexError(f"index {index} out of range for {n} examples")
  return index


def stack_items(items) -> dict[str, np.ndarray]:
  """A list of items (dicts of arrays) -> one dict of stacked arrays."""
  return {k: np.stack([it[k] for it in items]) for k in items[0]}


def pixel_batch(pixels: np.ndarray, labels: np.ndarray, indices,
                offset: int) -> dict[str, np.ndarray]:
  """Items ``indices`` of a preloaded image source, stacked.

  ``pixels`` uint8 [n, h*w], ``labels`` [n]; inputs are pixel + ``offset``
  as int32 (the item layout of the image sources).
  """
  indices = np.asarray(indices, np.int64)
  n = len(labels)
  if indices.size and (indices.min() < 0 or indices.max() >= n):
    raise IndexError(f"indices out of range for {n} examples")
  return {"inputs": pixels[indices].astype(np.int32) + offset,
          "targets": np.asarray(labels, np.int32)[indices]}


def require_tfds():
  """Imports tensorflow_datasets, or says how to get it."""
  # tfds imports TensorFlow where it is installed: first with its GPUs
  # hidden (``tf_util``), so that it reserves none of their memory.
  tf_util.import_tensorflow()
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "This task reads its data through tensorflow-datasets (tfds), which "
        "is not installed: `pip install tensorflow-datasets` (preparing a "
        "dataset the first time may also need TensorFlow), or use the local "
        "alternative described in the task's module docstring (config "
        "field data_dir).") from e
  return tfds


def _tfds_folders(tfds, name: str, data_dir: str | None) -> tuple[str, str]:
  """(the tfds data folder searched, the dataset's version folder in it)."""
  root = data_dir or os.path.expanduser(
      getattr(tfds.core.constants, "DATA_DIR", "~/tensorflow_datasets"))
  try:
    folder = str(tfds.builder(name, data_dir=data_dir or None).data_dir)
  except Exception:  # pylint: disable=broad-except
    folder = os.path.join(root, name)
  return root, folder


def tfds_source(name: str, split: str, data_dir: str | None = None, *,
                field: str = "config.data.tfds_data_dir", local: str = ""):
  """tfds.data_source(name, split=...) of a prepared dataset; never downloads.

  A dataset that is not prepared (in ArrayRecord format) raises
  FileNotFoundError at once naming it, the folder searched, the config
  ``field`` that sets that folder and how to prepare it; ``local`` is
  appended (the task's local-files alternative).
  """
  tfds = require_tfds()
  try:
    # Training never downloads: offline, tfds retries for minutes and
    # leaves partial folders behind.
    return tfds.data_source(name, split=split, data_dir=data_dir or None,
                            download=False)
  except Exception as e:  # pylint: disable=broad-except
    root, folder = _tfds_folders(tfds, name, data_dir)
    if os.path.isfile(os.path.join(folder, "dataset_info.json")):
      # tfds's message spans lines (a list of possible causes).
      detail = " ".join(str(e).split()).rstrip(".")
      problem = f"{folder} holds it, but opening it failed: {detail}"
    else:
      problem = f"it is not prepared there (no dataset_info.json in {folder})"
    where = (f"{field}={data_dir}" if data_dir else
             f"{field} is empty: the tfds default folder")
    raise FileNotFoundError(
        f"The tfds dataset {name!r} (split {split!r}) could not be opened "
        f"from {root} ({where}): {problem}. Training never downloads. "
        f"Prepare it once, in ArrayRecord format, where TensorFlow, "
        f"tensorflow-datasets and the internet are available: `tfds build "
        f"{name} --data_dir=DIR --file_format=array_record`; then copy DIR "
        f"here and pass --{field}=DIR.{' ' + local if local else ''}"
    ) from e
