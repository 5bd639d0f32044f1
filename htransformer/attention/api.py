"""Public attention functions: hierarchical attention and the full baseline.

Both take the layout of ``jax.nn.dot_product_attention``:
``[batch, length, heads, head_dim]`` for query, key and value (value may have
its own head dim) and an optional boolean ``mask`` of shape
``[batch, length]``, True for real tokens. Outputs at padded positions are
zero. Logits are scaled by ``1/sqrt(head_dim)``.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from htransformer.attention import dropout as dropout_lib
from htransformer.attention import hierarchical
from htransformer.attention import kernels

HIERARCHICAL_IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")
FULL_IMPLEMENTATIONS = ("xla", "cudnn")
_CUDNN_LENGTH_MULTIPLE = 64


def cudnn_padded_length(length: int) -> int:
  """The length full attention runs cuDNN at: ``length`` rounded up to a
  multiple of 64 (its fused kernels take only some lengths, e.g. not 2001)."""
  return -(-length // _CUDNN_LENGTH_MULTIPLE) * _CUDNN_LENGTH_MULTIPLE


def _backend() -> str:
  """The platform JAX runs on ("cpu", "gpu", ...): the one place this module
  asks, so that tests can pretend to run elsewhere."""
  return jax.default_backend()


def _check_inputs(query, key, value, mask):
  """Validates shapes and the mask; returns the bool mask [B, L] (or None)."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not hasattr(x, "dtype"):
      raise TypeError(
          f"{name} must be an array (JAX or numpy) [batch, length, heads, "
          f"head_dim], got {type(x).__name__}.")
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, length, heads, head_dim], got "
          f"shape {getattr(x, 'shape', None)}.")
  if query.shape != key.shape:
    raise ValueError(
        f"query and key must have the same shape, got query {query.shape} "
        f"and key {key.shape}.")
  if value.shape[:3] != query.shape[:3]:
    raise ValueError(
        f"value must match query in [batch, length, heads], got value "
        f"{value.shape} and query {query.shape}.")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}.")
  if query.shape[1] < 1:
    raise ValueError("query length must be at least 1.")
  if query.shape[-1] < 1:
    raise ValueError(
        f"head_dim (the last dim of query and key) must be >= 1, got query "
        f"{query.shape}.")
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f"mask must be boolean (True for real tokens), got dtype {mask.dtype}.")
  if mask.shape != query.shape[:2]:
    raise ValueError(
        f"mask must have shape [batch, length] = {query.shape[:2]}, got "
        f"{mask.shape}.")
  return mask


def _describe(x) -> str:
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return f"{type(x).__name__} of dtype {x.dtype} and shape {x.shape}"
  text = repr(x)
  return text if len(text) <= 80 else text[:77] + "..."


def _check_rng(rng):
  """Raises unless ``rng`` is one JAX PRNG key, typed (``jax.random.key``)
  or raw (``jax.random.PRNGKey``, uint32)."""
  dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
  if dtype is not None and shape is not None:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if shape == ():
        return
    elif (dtype == jnp.uint32 and shape
          == jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape):
      return
  raise TypeError(
      "dropout_rng must be one JAX PRNG key (jax.random.key(seed) or "
      f"jax.random.PRNGKey(seed)), got {_describe(rng)}.")


def _dropout_seeds(rate, rng, query):
  """(rate, uint32 seeds [B, H] or None) of a call's attention dropout."""
  if isinstance(rate, jax.core.Tracer):
    raise ValueError(
        "dropout_rate must be a static Python float, got a traced value "
        f"({_describe(rate)}): mark it static (jax.jit's static_argnames) or "
        "close over it.")
  rate = dropout_lib.check_rate(rate)
  if rng is not None:
    _check_rng(rng)
  if rate == 0.0:
    return rate, None
  if rng is None:
    raise ValueError(
        f"dropout_rate={rate} needs dropout_rng (a JAX PRNG key); pass "
        "dropout_rate=0.0 for none (e.g. at evaluation).")
  batch, _, heads, _ = query.shape
  return rate, dropout_lib.head_seeds(dropout_lib.seed_from_key(rng), batch,
                                      heads)


def _check_block_size(block_size) -> int:
  """``block_size`` as a Python int: anything ``operator.index`` takes (an
  int, a numpy or concrete 0-d JAX integer), but a bool; even, >= 2."""
  if isinstance(block_size, jax.core.Tracer):
    raise ValueError(
        "block_size must be a static integer (it sets the shapes), got a "
        f"traced value ({_describe(block_size)}): mark it static "
        "(jax.jit's static_argnames) or close over it.")
  size = None
  if not isinstance(block_size, (bool, np.bool_)):
    try:
      size = operator.index(block_size)
    except TypeError:
      pass
  if size is None or size < 2 or size % 2:
    raise ValueError(
        f"block_size must be an even integer >= 2, got {block_size!r}.")
  return size


def _check_implementation(implementation, allowed):
  if implementation not in allowed:
    raise ValueError(
        f"implementation must be one of {allowed} or None, got "
        f"{implementation!r}.")


def check_settings(attention: str, *, block_size=16, causal=False,
                   implementation=None) -> tuple[int | None, bool]:
  """An attention layer's settings checked before its first call.

  ``attention``: "hierarchical" (block_size, causal, implementation as
  ``hierarchical_attention`` takes them) or "full" (``full_attention``'s;
  block_size unused). Returns (block_size as an int, or None for "full";
  causal as a bool); raises the errors the call would raise."""
  causal = _check_causal(causal)
  if attention == "full":
    if implementation is not None:
      _check_implementation(implementation, FULL_IMPLEMENTATIONS)
    return None, causal
  if implementation is not None:
    _check_implementation(implementation, HIERARCHICAL_IMPLEMENTATIONS)
  size = _check_block_size(block_size)
  reason = kernels.block_size_unsupported(size)
  if implementation in ("pallas", "pallas_interpret") and reason:
    # The kernels' refusal at every length (_fitting_block_size keeps it).
    raise kernels.cannot_run(implementation, reason)
  return size, causal


def _check_causal(causal) -> bool:
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(
        f"causal must be a bool (static), got {_describe(causal)}.")
  return bool(causal)


def _fitting_block_size(block_size: int, length: int,
                        implementation: str) -> int:
  """The smallest block size that gives the same output as ``block_size``.

  When ``2 * block_size >= length`` the padded sequence is two blocks and
  the output is full attention (dropout included: level 0 draws per token
  pair), as with any block size that holds the sequence in two blocks: the
  smallest even one for "xla"; for the kernels the smallest power of two
  >= 16 (and only when ``block_size`` itself is one: otherwise their
  error stands). Longer sequences keep ``block_size``.
  """
  if 2 * block_size < length:
    return block_size
  smallest = max(2, 2 * -(-length // 4))  # Even, 2 * smallest >= length.
  if implementation != "xla":
    if kernels.block_size_unsupported(block_size):
      return block_size
    smallest = max(16, 1 << (smallest - 1).bit_length())
  return min(block_size, smallest)


def _empty_output(query, value, dtype):
  """The output of a call with batch or heads 0: [B, L, H, Dv], no
  elements."""
  return jnp.zeros(query.shape[:3] + value.shape[-1:], dtype)


def _out_dtype(dtype):
  """``dtype`` as JAX holds it (float64 is float32 unless x64 is on)."""
  return jax.dtypes.canonicalize_dtype(dtype)


def hierarchical_attention(query, key, value, *, block_size: int = 16,
                           causal: bool = False, mask=None,
                           implementation: str | None = None,
                           dropout_rate: float = 0.0, dropout_rng=None):
  """H-Transformer-1D attention, exact to the definition in the docs.

  Args:
    query: [batch, length, heads, head_dim].
    key: [batch, length, heads, head_dim].
    value: [batch, length, heads, value_dim].
    block_size: the block size Nr (the paper's numerical rank); even, >= 2;
      a static integer (a Python int or anything ``operator.index`` takes,
      not a bool). Pairs of tokens within about ``block_size`` of each
      other interact exactly; with ``block_size >= padded_length / 2``
      this is full attention. A block size of at least half the length
      runs as the smallest one that gives the same output (the smallest
      even one >= length / 2 on "xla"; for the kernels also a power of
      two >= 16), so a large one costs no memory.
    causal: a bool. If True, position i attends only to positions <= i,
      and coarse queries are the first token of their group (the first
      real one, where the mask leaves holes), so nothing leaks from the
      future.
    mask: optional bool [batch, length], True for real tokens.
    implementation: None picks the best available path: the fused Pallas
      kernels on a GPU for 16-bit inputs they support (block_size a power
      of two >= 16; head dims that are not powers of two >= 16 are
      zero-padded to one, which is faster than "xla" even at head_dim 4),
      "xla" otherwise.
      "xla" is the reshape-based plain-JAX path (its products take JAX's
      default matmul precision: TF32 for float32 on recent NVIDIA GPUs
      unless ``jax_default_matmul_precision`` says "highest"); "pallas"
      the fused kernels (GPU; float32 inputs use full-precision float32
      products);
      "pallas_interpret" the same kernels in Pallas interpret mode, on any
      backend (slow; for tests).
    dropout_rate: attention dropout on the weights (0: none), a static
      Python float (not traced): each weight of the hierarchical matrix (a
      token pair at level 0, a coarse query and key farther out) is dropped
      with this probability in the numerator and the kept ones scaled by
      1/(1 - rate); the normaliser keeps all. The same weights are dropped
      by every implementation, as ``htransformer/attention/dropout.py``
      defines.
    dropout_rng: one JAX PRNG key (``jax.random.key`` or
      ``jax.random.PRNGKey``); required when ``dropout_rate > 0``.

  Returns:
    [batch, length, heads, value_dim] in the query dtype; zero at masked
    positions (empty when batch or heads is 0).
  """
  block_size = _check_block_size(block_size)
  causal = _check_causal(causal)
  mask = _check_inputs(query, key, value, mask)
  # As JAX holds them: numpy float64 is float32 unless x64 is on.
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  rate, seeds = _dropout_seeds(dropout_rate, dropout_rng, query)
  if implementation is None:
    implementation = _default_hierarchical(query, value, block_size, key)
  _check_implementation(implementation, HIERARCHICAL_IMPLEMENTATIONS)
  if implementation == "pallas" and (missing := kernels.triton_missing()):
    raise ValueError(
        f"implementation='pallas' cannot run: {missing}. Use 'xla' (or "
        "None, which then picks it), or a jax that has the backend.")
  if implementation == "pallas" and _backend() != "gpu":
    raise ValueError(
        f"implementation='pallas' runs on a GPU; this process runs on "
        f"{_backend()!r}. Use 'xla', or 'pallas_interpret' (the "
        "same kernels, interpreted; slow).")
  if 0 in (query.shape[0], query.shape[2]):
    return _empty_output(query, value, _out_dtype(query.dtype))
  block_size = _fitting_block_size(block_size, query.shape[1], implementation)
  if implementation.startswith("pallas"):
    run = lambda q, k, v, m, s=None: kernels.hierarchical_attention_pallas(
        q, k, v, m, block_size=block_size, causal=causal,
        interpret=implementation == "pallas_interpret", dropout_rate=rate,
        dropout_seeds=s)
    return _per_device(run, query, key, value, mask, seeds)
  if mask is None:
    mask = jnp.ones(query.shape[:2], jnp.bool_)
  return hierarchical.hierarchical_attention_xla(
      query, key, value, mask, block_size=block_size, causal=causal,
      dropout_rate=rate, dropout_seeds=seeds)


# Mesh axes that split the batch and the heads of the fused kernels' inputs
# when these carry a mesh with automatic axes (the trainer's "data" and
# "model"); axes not in the mesh, or not dividing the dimension, are left out.
BATCH_AXES = ("data",)
HEAD_AXES = ("model",)


def _split_axes(mesh, names, size):
  manual = _manual_axes(mesh)
  axes = []
  for name in names:
    if name in mesh.axis_names and name not in manual:
      n = mesh.shape[name]
      if size % (n * math.prod(mesh.shape[a] for a in axes)) == 0:
        axes.append(name)
  return tuple(axes) or None


def _manual_axes(mesh):
  """The mesh axes a caller's ``shard_map`` already splits (Manual)."""
  return {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
          if kind == jax.sharding.AxisType.Manual}


def _per_device(run, query, key, value, mask, seeds=None):
  """``run(q, k, v, mask)`` on each device's share of a sharded batch, or
  ``run(q, k, v, mask, seeds)`` with ``seeds``, the per-(batch row, head)
  dropout seeds [B, H] (split with the batch: each device drops the same
  weights as an unsplit call would).

  A Pallas kernel is one opaque call: on inputs sharded over a mesh, the
  compiler would gather every device's rows and compute the whole batch on
  each device. Batch and heads are independent, so ``shard_map`` runs the
  kernels on each device's batch rows and heads instead: split as the
  inputs' explicit sharding says, or with automatic mesh axes over
  ``BATCH_AXES`` and ``HEAD_AXES``. Length and head_dim stay whole. Inside
  a caller's ``shard_map`` the inputs are already each device's share over
  its (Manual) axes: those are not split again.
  """
  sharding = getattr(jax.typeof(query), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  extra = () if seeds is None else (seeds,)
  if (mesh is None or mesh.empty or mesh.size == 1
      or len(_manual_axes(mesh)) == len(mesh.axis_names)):
    return run(query, key, value, mask, *extra)
  batch, _, heads, _ = query.shape
  explicit = any(t == jax.sharding.AxisType.Explicit
                 for t in mesh.axis_types)
  if explicit:
    spec = tuple(sharding.spec) + (None,) * 4
    b_axes, h_axes = spec[0], spec[2]
  else:
    b_axes = _split_axes(mesh, BATCH_AXES, batch)
    h_axes = _split_axes(mesh, HEAD_AXES, heads)
  rows = P(b_axes, None, h_axes, None)
  if mask is None:
    mask = jnp.ones((batch, query.shape[1]), jnp.bool_)
  specs = (rows, rows, rows, P(b_axes, None)) + (P(b_axes, h_axes),) * len(
      extra)
  args = (query, key, value, mask) + extra
  if explicit:
    args = tuple(jax.sharding.reshard(
        x, jax.sharding.NamedSharding(mesh, spec))
                 for x, spec in zip(args, specs))
  return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=rows,
                       check_vma=False)(*args)


def _default_hierarchical(query, value, block_size, key=None) -> str:
  """"pallas" for 16-bit inputs of one dtype the kernels take on a GPU."""
  key = query if key is None else key
  if (_backend() == "gpu"
      and query.dtype in (jnp.bfloat16, jnp.float16)
      and value.dtype == query.dtype and key.dtype == query.dtype
      and kernels.unsupported_reason(query, value, block_size) is None):
    missing = kernels.triton_missing()
    if missing is None:
      return "pallas"
    warnings.warn(f"hierarchical_attention runs the plain-JAX path, not the "
                  f"fused kernels: {missing}.", RuntimeWarning, stacklevel=3)
  return "xla"


def _cudnn_supported(query, value) -> bool:
  if _backend() != "gpu":
    return False
  if query.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  if value.dtype != query.dtype:
    return False
  d, dv = query.shape[-1], value.shape[-1]
  return d == dv and cudnn_head_dim(d) <= 128


def cudnn_head_dim(d: int) -> int:
  """The head width full attention runs cuDNN at: ``d`` rounded up to a
  multiple of 8 (zero columns change no logit; the scale stays
  1/sqrt(d))."""
  return -(-d // 8) * 8


def full_attention(query, key, value, *, causal: bool = False, mask=None,
                   implementation: str | None = None,
                   dropout_rate: float = 0.0, dropout_rng=None):
  """Full softmax attention: the baseline, via jax.nn.dot_product_attention.

  Same arguments and layout as :func:`hierarchical_attention`, minus
  ``block_size``. ``implementation=None`` uses cuDNN's fused attention on
  GPU when dtype and shapes allow it (16-bit, head_dim == value_dim, at
  most 128 once rounded up to the multiple of 8 cuDNN takes), XLA
  otherwise. With cuDNN, a ``mask`` that is suffix padding in every row is
  passed as per-row key lengths; any other mask (checked on the device,
  each call) masks keys through one extra head column instead
  (:func:`_mask_keys_by_column`), or runs XLA where that column would take
  the head past cuDNN's 128.

  ``dropout_rate`` / ``dropout_rng``: attention dropout as in
  :func:`hierarchical_attention` (every pair drawn at level 0). cuDNN's
  path has none, so ``implementation=None`` runs XLA when
  ``dropout_rate > 0``.

  Query, key and value of different float dtypes are promoted to a common
  one; the output is in the query dtype, zero at masked positions (whatever
  the inputs hold there, NaN included), empty when batch or heads is 0.
  """
  causal = _check_causal(causal)
  mask = _check_inputs(query, key, value, mask)
  rate, seeds = _dropout_seeds(dropout_rate, dropout_rng, query)
  out_dtype = _out_dtype(query.dtype)
  dtype = _out_dtype(jnp.promote_types(
      jnp.promote_types(query.dtype, key.dtype), value.dtype))
  query, key, value = (jnp.asarray(x).astype(dtype)
                       for x in (query, key, value))
  if implementation is None:
    implementation = ("cudnn" if _cudnn_supported(query, value) and not rate
                      else "xla")
  _check_implementation(implementation, FULL_IMPLEMENTATIONS)
  if implementation == "cudnn" and rate:
    raise ValueError(
        "implementation='cudnn' has no attention dropout; use "
        "implementation=None or 'xla' with dropout_rate > 0.")
  if 0 in (query.shape[0], query.shape[2]):
    return _empty_output(query, value, out_dtype)
  if mask is not None:
    # Padding's contents must not reach the output or the gradients (a NaN
    # there times its weight 0 is NaN): zeros instead, by a select, whose
    # gradient is 0 there too.
    real = mask[:, :, None, None]
    query, key, value = (jnp.where(real, x, 0) for x in (query, key, value))
  if rate:
    out = _xla(query, key, value, causal, mask, dropout=(rate, seeds))
  elif implementation == "cudnn":
    if value.shape[-1] != query.shape[-1]:
      raise ValueError("implementation='cudnn' needs value_dim == head_dim.")
    if mask is None:
      out = _cudnn(query, key, value, causal, None)
    else:
      # Per device (as the fused kernels): the check below is a branch, and
      # a branch over a batch sharded by the compiler gathers the batch.
      out = _per_device(functools.partial(_cudnn_masked, causal=causal),
                        query, key, value, mask)
  else:
    out = _xla(query, key, value, causal, mask)
  if mask is not None:
    out = jnp.where(mask[:, :, None, None], out, 0)
  return out.astype(out_dtype)


def _cudnn_masked(query, key, value, mask, *, causal):
  """cuDNN with a mask: by key lengths when the mask is suffix padding in
  every row (checked on the device), else by the key column below (or XLA
  where that column would take the head past cuDNN's 128)."""
  length, d = query.shape[1], query.shape[-1]
  lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  suffix = jnp.all(mask == (jnp.arange(length) < lengths[:, None]))
  if cudnn_head_dim(d + 1) <= 128:
    other = lambda q, k, v, m: _cudnn(
        *_mask_keys_by_column(q, k, v, m), causal, None,
        scale_dim=d)[..., :d]
  else:
    other = lambda q, k, v, m: _xla(q, k, v, causal, m)
  return jax.lax.cond(
      suffix, lambda q, k, v, m: _cudnn(q, k, v, causal, lengths), other,
      query, key, value, mask)


# A key that _mask_keys_by_column masks gets this much added to its logit
# before the scale 1/sqrt(d): at least -2,650 after it for d <= 128, so
# exp underflows to exactly 0 in float32; small enough for float16.
_MASKED_KEY_LOGIT = -30000.0


def _mask_keys_by_column(query, key, value, mask):
  """Masks keys without a mask argument: one more head column, 1 in every
  query, 0 in real keys and ``_MASKED_KEY_LOGIT`` in masked ones (0 in
  values). Real keys' logits are unchanged (the products with the new
  column are exact zeros); masked keys' softmax weights are exactly 0, and
  so are their gradients. The caller keeps the scale of the original head
  dim. Rows with no real key at all are the caller's to zero."""
  ones = jnp.ones(query.shape[:3] + (1,), query.dtype)
  col = jnp.where(mask, 0.0, _MASKED_KEY_LOGIT).astype(key.dtype)
  col = jnp.broadcast_to(col[:, :, None, None], key.shape[:3] + (1,))
  zeros = jnp.zeros(value.shape[:3] + (1,), value.dtype)
  return (jnp.concatenate([query, ones], -1),
          jnp.concatenate([key, col], -1),
          jnp.concatenate([value, zeros], -1))


def _cudnn(query, key, value, causal, lengths, scale_dim=None):
  """cuDNN fused attention, padded to the lengths and head widths it takes
  (lengths to a multiple of 64, masked by key length; heads to a multiple of
  8 with zeros, which change no logit). ``lengths``: per-row key lengths or
  None. The scale is ``1/sqrt(scale_dim or head_dim)``."""
  if _backend() != "gpu":
    raise ValueError(
        f"implementation='cudnn' runs on a GPU; this process runs on "
        f"{_backend()!r}. Use 'xla' (or None, which picks it).")
  batch, length, _, d = query.shape
  padded = cudnn_padded_length(length)
  if lengths is None and padded != length:
    lengths = jnp.full((batch,), length, jnp.int32)
  width = cudnn_head_dim(d)
  pad = lambda x: jnp.pad(
      x, ((0, 0), (0, padded - length), (0, 0), (0, width - d)))
  return jax.nn.dot_product_attention(
      pad(query), pad(key), pad(value), is_causal=causal,
      key_value_seq_lengths=lengths,
      scale=1.0 / math.sqrt(scale_dim or d),
      implementation="cudnn")[:, :length, :, :d]


# The most logits (batch x heads x queries x keys) the XLA path of full
# attention holds at once, on CPU and on accelerators: longer inputs go
# through in chunks of queries, each recomputed in the backward pass, so
# memory stays bounded. (Dense, Path-X's 16,384 tokens at batch 8 and 2
# heads are 4.3G logits, 17 GB in float32, before the probabilities and
# their gradient; in chunks its fwd+bwd peaks near 3 GB on CPU.)
XLA_MAX_LOGITS = 1 << 26
XLA_MAX_LOGITS_ACCELERATOR = 1 << 30


def _xla_max_logits():
  return (XLA_MAX_LOGITS if _backend() == "cpu"
          else XLA_MAX_LOGITS_ACCELERATOR)


def _xla(query, key, value, causal, mask, scale_dim=None, dropout=None):
  """XLA attention. jax.nn.dot_product_attention wants one head dim for q, k
  and v: the narrower ones are padded with zeros (which changes no logit)
  and the output sliced. The scale is ``1/sqrt(scale_dim or head_dim)``.
  Above ``XLA_MAX_LOGITS`` logits (``XLA_MAX_LOGITS_ACCELERATOR`` off the
  CPU) it runs in chunks of queries.
  ``dropout``: None or (rate, uint32 seeds [B, H]), attention dropout
  (then the softmax is written out here: jax.nn's has none)."""
  d, dv = query.shape[-1], value.shape[-1]
  width = max(d, dv)
  widen = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),))
  query, key, value = widen(query), widen(key), widen(value)
  scale = 1.0 / math.sqrt(scale_dim or d)
  batch, length, heads, _ = query.shape
  limit = _xla_max_logits()
  # With dropout the softmax is written out below, in one chunk of queries
  # when they fit.
  if dropout is not None or batch * heads * length * length > limit:
    return _xla_chunked(query, key, value, causal, mask, scale,
                        limit, dropout)[..., :dv]
  attn_mask = None if mask is None else mask[:, None, None, :]
  return jax.nn.dot_product_attention(
      query, key, value, mask=attn_mask, is_causal=causal, scale=scale,
      implementation="xla")[..., :dv]


def _dense_dropout(query, key, value, ok, rows, scale, dropout):
  """Softmax attention of the queries ``rows`` (a chunk) to every key where
  ``ok`` [B|1, 1, n, L], with attention dropout ``(rate, seeds)`` on the
  numerator's weights (level 0 of ``dropout.py`` for every pair)."""
  rate, seeds = dropout
  length = key.shape[1]
  acc = jnp.promote_types(query.dtype, jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                 preferred_element_type=acc) * scale
  s = jnp.where(ok, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  z = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(z > 0, z, 1.0)
  keep = dropout_lib.multiplier(
      dropout_lib.level_seed(seeds, 0)[:, :, None, None],
      rows.astype(jnp.uint32)[:, None],
      jnp.arange(length, dtype=jnp.uint32)[None, :], rate)
  out = jnp.einsum("bhqk,bkhd->bqhd", (p * keep).astype(value.dtype), value,
                   preferred_element_type=acc)
  return out.astype(query.dtype)


def _xla_chunked(query, key, value, causal, mask, scale, limit,
                 dropout=None):
  """:func:`_xla` over chunks of queries (``lax.map``) of at most ``limit``
  logits, each attending to every key under the same masks (and
  ``dropout``, see :func:`_dense_dropout`); ``jax.checkpoint`` keeps the
  backward pass from storing every chunk's probabilities."""
  batch, length, heads, width = query.shape
  chunk = max(1, min(length, limit // (batch * heads * length)))
  num = -(-length // chunk)
  padded = jnp.pad(query, ((0, 0), (0, num * chunk - length), (0, 0), (0, 0)))
  chunks = padded.reshape(batch, num, chunk, heads, width).swapaxes(0, 1)
  keys_ok = (jnp.ones((batch, length), bool) if mask is None
             else mask)[:, None, None, :]
  positions = jnp.arange(length)

  @jax.checkpoint
  def attend(args):
    q, start = args
    rows = start + jnp.arange(chunk)
    ok = keys_ok
    if causal:
      ok = ok & (positions[None, :] <= rows[:, None])[None, None]
    if dropout is not None:
      return _dense_dropout(q, key, value, ok, rows, scale, dropout)
    return jax.nn.dot_product_attention(q, key, value, mask=ok, scale=scale,
                                        implementation="xla")

  out = jax.lax.map(attend, (chunks, jnp.arange(num) * chunk))
  return out.swapaxes(0, 1).reshape(batch, num * chunk, heads, width)[
      :, :length]
