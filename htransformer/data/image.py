"""Image classification (LRA "Image"): CIFAR-10 in gray, 1024 pixel tokens.

Sources (one of):
* tfds ``cifar10`` through ``tfds.data_source`` (items ``{"image":
  uint8[32, 32, 3], "label": int}``), splits ``train[:90%]`` (train),
  ``train[90%:]`` (val) and ``test`` (test), as LRA. tfds is imported lazily
  and never downloads: the dataset must be prepared
  (byte_source.tfds_source says how).
* a local ``cifar-10-batches-py/`` folder (the CIFAR-10 "python version":
  pickled ``data_batch_1..5`` and ``test_batch``); ``data_dir`` may be that
  folder or its parent. The 50,000 training images (batches 1-5 in order)
  are split the same way: the first 90% train, the rest val.

Gray: as LRA's pipeline makes it with ``tf.image.rgb_to_grayscale``
(0.2989 R + 0.5870 G + 0.1140 B on pixels scaled to [0, 1] in float32,
then times 255.5 and truncated: ``png.rgb_to_gray``), row-major, 1024
tokens.

Tokens: pixel value + 1 (1..256), so that id 0 stays padding and black
pixels are never masked out of attention (the original code treated pixel
0 as padding). VOCAB_SIZE = 257. Training batches are shuffled example by
example (htransformer/input_pipeline.py), not as whole batches.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from htransformer import data as data_lib
from htransformer.data import byte_source
from htransformer.data import png

VOCAB_SIZE = 257
NUM_CLASSES = 10
PIXEL_OFFSET = 1
SPLITS = ("train", "val", "test")
TFDS_NAME = "cifar10"
TFDS_SPLITS = {"train": "train[:90%]", "val": "train[90%:]", "test": "test"}
_LOCAL = "cifar-10-batches-py"


def to_gray(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 32, 32, 3] -> uint8 [..., 32, 32] (``png.rgb_to_gray``)."""
  return png.rgb_to_gray(images)


class ImageSource:
  """grain source: {"inputs": int32[h*w] (pixel + 1), "targets": int32}."""

  def __init__(self, gray: np.ndarray, labels):
    gray = np.asarray(gray, np.uint8)
    self.pixels = gray.reshape(len(gray), int(np.prod(gray.shape[1:])))
    self.labels = np.asarray(labels, np.int32)
    if len(self.pixels) != len(self.labels):
      raise ValueError("images and labels differ in length")

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    index = byte_source.check_index(index, len(self))
    return {"inputs": self.pixels[index].astype(np.int32) + PIXEL_OFFSET,
            "targets": np.int32(self.labels[index])}

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    """Items ``indices`` stacked (what the training pipeline reads)."""
    return byte_source.pixel_batch(self.pixels, self.labels, indices,
                                   PIXEL_OFFSET)

  def __repr__(self):
    return f"ImageSource(size={len(self)}, length={self.pixels.shape[1]})"


def find_local_dir(data_dir: str) -> str:
  byte_source.check_data_dir(
      data_dir, "CIFAR-10", f"the {_LOCAL}/ folder of the CIFAR-10 python "
      "version (cifar-10-python.tar.gz) or its parent")
  for folder in (data_dir, os.path.join(data_dir, _LOCAL)):
    if os.path.isfile(os.path.join(folder, "test_batch")):
      return folder
  raise FileNotFoundError(
      f"CIFAR-10 data_dir {data_dir} holds no {_LOCAL}/ (data_batch_1..5, "
      "test_batch). Leave data_dir empty to read tfds cifar10 instead.")


_VALUES = 3 * 32 * 32  # per image: the red, green and blue 32x32 planes


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [n, 32, 32, 3], int32 labels [n]) of one CIFAR-10 batch file.

  ValueError naming the file for anything but a pickled dict with
  ``b"data"`` (n rows of 3072 values in 0-255) and ``b"labels"`` (n labels
  in 0-9).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CIFAR-10 batch file not found: {path}")
  try:
    with open(path, "rb") as f:
      d = pickle.load(f, encoding="bytes")
  except Exception as e:  # pylint: disable=broad-except
    # A 0-byte file: EOFError; a truncated one: UnpicklingError; others.
    raise ValueError(f"{path}: not a CIFAR-10 python batch (a pickled dict "
                     f"of b'data' and b'labels'): {type(e).__name__}: "
                     f"{e}") from None
  if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
    keys = sorted(d)[:5] if isinstance(d, dict) else type(d).__name__
    raise ValueError(f"{path}: expected a dict with b'data' and b'labels', "
                     f"got {keys}.")
  data = np.asarray(d[b"data"])
  if data.ndim != 2 or data.shape[1] != _VALUES:
    raise ValueError(f"{path}: b'data' has shape {data.shape}; expected "
                     f"[images, {_VALUES}] ({_VALUES} values per image: 3 "
                     "colour planes of 32x32).")
  if data.dtype != np.uint8:
    if (not np.issubdtype(data.dtype, np.integer)
        or (data.size and (data.min() < 0 or data.max() > 255))):
      raise ValueError(f"{path}: b'data' must hold pixel values 0-255, got "
                       f"{data.dtype} values.")
  labels = np.asarray(d[b"labels"])
  if labels.ndim != 1 or len(labels) != len(data):
    raise ValueError(f"{path}: {len(data)} images but b'labels' has shape "
                     f"{labels.shape}; expected one label per image.")
  if labels.size and (not np.issubdtype(labels.dtype, np.integer)
                      or labels.min() < 0 or labels.max() >= NUM_CLASSES):
    bad = [x for x in labels.tolist()
           if not (isinstance(x, int) and 0 <= x < NUM_CLASSES)][:5]
    raise ValueError(f"{path}: labels must be integers 0-{NUM_CLASSES - 1}, "
                     f"got {bad}.")
  data = data.astype(np.uint8).reshape(-1, 3, 32, 32)
  return data.transpose(0, 2, 3, 1), labels.astype(np.int32)  # NHWC


def read_local(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """split -> (gray uint8 [n, 32, 32], labels) from cifar-10-batches-py."""
  folder = find_local_dir(data_dir)
  parts = [_read_batch(os.path.join(folder, f"data_batch_{i}"))
           for i in range(1, 6)]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  n_train = len(images) * 9 // 10
  test_images, test_labels = _read_batch(os.path.join(folder, "test_batch"))
  return {"train": (to_gray(images[:n_train]), labels[:n_train]),
          "val": (to_gray(images[n_train:]), labels[n_train:]),
          "test": (to_gray(test_images), test_labels)}


def read_tfds(tfds_data_dir: str | None = None
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  out = {}
  for split, tfds_split in TFDS_SPLITS.items():
    src = byte_source.tfds_source(
        TFDS_NAME, tfds_split, tfds_data_dir,
        local="Or read the CIFAR-10 python version (cifar-10-python.tar.gz) "
        f"unpacked: --config.data_dir=PATH/{_LOCAL}.")
    items = [src[i] for i in range(len(src))]
    images = np.stack([np.asarray(it["image"], np.uint8) for it in items])
    labels = np.asarray([int(it["label"]) for it in items], np.int32)
    out[split] = (to_gray(images), labels)
  return out


def load_sources(data_dir: str | None, tfds_data_dir: str | None = None
                 ) -> dict[str, ImageSource]:
  """{'train', 'val', 'test'} -> ImageSource; every split non-empty."""
  splits = read_local(data_dir) if data_dir else read_tfds(tfds_data_dir)
  sources = {s: ImageSource(*splits[s]) for s in SPLITS}
  where = lambda s: "CIFAR-10 data in " + (
      find_local_dir(data_dir) if data_dir else f"tfds {TFDS_NAME}")
  data_lib.check_nonempty({s: len(v) for s, v in sources.items()}, "images",
                          where)
  return sources
