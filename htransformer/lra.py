"""The LRA tasks other than ListOps: Text, Retrieval, Image, Pathfinder, Path-X.

``build(config, cache_dir)`` returns the fields of a ``tasks.Task``. Data:

* text: ``config.data_dir`` = an ``aclImdb/`` folder (or its parent); empty:
  tfds ``imdb_reviews`` (``config.data.tfds_data_dir``). data/imdb.py.
* retrieval: ``config.data_dir`` = the release's ``tsv_data/`` (required).
  Items are pairs ``[2, max_length]``; the task's kind is
  ``"pair_classification"`` (models.DualEncoderClassifier). data/retrieval.py.
* image: ``config.data_dir`` = ``cifar-10-batches-py/`` (or its parent);
  empty: tfds ``cifar10``. data/image.py.
* pathfinder / pathx: ``config.data_dir`` = the LRA release (or any folder
  down to ``curv_contour_length_14/``); empty: generated once into the cache
  (``config.data``: seed, num_images, contour_length; split_seed for the
  80/10/10 split). data/pathfinder.py.

Pixel tasks use pixel + 1 as the token (0 stays padding, nothing is ever
masked), so ``max_length`` must be the number of pixels.
"""

from __future__ import annotations

TASKS = ("text", "retrieval", "image", "pathfinder", "pathx")
RESOLUTION = {"pathfinder": 32, "pathx": 128}


def _field(config, name, default=None):
  data = config.get("data") if hasattr(config, "get") else None
  if data is not None and name in data:
    return data[name]
  return default


def build(config, cache_dir: str) -> dict:
  """{name, sources, vocab_size, num_classes, max_length, data_dir, kind,
  black_pixel_token}."""
  name = config.task
  max_length = int(config.max_length)
  data_dir = config.data_dir or ""
  kind = "classification"
  black = None  # the token of pixel value 0 (pixel tasks)
  if name == "text":
    from htransformer.data import imdb  # pylint: disable=g-import-not-at-top
    sources = imdb.load_sources(data_dir or None, max_length=max_length,
                                tfds_data_dir=_field(config, "tfds_data_dir")
                                or None)
    vocab, classes = imdb.VOCAB_SIZE, imdb.NUM_CLASSES
    where = data_dir or "tfds:imdb_reviews"
  elif name == "retrieval":
    from htransformer.data import retrieval  # pylint: disable=g-import-not-at-top
    sources = retrieval.load_sources(data_dir, max_length=max_length)
    vocab, classes = retrieval.VOCAB_SIZE, retrieval.NUM_CLASSES
    where = retrieval.find_data_dir(data_dir)
    kind = "pair_classification"
  elif name == "image":
    from htransformer.data import image  # pylint: disable=g-import-not-at-top
    if max_length != 1024:
      raise ValueError(f"The image task has 1024 pixel tokens; set "
                       f"max_length=1024 (got {max_length}).")
    sources = image.load_sources(
        data_dir or None, tfds_data_dir=_field(config, "tfds_data_dir") or None)
    vocab, classes = image.VOCAB_SIZE, image.NUM_CLASSES
    where = data_dir or "tfds:cifar10"
    black = image.PIXEL_OFFSET
  elif name in RESOLUTION:
    from htransformer.data import pathfinder  # pylint: disable=g-import-not-at-top
    res = RESOLUTION[name]
    if max_length != res * res:
      raise ValueError(f"{name} has {res}x{res} = {res * res} pixel tokens; "
                       f"set max_length={res * res} (got {max_length}).")
    seed = _field(config, "seed", 0)
    num_images = _field(config, "num_images", 200000)
    contour_length = _field(config, "contour_length", 14)
    if not data_dir:
      print(f"No data_dir given: using generated {name} data ({num_images} "
            f"images of {res} px, seed {seed}) from the cache in {cache_dir} "
            "(generated there on first use).", flush=True)
    where = pathfinder.find_data_dir(
        data_dir or None, cache_dir, resolution=res, num_images=num_images,
        seed=seed, contour_length=contour_length)
    sources = pathfinder.load_sources(where, res,
                                      _field(config, "split_seed", 0))
    vocab, classes = pathfinder.VOCAB_SIZE, pathfinder.NUM_CLASSES
    black = pathfinder.PIXEL_OFFSET
  else:
    raise ValueError(f"Not an LRA task of this module: {name!r} (one of "
                     f"{TASKS}).")
  return dict(name=name, sources=sources, vocab_size=vocab,
              num_classes=classes, max_length=max_length, data_dir=where,
              kind=kind, black_pixel_token=black)
