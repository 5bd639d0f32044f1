"""Hierarchical (H-matrix) attention of H-Transformer-1D in plain JAX.

The definition this module computes is `docs/h_attention.md` (dense form):
pairs of tokens in the same or adjacent level-0 blocks interact exactly;
farther pairs interact through coarsened (averaged) queries and keys at the
smallest level where their blocks are adjacent; one exact softmax per row
runs over all levels.

Algorithm (linear in length):
  1. Pad to ``Lp = block_size * 2**m`` and build a pyramid per level with
     reshapes ``[.., n, d] -> [.., n/2, 2, d]``: keys and values by masked
     mean, a count of real tokens by sum, queries by masked mean
     (non-causal) or by taking the group's first real token (causal,
     leak-free).
  2. Per level, compute ``block_size x block_size`` logit blocks against the
     neighbouring key blocks: at level 0 the left, diagonal and (non-causal)
     right block; at coarser levels only left and (non-causal) right, minus
     the quarter a finer level already covers (overlap correction).
  3. Each coarse key stands for ``c`` real tokens, so its probability is
     weighted by ``c``: ``Z = sum p*c`` and ``Y = sum (p*c) * mean(v)``, which
     equals the dense softmax over the original tokens.
  4. Combine levels coarse to fine with a per-row running max (as in online
     softmax), so every row is exact however far its logits sit from other
     rows'. ``out = Y / Z``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from htransformer.attention import dropout as dropout_lib


def padded_length(length: int, block_size: int) -> int:
  """Smallest ``block_size * 2**m`` with ``m >= 1`` that holds ``length``."""
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}.")
  lp = 2 * block_size
  while lp < length:
    lp *= 2
  return lp


def num_levels(length: int, block_size: int) -> int:
  """Number of levels ``m`` of the pyramid for a sequence of ``length``."""
  return int(round(math.log2(padded_length(length, block_size) // block_size)))


def _halve_sum(x):
  """[B, H, n, ...] -> [B, H, n/2, ...] by summing neighbouring pairs."""
  b, h, n = x.shape[:3]
  return x.reshape(b, h, n // 2, 2, *x.shape[3:]).sum(axis=3)


def _masked_mean(total, count):
  """Sum of real tokens' vectors over their count (0 where there are none)."""
  return total / jnp.maximum(count, 1.0)[..., None]


def _shift_blocks(x, direction):
  """Neighbour blocks along axis 2: block i gets block i-1 (left) or i+1.

  Missing neighbours at the ends are zeros; they carry count 0 and are
  therefore masked out.
  """
  pad = [(0, 0)] * x.ndim
  if direction == "left":
    pad[2] = (1, 0)
    return jnp.pad(x[:, :, :-1], pad)
  pad[2] = (0, 1)
  return jnp.pad(x[:, :, 1:], pad)


def _structure_masks(block_size: int, causal: bool):
  """Static [Nr, K] masks of allowed (query, key) slots per level kind.

  Returns masks for level 0 (keys: left, diagonal, [right]) and for levels
  >= 1 (keys: left, [right]) with the overlap correction applied.
  """
  nr, half = block_size, block_size // 2
  full = np.ones((nr, nr), bool)
  diag = np.tril(full) if causal else full
  # Overlap correction: pairs a finer level already covers.
  left = full.copy()
  left[:half, half:] = False
  right = full.copy()
  right[half:, :half] = False
  if causal:
    return np.concatenate([full, diag], 1), left
  return (np.concatenate([full, diag, full], 1),
          np.concatenate([left, right], 1))


_OFFSETS = {"left": -1, "self": 0, "right": 1}


def _dropout_multiplier(drop, nb, nr, neighbours):
  """[B, H, nb, Nr, K] attention-dropout multipliers of a level's weights
  (``drop``: the level's uint32 seeds [B, H] and the rate)."""
  seeds, rate = drop
  blk = np.arange(nb)[:, None, None]
  rows = blk * nr + np.arange(nr)[None, :, None]
  keys = np.concatenate([(blk + _OFFSETS[n]) * nr + np.arange(nr)[None, None]
                         for n in neighbours], axis=2)
  return dropout_lib.multiplier(seeds[:, :, None, None, None],
                                jnp.asarray(dropout_lib.indices_u32(rows)),
                                jnp.asarray(dropout_lib.indices_u32(keys)),
                                rate)


def _level(q, k, v, c, structure, neighbours, scale, compute_dtype,
           acc_dtype, drop=None):
  """Blockwise attention of one level against its neighbouring key blocks.

  Args:
    q: [B, H, nb, Nr, D] queries of this level.
    k, v: [B, H, nb, Nr, D] / [.., Dv] keys and mean values of this level.
    c: [B, H, nb, Nr] real-token counts of the keys (acc_dtype).
    structure: static bool [Nr, K] mask over the concatenated key slots.
    neighbours: which key blocks to use, e.g. ("left", "self", "right").
    scale: logit scale.
    compute_dtype: dtype of the matmul operands.
    acc_dtype: accumulation dtype (float32, or float64 for float64 inputs).
    drop: None, or (the level's uint32 seeds [B, H], rate): attention
      dropout on the numerator's weights (``dropout.py``).

  Returns:
    y: [B, H, nb, Nr, Dv] unnormalised numerator, relative to ``m``.
    z: [B, H, nb, Nr] normaliser, relative to ``m``.
    m: [B, H, nb, Nr] per-row max of the visible logits (no gradient).
  """
  def gather(x):
    parts = [x if n == "self" else _shift_blocks(x, n) for n in neighbours]
    return jnp.concatenate(parts, axis=3)

  ks, vs, cs = gather(k), gather(v), gather(c)
  s = jnp.einsum("bhnqd,bhnkd->bhnqk", q, ks,
                 preferred_element_type=acc_dtype) * scale
  visible = jnp.asarray(structure) & (cs > 0)[:, :, :, None, :]
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  # A row with no visible key takes the lowest finite value as its max:
  # finite, so that rescaling factors exp(m - M) are never NaN, and below
  # every real logit, so that it never outweighs a level that has keys
  # (a constant such as -1e30 would, for rows whose logits all sit below it).
  no_key = jnp.finfo(acc_dtype).min
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, no_key))
  p = jnp.exp(s - m[..., None]) * cs[:, :, :, None, :]
  z = jnp.sum(p, axis=-1)
  if drop is not None:
    p = p * _dropout_multiplier(drop, q.shape[2], q.shape[3], neighbours)
  top = None
  if compute_dtype == jnp.float16:
    # A weight is up to its key's count (2**l tokens, over 1/(1 - rate) with
    # dropout): past float16's 65,504 in long sequences. It goes into the
    # product relative to its row's largest, which multiplies back after.
    top = jax.lax.stop_gradient(jnp.max(p, axis=-1, keepdims=True))
    top = jnp.where(top > 0, top, 1.0)
    p = p / top
  y = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(compute_dtype), vs,
                 preferred_element_type=acc_dtype)
  if top is not None:
    y = y * top
  return y, z, m


# Jitted, so that a call outside jit (eager) compiles once per shape rather
# than once per operation; inside a caller's jit it is inlined.
@functools.partial(jax.jit,
                   static_argnames=("block_size", "causal", "dropout_rate"))
def hierarchical_attention_xla(query, key, value, valid, *, block_size,
                               causal, dropout_rate=0.0, dropout_seeds=None):
  """Core on validated inputs.

  Args:
    query, key: [B, L, H, D]; value: [B, L, H, Dv].
    valid: bool [B, L], True for real tokens.
    block_size: even block size Nr >= 2.
    causal: causal attention.
    dropout_rate: attention dropout rate (0: none).
    dropout_seeds: uint32 [B, H] (``dropout.head_seeds``) when
      ``dropout_rate > 0``.

  Returns:
    [B, L, H, Dv] in the query dtype, zero at positions where ``valid`` is
    False.
  """
  batch, length, heads, dim = query.shape
  out_dtype = query.dtype
  # All three: a key of a wider dtype than q and v (float32 keys of
  # magnitudes float16 cannot hold) is not rounded into inf.
  compute_dtype = jnp.promote_types(
      jnp.promote_types(query.dtype, key.dtype), value.dtype)
  # float32 accumulation at least (bfloat16 inputs), float64 for float64.
  acc_dtype = jnp.promote_types(compute_dtype, jnp.float32)
  scale = 1.0 / math.sqrt(dim)
  lp = padded_length(length, block_size)
  levels = num_levels(length, block_size)
  nr = block_size

  def prep(x):  # [B, L, H, D] -> [B, H, Lp, D], padding zeroed.
    x = jnp.where(valid[:, :, None, None], x, 0)
    x = jnp.transpose(x, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, lp - length), (0, 0)))

  q, k, v = prep(query), prep(key), prep(value)
  count = jnp.pad(valid.astype(acc_dtype), ((0, 0), (0, lp - length)))
  count = jnp.broadcast_to(count[:, None], (batch, heads, lp))

  struct0, struct_coarse = _structure_masks(nr, causal)
  near = ("left", "self") if causal else ("left", "self", "right")
  far = ("left",) if causal else ("left", "right")

  # Pyramid, fine to coarse. Sums are carried in acc_dtype; the per-level
  # matmul operands are cast back to the compute dtype.
  q_sum, k_sum, v_sum = (x.astype(acc_dtype) for x in (q, k, v))
  results = []
  for level in range(levels):
    n = lp >> level
    nb = n // nr
    if level == 0:
      q_l, k_l, v_l = q, k, v
    else:
      if causal:
        # The query of the group's first real token (the second of a pair
        # whose first has none): no future token leaks in. Taken from the
        # pairs' axis, not as a strided slice [::2]: XLA's GPU compiler
        # aborts on strided slices feeding its Triton matmul fusions when
        # batch x heads is 1 (tests/test_gpu.py).
        pairs = q_sum.reshape(batch, heads, n, 2, *q_sum.shape[3:])
        first_real = count.reshape(batch, heads, n, 2)[:, :, :, 0] > 0
        q_sum = jnp.where(first_real[..., None], pairs[:, :, :, 0],
                          pairs[:, :, :, 1])
      else:
        q_sum = _halve_sum(q_sum)
      k_sum, v_sum = _halve_sum(k_sum), _halve_sum(v_sum)
      count = _halve_sum(count)
      q_l = (q_sum if causal else _masked_mean(q_sum, count)).astype(
          compute_dtype)
      k_l = _masked_mean(k_sum, count).astype(compute_dtype)
      v_l = _masked_mean(v_sum, count).astype(compute_dtype)
    blocks = lambda x: x.reshape(batch, heads, nb, nr, *x.shape[3:])
    drop = None
    if dropout_rate > 0:
      drop = (dropout_lib.level_seed(dropout_seeds, level), dropout_rate)
    y, z, m = _level(blocks(q_l), blocks(k_l), blocks(v_l), blocks(count),
                     struct0 if level == 0 else struct_coarse,
                     near if level == 0 else far, scale, compute_dtype,
                     acc_dtype, drop)
    results.append((y.reshape(batch, heads, n, -1), z.reshape(batch, heads, n),
                    m.reshape(batch, heads, n)))

  # Coarse to fine: prolong the parent (each coarse row to its two children)
  # and merge with a shared per-row max.
  y, z, m = results[-1]
  for y_l, z_l, m_l in reversed(results[:-1]):
    n = m_l.shape[-1]
    pair = lambda x: x.reshape(batch, heads, n // 2, 2, *x.shape[3:])
    y_l, z_l, m_l = pair(y_l), pair(z_l), pair(m_l)
    y, z, m = y[:, :, :, None], z[:, :, :, None], m[:, :, :, None]
    m_new = jnp.maximum(m_l, m)
    a, b = jnp.exp(m_l - m_new), jnp.exp(m - m_new)
    y = (y_l * a[..., None] + y * b[..., None]).reshape(batch, heads, n, -1)
    z = (z_l * a + z * b).reshape(batch, heads, n)
    m = m_new.reshape(batch, heads, n)

  out = y / jnp.where(z > 0, z, 1.0)[..., None]
  out = jnp.transpose(out[:, :, :length], (0, 2, 1, 3))
  out = jnp.where(valid[:, :, None, None], out, 0)
  return out.astype(out_dtype)
