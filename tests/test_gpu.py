"""Checks that need a GPU: cuDNN baseline, the fused kernels compiled, bf16.

Skipped unless the suite runs on a GPU, which it does only when asked
(tests/conftest.py): on a GPU host, ``make test-gpu``, or
``HTRANSFORMER_TEST_ACCELERATOR=1 pytest tests/test_gpu.py``.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htransformer.attention import full_attention
from htransformer.attention import hierarchical_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU: make test-gpu")


@pytest.fixture(autouse=True)
def _users_precision():
  """These checks run at the float32 precision users get (JAX's default,
  TF32 on recent NVIDIA GPUs), not the full products tests/conftest.py asks
  for on behalf of the rest of the suite; the few that want full products
  say so."""
  if not os.environ.get("HTRANSFORMER_TEST_SET_PRECISION"):
    yield
    return
  with jax.default_matmul_precision(None):
    yield


def _inputs(batch, length, heads, dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (batch, length, heads, dim), dtype)
          for k in keys]


@pytest.mark.parametrize("length", [2001, 1000, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_matches_xla_at_any_length(length, causal):
  q, k, v = _inputs(2, length, 4, 64, jnp.bfloat16)
  mask = jnp.arange(length)[None] < jnp.array([[length], [length - 37]])
  a = full_attention(q, k, v, causal=causal, mask=mask,
                     implementation="cudnn")
  b = full_attention(q, k, v, causal=causal, mask=mask, implementation="xla")
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.isfinite(a).all()
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2
  assert (a[1, length - 37:] == 0).all()


def test_cudnn_gradients_finite_with_padding():
  q, k, v = _inputs(2, 2001, 2, 64, jnp.bfloat16, seed=1)
  mask = jnp.arange(2001)[None] < jnp.array([[2001], [1500]])
  g = jax.grad(lambda q, k, v: full_attention(
      q, k, v, mask=mask, implementation="cudnn").astype(jnp.float32).sum(),
               argnums=(0, 1, 2))(q, k, v)
  for x in g:
    assert np.isfinite(np.asarray(x, np.float32)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_hierarchical_bf16_on_gpu_matches_float32(causal):
  q, k, v = _inputs(2, 3000, 4, 64, jnp.float32, seed=2)
  with jax.default_matmul_precision("highest"):
    ref = hierarchical_attention(q, k, v, block_size=16, causal=causal)
  out = hierarchical_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                               block_size=16, causal=causal)
  assert out.dtype == jnp.bfloat16
  out, ref = np.asarray(out, np.float32), np.asarray(ref)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-2


# XLA's GPU compiler aborted (a failed check in its Triton matmul fusion)
# on the causal plain path at batch x heads = 1 and short lengths, when the
# coarse queries were a strided slice: a language model sampled at batch 1
# crashed the process. Values and gradients against the float64 definition.
@pytest.mark.parametrize("length", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_causal_plain_path_at_one_sequence_and_head(length, dtype):
  from tests.test_attention import dense_reference
  q, k, v = _inputs(1, length, 1, 16, jnp.dtype(dtype), seed=3)
  cot = _inputs(1, length, 1, 16, jnp.float32, seed=4)[0]
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)
                                           * cot)
  ours = lambda q, k, v: hierarchical_attention(q, k, v, block_size=4,
                                                causal=True)
  with jax.default_matmul_precision("highest"):
    out = jax.jit(ours)(q, k, v)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  with jax.enable_x64(True):
    ref = lambda q, k, v: dense_reference(q, k, v, block_size=4, causal=True,
                                          xp=jnp)
    q64, k64, v64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
    want = ref(q64, k64, v64)
    want_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(q64, k64, v64)
  tol = 1e-5 if dtype == "float32" else 1e-2
  for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads),
                        (want, *want_grads)):
    a, b = np.asarray(a, np.float64), np.asarray(b)
    assert np.isfinite(a).all(), name
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol, name


def test_language_model_samples_at_batch_one():
  """The decoder and the sampler's jitted step at batch 1 (the case above
  inside a model): the logits equal the model's on a batch of 2."""
  from flax import nnx
  from htransformer import models
  from htransformer import sample
  model = models.Decoder(vocab_size=50, max_len=32, emb_dim=32, num_layers=2,
                         num_heads=2, qkv_dim=32, mlp_dim=64, dropout_rate=0.0,
                         attention="hierarchical", block_size=4,
                         rngs=nnx.Rngs(params=0))
  context = list(np.random.default_rng(0).integers(2, 50, size=20))
  with jax.default_matmul_precision("highest"):
    sampler = sample.Sampler(model, temperature=0.0)
    token, logits = sampler.next_token(context, sample.step_key(0, 0))
    pair = model(jnp.asarray([context, context], jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(pair[0, -1]),
                             atol=1e-5, rtol=1e-5)
  assert token == int(np.argmax(np.asarray(pair[0, -1])))
  assert len(sampler.generate(context, 5)) == 5


@pytest.mark.parametrize("length,padded", [(1024, False), (2001, True),
                                           (1000, False)])
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_gradients_match_xla(length, padded, causal):
  q, k, v = _inputs(2, length, 4, 64, jnp.bfloat16, seed=3)
  mask = None
  if padded:
    mask = jnp.arange(length)[None] < jnp.array([[length], [length - 300]])
  cot = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(full_attention(
        q, k, v, causal=causal, mask=mask,
        implementation=impl).astype(jnp.float32) * cot)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for a, b in zip(grads("cudnn"), grads("xla")):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


@pytest.mark.parametrize("dim", [4, 12])
def test_cudnn_narrow_head_dims_match_xla(dim):
  """Head dims cuDNN does not take (not a multiple of 8) run it padded."""
  q, k, v = _inputs(2, 1024, 4, dim, jnp.bfloat16, seed=4)
  mask = jnp.arange(1024)[None] < jnp.array([[1024], [900]])
  cot = jax.random.normal(jax.random.key(5), q.shape, jnp.float32)

  def run(impl):
    f = lambda q, k, v: full_attention(q, k, v, mask=mask,
                                       implementation=impl)
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
    return [f(q, k, v)] + list(jax.grad(loss, argnums=(0, 1, 2))(q, k, v))

  for a, b in zip(run("cudnn"), run("xla")):
    assert a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


@pytest.mark.parametrize("dim", [4, 16, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_any_mask_matches_xla(dim, causal):
  """A mask that is not suffix padding (black pixels left out of attention)
  through cuDNN: the key column (dims 4, 16) or XLA (128, where the column
  would take cuDNN past 128); values and gradients against XLA."""
  q, k, v = _inputs(2, 1024, 4, dim, jnp.bfloat16, seed=6)
  mask = jax.random.uniform(jax.random.key(7), (2, 1024)) < 0.2
  cot = jax.random.normal(jax.random.key(8), q.shape, jnp.float32)

  def run(impl):
    f = jax.jit(lambda q, k, v: full_attention(
        q, k, v, causal=causal, mask=mask, implementation=impl))
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
    return [f(q, k, v)] + list(jax.grad(loss, argnums=(0, 1, 2))(q, k, v))

  for a, b in zip(run("cudnn"), run("xla")):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2
    assert (a[~np.asarray(mask)] == 0).all()


# The fused kernels on the GPU against the plain path (float32 at full
# precision): values and gradients, causal and not, with padding and holes.
KERNEL_CASES = [
    # batch, length, heads, head_dim, value_dim, block_size, holes
    (2, 1000, 4, 64, 64, 16, True),
    (1, 4096, 2, 32, 64, 16, False),
    (2, 512, 2, 128, 128, 64, True),
    (2, 1024, 4, 4, 4, 16, True),      # Pathfinder's head_dim: padded to 16
    (1, 700, 2, 8, 24, 32, False),     # Path-X's 8; a value_dim of 24
    (1, 1024, 2, 128, 128, 16, True),  # tiles of 16 rows on 2 warps
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_pallas_kernels_match_xla(case, causal, dtype):
  _check_pallas_against_xla(case, causal, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_pallas_several_levels_per_launch_match_xla(monkeypatch, causal):
  from htransformer.attention import kernels
  # Tiles of 64 rows: room for three levels (64, 32, 16 rows) per launch.
  monkeypatch.setattr(kernels, "DEFAULT_TILE", 64)
  monkeypatch.setitem(kernels.TUNING, "levels_per_launch", 3)
  _check_pallas_against_xla(KERNEL_CASES[0], causal, "bfloat16")
  _check_pallas_against_xla(KERNEL_CASES[1], causal, "float32")


@pytest.mark.parametrize("tuning", [
    dict(coarsen_impl="pallas"), dict(handover_dtype="float32"),
    dict(pyramid_warps=2), dict(dq_warps=2, dkv_warps=4),
    dict(grid_order="heads"), dict(coarsen_impl="dot"),
    dict(forward_l0_impl="triton", backward_l0_impl="triton"),
    dict(forward_l0_impl="mosaic"),
    dict(forward_l0_impl="mosaic", backward_l0_impl="mosaic"),
    dict(forward_l0_impl="mosaic", backward_l0_impl="mosaic",
         mosaic_levels=20, tail_rows=0),
    dict(forward_l0_impl="mosaic", backward_l0_impl="mosaic",
         mosaic_zero_rows="xla"), dict(tail_rows=0),
    dict(backward_l0_impl="sweep", sweep_blocks=4, sweep_programs=0),
    dict(backward_l0_impl="sweep", sweep_levels=20, tail_rows=0),
    dict(pyramid_pass=2), dict(coarse_tile=64, tail_rows=0)],
    ids=["pair_sums", "handover_f32", "pyramid_2_warps",
         "backward_warps", "heads_first", "products_pyramid",
         "triton_level0", "mosaic_level0_forward",
         "mosaic_level0_both", "mosaic_all_levels", "mosaic_zero_rows",
         "no_tail", "sweep_level0", "sweep_all_levels",
         "pyramid_2_levels", "coarse_tiles_64"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_pallas_tuning_alternatives_match_xla(monkeypatch, causal, tuning):
  """TUNING's alternatives to the default kernels (the pyramid by pair
  sums, float32 between levels, the pyramid and restriction on 2 warps,
  other warps for the backward kernels, heads first in a launch, the
  pyramid by the products kernel and the Triton level-0 kernels where
  Mosaic GPU is the default, the Mosaic GPU level-0 forward, and
  backward, both at every level long enough, and both with the padding
  zeroed by XLA, wherever they apply; every level its own launch, no
  coarse tail; level 0's backward in one sweep of 4 key blocks per
  program, and every level's in runs as short as it takes to launch 256
  programs, the default; Mosaic GPU pyramid passes of two levels where
  three would fit; programs of 64 rows from level 1 on), as compiled for the GPU
  (interpret mode:
  tests/test_kernels.py)."""
  from htransformer.attention import kernels
  for key, value in tuning.items():
    monkeypatch.setitem(kernels.TUNING, key, value)
  for case, dtype in ((KERNEL_CASES[0], "bfloat16"),
                      (KERNEL_CASES[1], "float32"),
                      (KERNEL_CASES[3], "bfloat16")):
    _check_pallas_against_xla(case, causal, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", [KERNEL_CASES[0], KERNEL_CASES[1],
                                  KERNEL_CASES[2]], ids=str)
def test_pallas_dropout_matches_xla(case, causal, dtype):
  """Attention dropout, as compiled for the GPU: the kernels drop the
  weights the plain path drops (the hash in uint32 arithmetic)."""
  _check_pallas_against_xla(case, causal, dtype, dropout=0.2)


@pytest.mark.parametrize("tile", [16, 32])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_pallas_tiles_smaller_than_a_block_match_xla(monkeypatch, causal,
                                                     tile):
  """Programs of fewer rows than a block (blocks of 64 and 32), as
  compiled for the GPU (interpret mode: tests/test_kernels.py)."""
  from htransformer.attention import kernels
  monkeypatch.setattr(kernels, "default_tile", lambda nr: tile)
  _check_pallas_against_xla(KERNEL_CASES[2], causal, "bfloat16")
  _check_pallas_against_xla(KERNEL_CASES[4], causal, "float32", dropout=0.2)


def _case_inputs(case, causal):
  """q, k, v, an output cotangent (float32) and the mask (None without
  holes) of a ``KERNEL_CASES`` case."""
  batch, length, heads, d, dv, _, holes = case
  keys = jax.random.split(jax.random.key(length + causal), 5)
  q, k = (jax.random.normal(x, (batch, length, heads, d)) for x in keys[:2])
  v = jax.random.normal(keys[2], (batch, length, heads, dv))
  cotangent = jax.random.normal(keys[4], (batch, length, heads, dv))
  mask = None
  if holes:
    mask = jax.random.bernoulli(keys[3], 0.9, (batch, length))
    mask = mask.at[:, -50:].set(False)
  return q, k, v, cotangent, mask


def _value_and_grads(case, causal, dropout, implementation, dtype):
  """The output and the gradients of ``sum(out * cotangent)`` for q, k and
  v, as float32 numpy arrays."""
  q, k, v, cotangent, mask = _case_inputs(case, causal)

  def loss(q, k, v):
    out = hierarchical_attention(q, k, v, block_size=case[5],
                                 causal=causal, mask=mask,
                                 implementation=implementation,
                                 dropout_rate=dropout,
                                 dropout_rng=jax.random.key(7))
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True))(
          *(x.astype(dtype) for x in (q, k, v)))
  return [np.asarray(x, np.float32) for x in (out, *grads)]


@functools.lru_cache(maxsize=None)
def _reference(case, causal, dropout):
  """The plain path's output and gradients in float32 at full precision,
  once per case in a test process (the alternatives of TUNING share
  them)."""
  with jax.default_matmul_precision("highest"):
    return _value_and_grads(case, causal, dropout, "xla", "float32")


def _check_pallas_against_xla(case, causal, dtype, dropout=0.0):
  """The kernels against the plain path (float32 at full precision): the
  output and its gradients."""
  got = _value_and_grads(case, causal, dropout, "pallas", dtype)
  tol = 2e-5 if dtype == "float32" else 2e-2
  for name, a, b in zip(("out", "dq", "dk", "dv"), got,
                        _reference(case, causal, dropout)):
    assert np.isfinite(a).all(), name
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert err < tol, (name, err)
  if case[6]:  # holes: the padded end is zero
    assert (got[0][:, -50:] == 0).all()


def test_pallas_is_the_default_on_gpu_for_bfloat16():
  from htransformer.attention import api
  q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  assert api._default_hierarchical(q, q, 16) == "pallas"
  assert api._default_hierarchical(q, q, 8) == "xla"
  assert api._default_hierarchical(q.astype(jnp.float32), q, 16) == "xla"


def test_without_the_triton_backend_the_default_is_xla(monkeypatch):
  """A jax without Pallas's Triton backend: implementation=None warns and
  runs the plain path (same values as 'xla')."""
  from htransformer.attention import kernels
  monkeypatch.setitem(sys.modules, kernels.TRITON_MODULE, None)
  q, k, v = _inputs(1, 256, 2, 64, jnp.bfloat16)
  with pytest.warns(RuntimeWarning, match="no Pallas Triton backend"):
    out = hierarchical_attention(q, k, v, block_size=16)
  want = hierarchical_attention(q, k, v, block_size=16, implementation="xla")
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(want, np.float32))


@pytest.mark.parametrize("nr,level,zero_rows", [
    (16, 0, False), (64, 0, False), (16, 1, False), (16, 0, True),
    (32, 0, True)])
def test_mosaic_forward_level_matches_the_triton_kernel(nr, level,
                                                        zero_rows):
  """``mosaic.forward_level`` compiled for this GPU (Hopper and newer)
  against the Triton forward of that level on the same inputs
  (``tests.test_kernels.check_mosaic_forward_level``; interpret mode:
  tests/test_kernels.py)."""
  from htransformer.attention import kernels
  from tests.test_kernels import check_mosaic_forward_level
  if not kernels.mosaic_gpu():
    pytest.skip("Mosaic GPU kernels need compute capability 9.0 or newer")
  check_mosaic_forward_level(nr, n=1024, heads=4, interpret=False,
                             lse_atol=1e-4, level=level, zero_rows=zero_rows)


@pytest.mark.parametrize("nr,level,zero_rows", [
    (16, 0, False), (64, 0, False), (16, 1, False), (16, 0, True),
    (32, 0, True)])
def test_mosaic_backward_level_matches_the_triton_kernels(
    nr, level, zero_rows):
  """``mosaic.dq_level`` and ``dkv_level`` compiled for this GPU against
  the Triton backward kernels of that level on the same inputs
  (``tests.test_kernels.check_mosaic_backward_level``)."""
  from htransformer.attention import kernels
  from tests.test_kernels import check_mosaic_backward_level
  if not kernels.mosaic_gpu():
    pytest.skip("Mosaic GPU kernels need compute capability 9.0 or newer")
  check_mosaic_backward_level(nr, n=1024, heads=4, interpret=False,
                              level=level, zero_rows=zero_rows)


@pytest.mark.parametrize("level,causal", [(0, False), (0, True), (1, True)],
                         ids=["l0-bidir", "l0-causal", "l1-causal"])
def test_mosaic_level_kernels_take_numbers_for_counts_and_weights(level,
                                                                  causal):
  """The Mosaic GPU level kernels compiled for this GPU with the counts
  and the prolongation weights as numbers (no mask, no padding) against
  the same as arrays (``tests.test_kernels.check_mosaic_level_numbers``)."""
  from htransformer.attention import kernels
  from tests.test_kernels import check_mosaic_level_numbers
  if not kernels.mosaic_gpu():
    pytest.skip("Mosaic GPU kernels need compute capability 9.0 or newer")
  check_mosaic_level_numbers(level, causal, interpret=False, n=1024,
                             heads=4, d=64)
