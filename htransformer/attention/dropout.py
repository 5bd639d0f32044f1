"""Attention dropout: which attention weights are dropped, as a pure function.

Dropout on attention weights (``out = dropout(softmax(S)) @ V``: the
normaliser keeps every weight, the numerator keeps each weight with
probability ``1 - rate`` and scales it by ``1 / (1 - rate)``) needs the
same random choice in the forward pass, the backward pass and, for the
tests, in a dense reference. Here the choice is a counter-based hash of
where the weight sits, so every implementation (plain JAX, the fused
kernels, full attention, the float64 reference) computes it from indices
alone, with no mask in memory:

  keep(seed, b, h, level, row, key) = hash(...) >= rate * 2**32

``row`` and ``key`` are the query and key indices at ``level`` (coarse
indices in the padded sequence; level 0 is the tokens themselves). A
hierarchical attention weight between a coarse query row and a coarse key
stands for all the token pairs under them, so it is kept or dropped as a
whole: one draw per weight that the H-matrix stores. At level 0 that is
exactly per-pair dropout, and full attention draws level 0 for every pair
(so with ``block_size >= padded_length / 2`` both attentions drop the same
weights).

Written with ``jnp`` operations on uint32 (or ``numpy`` through ``xp``), so
the same functions run in XLA, inside Pallas kernels and in numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9


def _u32(xp, value):
  return xp.asarray(np.uint32(value & 0xFFFFFFFF), dtype=xp.uint32)


def mix(x, xp=jnp):
  """A 32-bit integer hash (xor-shift-multiply rounds) of uint32 ``x``."""
  x = x ^ (x >> _u32(xp, 16))
  x = x * _u32(xp, 0x7FEB352D)
  x = x ^ (x >> _u32(xp, 15))
  x = x * _u32(xp, 0x846CA68B)
  return x ^ (x >> _u32(xp, 16))


def check_rate(rate) -> float:
  """``rate`` as a float in [0, 1), or a clear error."""
  try:
    if isinstance(rate, (bool, np.bool_, str, bytes)):
      raise TypeError
    value = float(rate)
  except (TypeError, ValueError):
    raise ValueError(
        f"dropout_rate must be a number in [0, 1), got {rate!r}.") from None
  if not 0.0 <= value < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate!r}.")
  return value


def seed_from_key(rng) -> jax.Array:
  """A uint32 dropout seed from a JAX PRNG key (typed or raw)."""
  return jax.random.bits(rng, (), jnp.uint32)


def head_seeds(seed, batch: int, heads: int, xp=jnp):
  """uint32 [batch, heads]: one seed per (batch row, head) of a call.

  ``seed``: a uint32 scalar (``seed_from_key``) or an int."""
  seed = xp.asarray(seed).astype(xp.uint32)
  idx = (xp.arange(batch, dtype=xp.uint32)[:, None] * _u32(xp, heads)
         + xp.arange(heads, dtype=xp.uint32)[None, :])
  return mix(mix(seed, xp) ^ idx, xp)


def level_seed(seeds, level: int, xp=jnp):
  """The seeds of one level (uint32, any shape)."""
  return mix(seeds + _u32(xp, (level + 1) * _GOLDEN), xp)


def threshold(rate: float) -> int:
  """Hashes below this are dropped: ``rate * 2**32``, as an integer."""
  return min(int(round(rate * 2.0**32)), 2**32 - 1)


def multiplier(seeds, rows, keys, rate: float, xp=jnp):
  """``1 / (1 - rate)`` where a weight is kept, 0 where dropped (float32).

  ``seeds``: a level's seeds (``level_seed``); ``rows``, ``keys``: uint32
  indices; all three broadcast together.
  """
  bits = mix(mix(seeds ^ rows, xp) ^ keys, xp)
  keep = bits >= _u32(xp, threshold(rate))
  return xp.where(keep, xp.float32(1.0 / (1.0 - rate)), xp.float32(0.0))


def indices_u32(indices) -> np.ndarray:
  """Static integer indices as uint32 (a negative one, a missing neighbour
  that is masked anyway, wraps)."""
  return (np.asarray(indices, np.int64) % 2**32).astype(np.uint32)
