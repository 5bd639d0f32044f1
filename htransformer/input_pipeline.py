"""grain input pipelines: seeded shuffling, per-process sharding, resumable.

Training: the source is shuffled with a fixed seed (a fresh permutation per
epoch), repeated forever and cut into per-process batches. Process ``p`` of
``P`` takes local batches ``p, p + P, p + 2P, ...``, so the global batch at
step ``s`` is the same set of examples for any number of processes. The
iterator's state (``get_state``/``set_state``) is a small dict saved with
every checkpoint: a resumed run sees exactly the batches an uninterrupted
run would have seen. The state also records what fixes the order (the data
seed, the global batch size and the number of training examples), and
``set_state`` refuses a state saved with other values: resumed with a
changed data config, the saved position would point at other examples.
"""

from __future__ import annotations

import threading

import grain
import jax
import numpy as np

from htransformer import data as data_lib
from htransformer.data import byte_source


def local_batch_size(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(
        f"batch_size {global_batch_size} must be divisible by the number of "
        f"processes ({n}).")
  return global_batch_size // n


def read_batch(source, indices) -> dict[str, np.ndarray]:
  """Items ``indices`` of ``source`` stacked: one ``get_batch`` call where
  the source offers it (preloaded images), else item by item."""
  if hasattr(source, "get_batch"):
    return source.get_batch(np.asarray(indices, np.int64))
  return byte_source.stack_items([source[int(i)] for i in indices])


class ShuffledBatches(grain.MapDataset):
  """Batches of an example-level shuffle, with a fresh permutation per epoch.

  The stream is epoch 0's examples in the order ``permutation(seed, 0)``,
  then epoch 1's in ``permutation(seed, 1)``, and so on forever; batch ``b``
  is stream items ``[b * batch_size, (b + 1) * batch_size)`` (batches cross
  epoch boundaries, so none is dropped). Each epoch's permutation is drawn
  once with numpy. A source with ``get_batch(indices)`` (a dict of stacked
  arrays) is read one batch at a time; others item by item.
  """

  def __init__(self, source, batch_size: int, seed: int):
    super().__init__()
    self._source = source
    self._n = len(source)
    if self._n < 1:
      raise ValueError("Cannot train on an empty training source.")
    self._batch = int(batch_size)
    if self._batch < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self._seed = data_lib.check_seed(seed, "config.data_seed")
    self._perms = {}
    self._lock = threading.Lock()

  def __getstate__(self):  # For worker processes: no lock, no cache.
    state = self.__dict__.copy()
    state["_lock"], state["_perms"] = None, {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return np.iinfo(np.int64).max // self._batch

  def __str__(self):
    return (f"ShuffledBatches(seed={self._seed}, examples={self._n}, "
            f"batch_size={self._batch})")

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
        # Reader threads work on neighbouring batches: keep a few epochs.
        self._perms = {e: p for e, p in self._perms.items()
                       if abs(e - epoch) <= 2}
        self._perms[epoch] = perm
      return perm

  def indices(self, b: int) -> np.ndarray:
    """Source indices of batch ``b``."""
    stream = np.arange(b * self._batch, (b + 1) * self._batch, dtype=np.int64)
    epochs, within = np.divmod(stream, self._n)
    out = np.empty(self._batch, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[within[sel]]
    return out

  def __getitem__(self, b):
    if isinstance(b, slice):
      return self.slice(b)
    return read_batch(self._source, self.indices(int(b)))


def train_dataset(source, global_batch_size: int, seed: int):
  """Infinite per-process dataset of shuffled training batches."""
  local = local_batch_size(global_batch_size)
  ds = ShuffledBatches(source, local, seed)
  return ds[jax.process_index()::jax.process_count()]


# State fields that fix the order of the batches, with their names in the
# config (for errors). The process count and index do not: the global batch
# at step s is the same for any number of processes, and process 0's state
# serves every process (htransformer/checkpoint.py).
ORDER_FIELDS = {"data_seed": "config.data_seed",
                "global_batch_size": "config.batch_size",
                "num_examples": "the number of training examples"}


class TrainIterator:
  """grain's iterator plus the order-defining fields in its state.

  ``get_state`` adds ``ORDER_FIELDS`` to grain's ``{"next_index": k}``;
  ``set_state`` checks them (a state without them, saved before they were
  recorded, is restored unchecked) and raises ValueError naming each
  field that changed, old and new value.
  """

  def __init__(self, iterator, seed: int, global_batch_size: int,
               num_examples: int):
    self._it = iterator
    self._order = {"data_seed": int(seed),
                   "global_batch_size": int(global_batch_size),
                   "num_examples": int(num_examples)}

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self) -> dict:
    state = dict(self._it.get_state())
    state.update(self._order)
    return state

  def set_state(self, state: dict) -> None:
    changed = [f"{ORDER_FIELDS[k]}: {state[k]} in the checkpoint, now {v}"
               for k, v in self._order.items()
               if k in state and state[k] != v]
    if changed:
      raise ValueError(
          "Cannot resume: the training data order differs from the "
          "checkpoint's (" + "; ".join(changed) + "), so its position "
          f"(next_index {state.get('next_index')}) would point at other "
          "examples. Restore the old values, or start in a new workdir.")
    self._it.set_state({k: v for k, v in state.items()
                        if k not in ORDER_FIELDS})

  def __getattr__(self, name):  # Anything else: grain's iterator.
    if name.startswith("__") or name == "_it":
      raise AttributeError(name)
    return getattr(self._it, name)

  def __repr__(self):
    return f"TrainIterator({self._order})"


def train_iterator(source, global_batch_size: int, seed: int,
                   num_threads: int = 4, prefetch: int = 8) -> TrainIterator:
  """Checkpointable iterator; batches are read ahead in background threads."""
  options = grain.ReadOptions(num_threads=num_threads,
                              prefetch_buffer_size=prefetch)
  it = iter(train_dataset(source, global_batch_size, seed)
            .to_iter_dataset(options))
  return TrainIterator(it, seed, global_batch_size, len(source))


def eval_batches(source, global_batch_size: int):
  """This process's part of every eval batch, in order, with weights.

  The last batch is padded with weight-0 copies of example 0, so every
  example counts exactly once. Items with their own (per-token) ``weights``
  get them multiplied by the example's weight.
  """
  local = local_batch_size(global_batch_size)
  n = len(source)
  num_batches = -(-n // global_batch_size)
  first = jax.process_index() * local
  for b in range(num_batches):
    idx = np.arange(b * global_batch_size + first,
                    b * global_batch_size + first + local)
    weights = (idx < n).astype(np.float32)
    batch = read_batch(source, np.where(idx < n, idx, 0))
    if "weights" in batch:
      weights = batch["weights"] * weights.reshape(
          (-1,) + (1,) * (batch["weights"].ndim - 1))
    batch["weights"] = weights
    yield batch
