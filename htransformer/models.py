"""Transformer models (Flax NNX) with hierarchical or full attention.

``Classifier`` (encoder + pooling + MLP head) for sequence classification,
``Decoder`` (causal, untied output projection) for language modelling.

The attention in every model is chosen by one argument, ``attention``:
``"hierarchical"`` (H-Transformer-1D, with ``block_size``) or ``"full"``
(softmax attention, cuDNN on GPU). Models hold only parameters; dropout
randomness is passed at call time (``rngs``), so a training step is a pure
function of (parameters, batch, step).

Dropout is on in calls with ``deterministic=False`` and off with ``True``;
a call that does not say follows the model's nnx mode: off when built and
after ``model.eval()``, on after ``model.train()`` (the call then needs
``rngs``).

Parameters carry sharding annotations over a ``model`` mesh axis
(Megatron-style): the q/k/v projections and the MLP's first layer are split
along their outputs (attention heads, hidden units), the attention output
projection and the MLP's second layer along their inputs; everything else is
replicated. The annotations are metadata only (``eager_sharding=False``): the
models run anywhere without a mesh, and ``train.py`` places the parameters
with ``nnx.get_named_sharding``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from htransformer.attention import cudnn_padded_length
from htransformer.attention.api import check_settings as check_attention_settings
from htransformer.attention import dropout as dropout_lib
from htransformer.attention import full_attention
from htransformer.attention import hierarchical_attention
from htransformer.attention import padded_length

ATTENTION_KINDS = ("hierarchical", "full")
POOLING = ("CLS", "MEAN")


def _dtype(dtype: Any):
  return jnp.dtype(dtype) if dtype is not None else jnp.float32


def _check_tokens(tokens, model: str, layout: str = "[batch, length]"):
  """Raises unless ``tokens`` is an integer array of ``layout``'s rank."""
  shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"{model} expects tokens as an integer array {layout}, "
                    f"got {type(tokens).__name__}.")
  if len(shape) != layout.count(",") + 1:
    raise ValueError(f"{model} expects tokens of shape {layout}, got "
                     f"{tuple(shape)}.")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{model} expects integer token ids, got dtype {dtype}.")


def _check_ids(tokens, vocab_size: int, model: str):
  """Raises if concrete ``tokens`` hold an id outside ``[0, vocab_size)``.

  An id outside the table would embed as a row of zeros, silently. Traced
  tokens (inside ``jax.jit``, as in the train loop, whose data the
  input pipeline checks) cannot be looked at and are let through, as are
  tokens partly on other processes' devices."""
  if (isinstance(tokens, jax.core.Tracer) or not tokens.size
      or not getattr(tokens, "is_fully_addressable", True)):
    return  # (Nor an array spread over other processes' devices.)
  ids = np.asarray(tokens)
  low, high = int(ids.min()), int(ids.max())
  if low < 0 or high >= vocab_size:
    bad = low if low < 0 else high
    raise ValueError(f"{model} got token id {bad}, outside its vocabulary "
                     f"(0..{vocab_size - 1}, vocab_size {vocab_size}).")


def _sharded(init, spec: tuple):
  """``init`` annotated with a PartitionSpec over the mesh axes (metadata)."""
  return nnx.with_partitioning(init, spec, eager_sharding=False)


# Column- and row-parallel kernels [in, out] over the "model" mesh axis.
SPLIT_OUT = (None, "model")
SPLIT_IN = ("model", None)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention: q, k, v projections (no bias) and an output one.

  Args:
    num_heads: number of heads.
    in_features: input width.
    qkv_features: total width of q, k and v (split over heads);
      defaults to ``in_features``.
    out_features: output width; defaults to ``in_features``.
    attention: ``"hierarchical"`` or ``"full"``.
    block_size: block size Nr of hierarchical attention.
    causal: causal attention.
    implementation: passed to the attention function (None: best available;
      "xla" for either, "cudnn" for full attention on GPU).
    dtype: computation dtype (parameters stay float32).
    dropout_rate: attention dropout on the attention weights (the
      attention functions' ``dropout_rate``), in training only; it draws
      from the ``rngs`` given at call time.
    deterministic: no dropout in calls that do not say (as ``nnx.Dropout``'s
      argument: ``.train()`` sets it False and ``.eval()`` True).

  The settings are checked here, not at the first call (which may be
  inside a jitted step).
  """

  def __init__(self, num_heads: int, in_features: int, *,
               qkv_features: int | None = None,
               out_features: int | None = None,
               attention: str = "hierarchical", block_size: int = 16,
               causal: bool = False, implementation: str | None = None,
               dtype: Any = None, dropout_rate: float = 0.0,
               deterministic: bool = True, rngs: nnx.Rngs):
    if attention not in ATTENTION_KINDS:
      raise ValueError(
          f"attention must be one of {ATTENTION_KINDS}, got {attention!r}.")
    for name, n in (("num_heads", num_heads), ("in_features", in_features),
                    ("qkv_features", qkv_features),
                    ("out_features", out_features)):
      if n is not None and (isinstance(n, (bool, np.bool_))
                            or not isinstance(n, (int, np.integer))
                            or n < 1):
        raise ValueError(f"{name} must be a positive integer, got {n!r}.")
    checked, causal = check_attention_settings(
        attention, block_size=block_size, causal=causal,
        implementation=implementation)
    qkv_features = qkv_features or in_features
    out_features = out_features or in_features
    if qkv_features % num_heads:
      raise ValueError(
          f"qkv_features ({qkv_features}) must be divisible by num_heads "
          f"({num_heads}).")
    self.num_heads = num_heads
    self.in_features = in_features
    self.head_dim = qkv_features // num_heads
    self.attention = attention
    self.block_size = block_size if checked is None else checked
    self.causal = causal
    self.implementation = implementation
    self.dtype = _dtype(dtype)
    self.dropout_rate = dropout_lib.check_rate(dropout_rate)
    self.deterministic = bool(deterministic)
    init = nnx.initializers.xavier_uniform()
    make = lambda i, o: nnx.Linear(i, o, use_bias=False,
                                   kernel_init=_sharded(init, SPLIT_OUT),
                                   dtype=self.dtype, rngs=rngs)
    self.query = make(in_features, qkv_features)
    self.key = make(in_features, qkv_features)
    self.value = make(in_features, qkv_features)
    self.out = nnx.Linear(qkv_features, out_features,
                          kernel_init=_sharded(init, SPLIT_IN),
                          dtype=self.dtype, rngs=rngs)

  def __call__(self, x, mask=None, *, deterministic=None, rngs=None):
    """x: [batch, length, in_features]; mask: bool [batch, length].

    ``deterministic``: None takes the layer's (``.train()`` / ``.eval()``).
    With ``dropout_rate > 0`` and dropout on, ``rngs`` gives the dropout
    key: an ``nnx.Rngs`` (its ``dropout`` stream), an ``nnx.RngStream``
    or a JAX PRNG key."""
    if deterministic is None:
      deterministic = self.deterministic
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.in_features:
      raise ValueError(
          f"MultiHeadAttention expects x of shape [batch, length, "
          f"{self.in_features}], got {getattr(x, 'shape', None)}.")
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    drop = dict(dropout_rate=0.0, dropout_rng=None)
    if self.dropout_rate and not deterministic:
      drop = dict(dropout_rate=self.dropout_rate,
                  dropout_rng=_dropout_key(rngs))
    if self.attention == "hierarchical":
      y = hierarchical_attention(q, k, v, block_size=self.block_size,
                                 causal=self.causal, mask=mask,
                                 implementation=self.implementation, **drop)
    else:
      y = full_attention(q, k, v, causal=self.causal, mask=mask,
                         implementation=self.implementation, **drop)
    return self.out(y.reshape(b, l, -1))


def _dropout_key(rngs):
  """The dropout key from an ``nnx.Rngs``, ``nnx.RngStream`` or a key."""
  if isinstance(rngs, nnx.Rngs):
    return rngs.dropout()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  if isinstance(rngs, jax.Array):
    return rngs  # The attention function checks that it is one key.
  raise ValueError(
      "MultiHeadAttention with dropout_rate > 0 and dropout on "
      "(deterministic=False, or .train()) needs rngs: an nnx.Rngs (its "
      "'dropout' stream), an nnx.RngStream or a JAX PRNG key; got "
      f"{type(rngs).__name__}.")


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """[length, dim] fixed sine/cosine position table."""
  pos = np.arange(length)[:, None]
  freq = np.exp(-math.log(10000.0) * np.arange(0, dim, 2) / dim)
  table = np.zeros((length, dim), np.float32)
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq)[:, : dim // 2]
  return table


class MlpBlock(nnx.Module):

  def __init__(self, dim: int, hidden: int, dropout_rate: float, dtype,
               rngs: nnx.Rngs):
    init = nnx.initializers.xavier_uniform()
    self.fc1 = nnx.Linear(dim, hidden, kernel_init=_sharded(init, SPLIT_OUT),
                          dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, kernel_init=_sharded(init, SPLIT_IN),
                          dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x, *, deterministic, rngs):
    x = nnx.gelu(self.fc1(x))
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    return self.fc2(x)


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm block: x + Attn(LN(x)); x + MLP(LN(x))."""

  def __init__(self, *, dim: int, num_heads: int, qkv_dim: int, mlp_dim: int,
               dropout_rate: float, attention: str, block_size: int,
               causal: bool, implementation: str | None, dtype,
               rngs: nnx.Rngs, attention_dropout_rate: float = 0.0):
    self.ln1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attn = MultiHeadAttention(
        num_heads, dim, qkv_features=qkv_dim, attention=attention,
        block_size=block_size, causal=causal, implementation=implementation,
        dtype=dtype, dropout_rate=attention_dropout_rate, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp = MlpBlock(dim, mlp_dim, dropout_rate, dtype, rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x, mask, *, deterministic, rngs):
    drop = lambda t: self.dropout(t, deterministic=deterministic, rngs=rngs)
    x = x + drop(self.attn(self.ln1(x), mask, deterministic=deterministic,
                           rngs=rngs))
    x = x + drop(self.mlp(self.ln2(x), deterministic=deterministic,
                          rngs=rngs))
    return x


# Vocabularies up to this size are embedded by a one-hot matrix product
# rather than a gather: the gather's gradient is a scatter-add of every
# token into a few rows (ListOps has 20, bytes 258), which accelerators
# serialise; the product's gradient is a matrix product. Same values.
ONE_HOT_MAX_VOCAB = 4096


def embed_tokens(embed: nnx.Embed, tokens):
  """``embed(tokens)``, by a one-hot product for small vocabularies."""
  table = embed.embedding[...]
  if table.shape[0] > ONE_HOT_MAX_VOCAB:
    return embed(tokens)
  dtype = embed.dtype or table.dtype
  one_hot = jax.nn.one_hot(tokens, table.shape[0], dtype=dtype)
  return jnp.dot(one_hot, table.astype(dtype),
                 precision=jax.lax.Precision.HIGHEST)


def _blocks(num_layers: int, **kwargs) -> nnx.List:
  """``num_layers`` TransformerBlocks with the same arguments."""
  return nnx.List([TransformerBlock(**kwargs) for _ in range(num_layers)])


class Encoder(nnx.Module):
  """Token embedding + positions + a stack of Transformer blocks.

  Token id 0 is padding. With ``pool="CLS"`` a learned CLS vector is
  prepended to the sequence.

  ``unattended_token`` (an id other than 0, or None) leaves that token out
  of attention, as query and as key: its rows take no attention output
  (their residual stream goes on through the MLPs) and no other row
  attends to them; unlike padding they are still pooled. The pixel tasks
  use it for black pixels (``model.mask_black_pixels``), which is what the
  original LRA code did, by treating pixel 0 as padding, when it measured
  its Pathfinder numbers. (There a row with every key masked attended
  uniformly to all rows; here such a row takes no attention output.)

  Rows are padded once, after the embedding, up to the length the
  attention computes at anyway (hierarchical: ``block_size * 2**m``; full:
  a multiple of 64, what cuDNN takes) when that adds at most 1/16 more
  rows (``pad_rows``): ListOps' 2,001 rows become 2,048 here instead of
  every layer's attention copying q, k and v into a padded buffer and its
  output out of one. The padding rows are masked as keys, so the real rows
  are unchanged; the output is cut back to the input's rows.
  """

  def __init__(self, *, vocab_size: int, max_len: int, emb_dim: int,
               num_layers: int, num_heads: int, qkv_dim: int, mlp_dim: int,
               dropout_rate: float = 0.1, attention: str = "hierarchical",
               block_size: int = 16, causal: bool = False,
               pool: str = "CLS", learned_positions: bool = False,
               implementation: str | None = None, dtype: Any = None,
               pad_rows: bool = True, unattended_token: int | None = None,
               attention_dropout_rate: float = 0.0, rngs: nnx.Rngs):
    if pool not in POOLING:
      raise ValueError(f"pool must be one of {POOLING}, got {pool!r}.")
    if causal and pool == "CLS":
      raise ValueError(
          "pool='CLS' cannot be causal: the CLS row comes first and would "
          "attend only to itself, never to the input; use pool='MEAN'.")
    if unattended_token is not None and not (
        0 < unattended_token < vocab_size):
      raise ValueError(
          f"unattended_token must be a token id in 1..{vocab_size - 1} "
          f"(0 is padding), got {unattended_token!r}.")
    self.unattended_token = unattended_token
    dtype = _dtype(dtype)
    self.dtype = dtype
    self.deterministic = True  # .train() sets it False, .eval() True.
    self.pool = pool
    self.max_len = max_len
    self.attention = attention
    self.block_size = block_size
    self.pad_rows = pad_rows
    self.embed = nnx.Embed(vocab_size, emb_dim, dtype=dtype,
                           embedding_init=nnx.initializers.normal(1.0),
                           rngs=rngs)
    total = max_len + (1 if pool == "CLS" else 0)
    self.learned_positions = learned_positions
    if learned_positions:
      self.positions = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (total, emb_dim)))
    if pool == "CLS":
      self.cls = nnx.Param(jnp.zeros((1, 1, emb_dim), jnp.float32))
    self.dropout = nnx.Dropout(dropout_rate)
    self.blocks = _blocks(
        num_layers, dim=emb_dim, num_heads=num_heads, qkv_dim=qkv_dim,
        mlp_dim=mlp_dim, dropout_rate=dropout_rate, attention=attention,
        block_size=block_size, causal=causal, implementation=implementation,
        dtype=dtype, attention_dropout_rate=attention_dropout_rate,
        rngs=rngs)
    self.ln = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)

  def __call__(self, tokens, *, deterministic=None, rngs=None):
    """tokens: int [batch, length] -> ([batch, length', dim], mask).

    ``deterministic``: None takes the model's (``.train()`` / ``.eval()``).
    """
    if deterministic is None:
      deterministic = self.deterministic
    _check_tokens(tokens, "Encoder")
    _check_ids(tokens, self.embed.num_embeddings, "Encoder")
    b, l = tokens.shape
    if l > self.max_len:
      raise ValueError(
          f"input length {l} exceeds the model's max_len {self.max_len}.")
    mask = tokens != 0
    x = embed_tokens(self.embed, tokens)
    if self.pool == "CLS":
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype),
                             (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
      mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    rows = x.shape[1]
    if self.learned_positions:
      pos = self.positions[...][:rows]
    else:
      pos = sinusoidal_positions(rows, x.shape[-1])
    x = x + jnp.asarray(pos).astype(x.dtype)
    extra = self.attention_rows(rows) - rows
    if extra:
      x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
      mask = jnp.pad(mask, ((0, 0), (0, extra)))
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    attend = mask
    if self.unattended_token is not None:
      skip = tokens == self.unattended_token
      front = rows - l  # the CLS row
      skip = jnp.pad(skip, ((0, 0), (front, mask.shape[1] - rows)))
      attend = mask & ~skip
    for block in self.blocks:
      x = block(x, attend, deterministic=deterministic, rngs=rngs)
    return self.ln(x)[:, :rows], mask[:, :rows]

  def attention_rows(self, rows: int) -> int:
    """The rows the layers compute on for ``rows`` input rows (see class
    doc): the attention's own padded length if that adds at most 1/16."""
    if not self.pad_rows:
      return rows
    if self.attention == "hierarchical":
      target = padded_length(rows, self.block_size)
    else:
      target = cudnn_padded_length(rows)
    return target if (target - rows) * 16 <= rows else rows


# The classifier heads' nonlinearity. "relu" is what the LRA code used; with
# mean pooling over ~1,000 rows the pooled vectors of different inputs
# differ by a few percent, so a ReLU unit is on for every input or for none,
# and once off it never returns: on Pathfinder all 32 units of the head died,
# leaving no gradient for the encoder (docs/results.md). GELU has no dead
# region.
HEAD_ACTIVATIONS = {"gelu": nnx.gelu, "relu": nnx.relu}


def pool(x, mask, kind):
  """[batch, length, dim] -> float32 [batch, dim] by CLS (position 0) or
  masked mean.

  Always float32: a bfloat16 mean of ~1,000 rows keeps 8 bits of the
  average, so what a few rows add (one snake's pixels among 1,024) rounds
  away; the classifier heads run in float32 for the same reason.
  """
  x = x.astype(jnp.float32)
  if kind == "CLS":
    return x[:, 0]
  w = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)


class _ClassifierHead(nnx.Module):
  """An encoder and a 2-layer MLP head (``head_activation`` between its
  layers, see ``HEAD_ACTIVATIONS``) on what ``features`` computes."""

  def __init__(self, *, num_classes: int, mlp_dim: int, emb_dim: int,
               features_dim: int, rngs: nnx.Rngs,
               head_activation: str = "gelu", **encoder_kwargs):
    self.encoder = Encoder(emb_dim=emb_dim, mlp_dim=mlp_dim, rngs=rngs,
                           **encoder_kwargs)
    if head_activation not in HEAD_ACTIVATIONS:
      raise ValueError(f"head_activation must be one of "
                       f"{sorted(HEAD_ACTIVATIONS)}, got {head_activation!r}.")
    self.head_activation = head_activation
    self.head1 = nnx.Linear(features_dim, mlp_dim, dtype=jnp.float32,
                            rngs=rngs)
    self.head2 = nnx.Linear(mlp_dim, num_classes, dtype=jnp.float32,
                            rngs=rngs)

  def encode(self, tokens, *, deterministic=None, rngs=None):
    """tokens: int [batch, length] -> pooled float32 [batch, emb_dim]."""
    x, mask = self.encoder(tokens, deterministic=deterministic, rngs=rngs)
    return pool(x, mask, self.encoder.pool)

  def head(self, features):
    """features -> float32 logits [batch, num_classes]."""
    x = HEAD_ACTIVATIONS[self.head_activation](self.head1(features))
    return self.head2(x).astype(jnp.float32)

  def __call__(self, tokens, *, deterministic=None, rngs=None):
    """tokens -> float32 logits [batch, num_classes]; ``deterministic``:
    None takes the model's (``.train()`` / ``.eval()``)."""
    return self.head(self.features(tokens, deterministic=deterministic,
                                   rngs=rngs))


class Classifier(_ClassifierHead):
  """Sequence classifier: Encoder, pooling, and a 2-layer MLP head."""

  def __init__(self, *, emb_dim: int, **kwargs):
    super().__init__(emb_dim=emb_dim, features_dim=emb_dim, **kwargs)

  def features(self, tokens, *, deterministic=None, rngs=None):
    """What the head reads: the pooled encoding, float32 [batch, emb_dim]."""
    return self.encode(tokens, deterministic=deterministic, rngs=rngs)


class Decoder(nnx.Module):
  """Decoder-only language model with causal attention.

  Token embedding plus sinusoidal positions, ``num_layers`` pre-LayerNorm
  TransformerBlocks with ``causal=True`` (hierarchical or full attention),
  a final LayerNorm and an untied output projection to the vocabulary.
  No padding mask is passed to the attention: causality alone means a
  position sees only itself and earlier positions, so padding at the end of
  a row (the only place it occurs) changes no real position's logits.
  """

  def __init__(self, *, vocab_size: int, max_len: int, emb_dim: int,
               num_layers: int, num_heads: int, qkv_dim: int, mlp_dim: int,
               dropout_rate: float = 0.1, attention: str = "hierarchical",
               block_size: int = 16, implementation: str | None = None,
               dtype: Any = None, attention_dropout_rate: float = 0.0,
               rngs: nnx.Rngs):
    dtype = _dtype(dtype)
    self.dtype = dtype
    self.deterministic = True  # .train() sets it False, .eval() True.
    self.max_len = max_len
    self.embed = nnx.Embed(vocab_size, emb_dim, dtype=dtype,
                           embedding_init=nnx.initializers.normal(1.0),
                           rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.blocks = _blocks(
        num_layers, dim=emb_dim, num_heads=num_heads, qkv_dim=qkv_dim,
        mlp_dim=mlp_dim, dropout_rate=dropout_rate, attention=attention,
        block_size=block_size, causal=True, implementation=implementation,
        dtype=dtype, attention_dropout_rate=attention_dropout_rate,
        rngs=rngs)
    self.ln = nnx.LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(emb_dim, vocab_size, dtype=dtype, rngs=rngs)

  def __call__(self, tokens, *, deterministic=None, rngs=None):
    """tokens: int [batch, length] -> float32 logits [batch, length, vocab].

    ``deterministic``: None takes the model's (``.train()`` / ``.eval()``).
    """
    if deterministic is None:
      deterministic = self.deterministic
    _check_tokens(tokens, "Decoder")
    _check_ids(tokens, self.embed.num_embeddings, "Decoder")
    l = tokens.shape[1]
    if l > self.max_len:
      raise ValueError(
          f"input length {l} exceeds the model's max_len {self.max_len}.")
    x = embed_tokens(self.embed, tokens)
    x = x + jnp.asarray(sinusoidal_positions(l, x.shape[-1])).astype(x.dtype)
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    for block in self.blocks:
      x = block(x, None, deterministic=deterministic, rngs=rngs)
    return self.head(self.ln(x)).astype(jnp.float32)


class DualEncoderClassifier(_ClassifierHead):
  """Two-tower pair classifier (LRA Retrieval) with one shared encoder.

  ``tokens`` is ``[batch, 2, length]``: both documents of a pair go through
  the same ``Encoder`` (shared weights; they are encoded together as one
  batch of ``2 * batch`` rows) and are pooled (CLS or mean) to ``u`` and
  ``v``; the pair is classified from ``[u, v, u * v, u - v]`` by a 2-layer
  MLP (``4 * emb_dim -> mlp_dim -> num_classes``).
  """

  def __init__(self, *, emb_dim: int, **kwargs):
    super().__init__(emb_dim=emb_dim, features_dim=4 * emb_dim, **kwargs)

  def features(self, tokens, *, deterministic=None, rngs=None):
    """tokens: int [batch, 2, length] -> [u, v, u*v, u-v], [batch, 4*emb]."""
    _check_tokens(tokens, "DualEncoderClassifier", "[batch, 2, length]")
    _check_ids(tokens, self.encoder.embed.num_embeddings,
               "DualEncoderClassifier")
    if tokens.shape[1] != 2:
      raise ValueError(f"DualEncoderClassifier expects tokens of shape "
                       f"[batch, 2, length], got {tuple(tokens.shape)}.")
    b = tokens.shape[0]
    both = jnp.concatenate([tokens[:, 0], tokens[:, 1]], axis=0)
    pooled = self.encode(both, deterministic=deterministic, rngs=rngs)
    u, v = pooled[:b], pooled[b:]
    return jnp.concatenate([u, v, u * v, u - v], axis=-1)
