"""The LRA tasks other than ListOps: Text, Retrieval, Image, Pathfinder, Path-X.

``build(config, cache_dir)`` returns the fields of a ``tasks.Task``. Data:

* text: ``config.data_dir`` = an ``aclImdb/`` folder (or its parent); empty:
  tfds ``imdb_reviews``, prepared beforehand (never downloaded) in
  ``config.data.tfds_data_dir`` or tfds's default folder. data/imdb.py.
* retrieval: ``config.data_dir`` = the release's ``tsv_data/`` (required).
  Items are pairs ``[2, max_length]``; the task's kind is
  ``"pair_classification"`` (models.DualEncoderClassifier). data/retrieval.py.
* image: ``config.data_dir`` = ``cifar-10-batches-py/`` (or its parent);
  empty: tfds ``cifar10``, prepared as for text. data/image.py.
* pathfinder / pathx: ``config.data_dir`` = the LRA release (or any folder
  down to ``curv_contour_length_14/``); empty: generated once into the cache
  (``config.data``: seed, num_images, contour_length; split_seed for the
  80/10/10 split). data/pathfinder.py.

A dry run (``config.dry_run``) reads and generates no data.

Pixel tasks use pixel + 1 as the token (0 stays padding, nothing is ever
masked), so ``max_length`` must be the number of pixels.
"""

from __future__ import annotations

from htransformer import data as data_lib

TASKS = ("text", "retrieval", "image", "pathfinder", "pathx")
RESOLUTION = {"pathfinder": 32, "pathx": 128}


def _field(config, name, default=None):
  data = config.get("data") if hasattr(config, "get") else None
  if data is not None and name in data:
    return data[name]
  return default


def generated_pathfinder(config) -> dict:
  """The settings of generated Pathfinder or Path-X data (no data_dir):
  {resolution, num_images, contour_length, seed}, by ``config.data`` or
  the generator's defaults."""
  return dict(resolution=RESOLUTION[config.task],
              num_images=_field(config, "num_images", 200000),
              contour_length=_field(config, "contour_length", 14),
              seed=_field(config, "seed", 0))


def build(config, cache_dir: str) -> dict:
  """{name, sources, vocab_size, num_classes, max_length, data_dir, kind,
  black_pixel_token}.

  A dry run (``config.dry_run``) reads and generates nothing: the model's
  shape needs no data (the vocabulary and classes are fixed), so
  ``sources`` is empty and ``data_dir`` "".
  """
  # pylint: disable=g-import-not-at-top
  from htransformer.data import image
  from htransformer.data import imdb
  from htransformer.data import pathfinder
  from htransformer.data import retrieval
  # pylint: enable=g-import-not-at-top
  name = config.task
  max_length = int(config.max_length)
  if name not in TASKS:
    raise ValueError(f"Not an LRA task of this module: {name!r} (one of "
                     f"{TASKS}).")
  module = {"text": imdb, "retrieval": retrieval, "image": image}.get(
      name, pathfinder)
  side = 32 if name == "image" else RESOLUTION.get(name, 0)  # pixel tasks
  pixels = side * side
  if pixels and max_length != pixels:
    raise ValueError(f"The {name} task has {side}x{side} = {pixels} pixel "
                     f"tokens; set max_length={pixels} (got {max_length}).")
  task = dict(name=name, vocab_size=module.VOCAB_SIZE,
              num_classes=module.NUM_CLASSES, max_length=max_length,
              kind=("pair_classification" if name == "retrieval"
                    else "classification"),
              black_pixel_token=module.PIXEL_OFFSET if pixels else None)
  if config.get("dry_run"):  # The model's shape needs no data.
    return dict(task, sources={}, data_dir="")
  data_dir = config.data_dir or ""
  if name == "text":
    sources = imdb.load_sources(data_dir or None, max_length=max_length,
                                tfds_data_dir=_field(config, "tfds_data_dir")
                                or None)
    where = data_dir or "tfds:imdb_reviews"
  elif name == "retrieval":
    sources = retrieval.load_sources(data_dir, max_length=max_length)
    where = retrieval.find_data_dir(data_dir)
  elif name == "image":
    sources = image.load_sources(
        data_dir or None, tfds_data_dir=_field(config, "tfds_data_dir") or None)
    where = data_dir or "tfds:cifar10"
  else:  # pathfinder, pathx
    gen = generated_pathfinder(config)
    if not data_dir and data_lib.first_process():
      print(f"No data_dir given: using generated {name} data "
            f"({gen['num_images']} images of {gen['resolution']} px, seed "
            f"{gen['seed']}) from the cache in {cache_dir} (generated there "
            "on first use).", flush=True)
    where = pathfinder.find_data_dir(data_dir or None, cache_dir, **gen)
    sources = pathfinder.load_sources(where, gen["resolution"],
                                      _field(config, "split_seed", 0))
  return dict(task, sources=sources, data_dir=where)
