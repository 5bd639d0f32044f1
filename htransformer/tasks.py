"""Task registry: config.task -> data sources and the model's in/out sizes.

A task provides random-access sources (grain's RandomAccessDataSource
protocol: ``__len__`` and ``__getitem__`` returning
``{"inputs": int32[max_length], "targets": int32}``) for the train, val and
test splits, and the vocabulary and class counts the model needs.

``kind`` says what the model and the loss are: ``"classification"`` (one
label per sequence), ``"pair_classification"`` (one label per pair of
sequences, items ``[2, max_length]``: LRA Retrieval, a two-tower model) or
``"lm"`` (next-token prediction with per-token ``weights`` in every item;
htransformer/data/lm.py). The LRA tasks besides ListOps are built in
htransformer/lra.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from htransformer import data as data_lib

TASKS = ("listops", "lm", "text", "retrieval", "image", "pathfinder",
         "pathx")


@dataclasses.dataclass
class Task:
  name: str
  sources: dict[str, Any]  # split name -> random-access source
  vocab_size: int
  num_classes: int
  max_length: int
  data_dir: str
  kind: str = "classification"
  tokenizer: Any = None  # LM tasks: encode/decode (data/tokenizer.py).
  black_pixel_token: int | None = None  # pixel tasks: the token of pixel 0


def default_cache_dir() -> str:
  return os.environ.get(
      "HTRANSFORMER_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "htransformer"))


def data_origin(data_dir: str) -> dict:
  """Where a task's data came from, for results.json.

  ``{"data_dir": ..., "generated": bool}`` plus the generator's record
  (generator, seed, sizes) when the folder was written by one of this
  repository's generators (ListOps, Pathfinder / Path-X), whether it was
  found in the cache or passed as ``data_dir``.
  """
  # pylint: disable=g-import-not-at-top
  from htransformer.data import listops
  from htransformer.data import pathfinder
  out = {"data_dir": data_dir, "generated": False}
  for name in (listops.METADATA_FILE, pathfinder.METADATA_FILE):
    path = os.path.join(data_dir, name)
    if data_dir and os.path.isfile(path):
      with open(path) as f:
        meta = json.load(f)
      out["generated"] = True
      out["generator"] = {k: meta[k] for k in
                          ("generator", "generator_version", "seed",
                           "num_train", "num_val", "num_test", "num_images",
                           "resolution")
                          if k in meta}
      break
  return out


def check_splits(task: Task) -> Task:
  """Raises ValueError if a split the run uses has no examples.

  Training needs ``train``; every evaluation reads ``val`` and ``test``
  (train.py), and an empty one would end the run at its first evaluation,
  after the training. The error names the data and every split's size.
  """
  if not task.sources:  # A dry run: shapes only, no data.
    return task
  sizes = {s: len(task.sources[s]) if s in task.sources else None
           for s in ("train", "val", "test")}
  data_lib.check_nonempty(
      sizes, "examples",
      lambda s: f"Task {task.name} (data: {task.data_dir or 'unnamed'})")
  return task


def check_data_config(config) -> None:
  """Raises ValueError naming a ``config.data`` setting the data generator
  cannot use (ListOps, Pathfinder, Path-X without a data_dir), before any
  data is generated: a split the run would find empty only after minutes
  of generation, lengths no tree can have."""
  # pylint: disable=g-import-not-at-top
  if config.get("data_dir") or config.task not in ("listops", "pathfinder",
                                                   "pathx"):
    return
  d = config.data
  try:
    if config.task == "listops":
      from htransformer.data import listops
      listops.check_settings(d.num_train, d.num_val, d.num_test,
                             d.min_length, d.max_length, nonempty=True)
    else:
      from htransformer import lra
      from htransformer.data import pathfinder
      gen = lra.generated_pathfinder(config)
      pathfinder.check_settings(gen["resolution"], gen["num_images"],
                                gen["contour_length"], nonempty=True)
  except ValueError as e:
    raise ValueError(f"config.data (generated {config.task} data): {e}"
                     ) from None


def get_task(config, workdir: str | None = None) -> Task:
  """Builds the task named by ``config.task`` (reading or generating data).

  ``workdir`` holds state a task keeps with the run (the LM tokenizer).
  Every split the run uses holds at least one example (``check_splits``).
  A dry run (``config.dry_run``) reads and generates no data: every task's
  model shape is fixed by the config, so its Task has no sources.
  """
  return check_splits(_build_task(config, workdir))


def _build_task(config, workdir: str | None) -> Task:
  if config.task == "listops":
    from htransformer.data import listops  # pylint: disable=g-import-not-at-top
    d = config.data
    if config.get("dry_run"):  # The model's shape needs no data.
      return Task("listops", {}, listops.VOCAB_SIZE, listops.NUM_CLASSES,
                  config.max_length, "")
    if not config.data_dir and data_lib.first_process():
      print(f"No data_dir given: using generated ListOps data (seed {d.seed}, "
            f"{d.num_train}/{d.num_val}/{d.num_test}) from the cache in "
            f"{config.cache_dir or default_cache_dir()} (generated there on "
            "first use).", flush=True)
    data_dir = listops.find_data_dir(
        config.data_dir or None, config.cache_dir or default_cache_dir(),
        seed=d.seed, num_train=d.num_train, num_val=d.num_val,
        num_test=d.num_test, min_length=d.min_length,
        max_length=d.max_length)
    sources = listops.load_sources(data_dir, max_length=config.max_length)
    return Task("listops", sources, listops.VOCAB_SIZE, listops.NUM_CLASSES,
                config.max_length, data_dir)
  if config.task == "lm":
    from htransformer.data import lm  # pylint: disable=g-import-not-at-top
    if config.get("dry_run"):  # The model's shape needs no data.
      return Task("lm", {}, lm.vocab_size_from_config(config.data), 0,
                  config.max_length, "", kind="lm")
    sources, tok, where = lm.build(config, workdir,
                                   config.cache_dir or default_cache_dir())
    return Task("lm", sources, tok.vocab_size, 0, config.max_length, where,
                kind="lm", tokenizer=tok)
  from htransformer import lra  # pylint: disable=g-import-not-at-top
  if config.task in lra.TASKS:  # Text, Retrieval, Image, Pathfinder, Path-X
    return Task(**lra.build(config, config.cache_dir or default_cache_dir()))
  raise ValueError(f"config.task must be one of {TASKS}, got "
                   f"{config.task!r}.")
