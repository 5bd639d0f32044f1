"""grain input pipelines: seeded shuffling, per-process sharding, resumable.

Training: the source is shuffled with a fixed seed (a fresh permutation per
epoch), repeated forever and cut into per-process batches. Process ``p`` of
``P`` takes local batches ``p, p + P, p + 2P, ...``, so the global batch at
step ``s`` is the same set of examples for any number of processes. The
iterator's state (``get_state``/``set_state``) is a small dict saved with
every checkpoint: a resumed run sees exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import grain
import jax
import numpy as np


def local_batch_size(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(
        f"batch_size {global_batch_size} must be divisible by the number of "
        f"processes ({n}).")
  return global_batch_size // n


def train_dataset(source, global_batch_size: int, seed: int):
  """Infinite per-process dataset of shuffled training batches."""
  local = local_batch_size(global_batch_size)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = ds.batch(local, drop_remainder=True)
  return ds[jax.process_index()::jax.process_count()]


def train_iterator(source, global_batch_size: int, seed: int,
                   num_threads: int = 4, prefetch: int = 8):
  """Checkpointable iterator; batches are read ahead in background threads."""
  options = grain.ReadOptions(num_threads=num_threads,
                              prefetch_buffer_size=prefetch)
  return iter(train_dataset(source, global_batch_size, seed)
              .to_iter_dataset(options))


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
    items = [source[int(i) if i < n else 0] for i in idx]
    batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
    if "weights" in batch:
      weights = batch["weights"] * weights.reshape(
          (-1,) + (1,) * (batch["weights"].ndim - 1))
    batch["weights"] = weights
    yield batch
