"""The public attention functions' handling of unusual inputs.

Padding that holds NaN, mixed dtypes, integer-like block sizes, empty
batches and heads, non-bool ``causal``, bad dropout keys and rates, block
sizes far above the length, and the default implementation on a GPU
(pretended: the suite runs on the CPU).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htransformer.attention import api
from htransformer.attention import full_attention, hierarchical_attention
from htransformer.attention import hierarchical
from htransformer.attention import kernels
from tests.scripts_helper import jaxpr_equations
from tests.test_attention import make_mask, make_qkv


def _hier(q, k, v, **kw):
  kw.setdefault("block_size", 4)
  return hierarchical_attention(q, k, v, **kw)


def _hier_pallas(q, k, v, **kw):
  return hierarchical_attention(q, k, v, block_size=16,
                                implementation="pallas_interpret", **kw)


FUNCTIONS = {"full": full_attention, "hierarchical": _hier}


# ----------------------------------------------------------------------------
# 1. Padding's contents reach neither the output nor the gradients.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", ["full", "hierarchical", "pallas"])
def test_non_finite_padding_is_ignored(name, causal, fill):
  fn = {"pallas": _hier_pallas, **FUNCTIONS}[name]
  q, k, v = make_qkv(1, 2, 12, 2, 4, 3)
  mask = make_mask(1, 2, 12, "empty")  # Row 0 has no real token.
  pad = ~mask[:, :, None, None]
  dirty = [np.where(pad, fill, x).astype(np.float32) for x in (q, k, v)]
  clean = [np.where(pad, 0.0, x).astype(np.float32) for x in (q, k, v)]
  w = np.random.default_rng(2).standard_normal((2, 12, 2, 3)).astype(
      np.float32)

  @jax.jit
  def run(q, k, v):
    out = fn(q, k, v, causal=causal, mask=mask)
    return out, jax.grad(lambda *a: jnp.sum(
        fn(*a, causal=causal, mask=mask) * w), argnums=(0, 1, 2))(q, k, v)

  out, grads = run(*dirty)
  want, want_grads = run(*clean)
  np.testing.assert_array_equal(out, want)
  assert np.isfinite(np.asarray(out)).all()
  for g, want_g in zip(grads, want_grads):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(g, want_g)


# ----------------------------------------------------------------------------
# 2. Mixed dtypes: promoted; the output is in the query dtype.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", [
    ("float32", "float16", "float32"), ("float16", "float32", "float16"),
    ("bfloat16", "bfloat16", "float32"), ("float16", "bfloat16", "float16"),
])
def test_mixed_dtypes(dtypes):
  q, k, v = make_qkv(3, 1, 10, 2, 4)
  mixed = [jnp.asarray(x, d) for x, d in zip((q, k, v), dtypes)]
  common = jnp.result_type(*mixed)
  promoted = [x.astype(common) for x in mixed]
  mask = make_mask(3, 1, 10, "partial")
  out = full_attention(*mixed, mask=mask)
  assert out.dtype == jnp.dtype(dtypes[0])
  want = full_attention(*promoted, mask=mask).astype(dtypes[0])
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(want, np.float32))
  # The same dtype as hierarchical attention's (which documents it).
  assert _hier(*mixed, mask=mask).dtype == out.dtype


def test_mixed_dtypes_keys_out_of_the_query_range():
  """Keys float16 cannot hold: each path computes in the promoted dtype (a
  float16 copy of the keys would be inf, the logits inf - inf = NaN)."""
  q = jnp.full((1, 16, 1, 4), 1e-4, jnp.float16)
  v = jnp.asarray(make_qkv(5, 1, 16, 1, 4)[2], jnp.float16)
  k = jnp.full((1, 16, 1, 4), 1e5, jnp.float32)
  want = full_attention(q, k, v)
  assert np.isfinite(np.asarray(want, np.float32)).all()
  for impl, block_size in (("xla", 4), ("pallas_interpret", 16)):
    out = hierarchical_attention(q, k, v, block_size=block_size,
                                 implementation=impl)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(want, np.float32), atol=2e-3,
                               err_msg=impl)


@pytest.mark.parametrize("name", ["full", "hierarchical"])
def test_inputs_that_are_not_arrays_are_named(name):
  q, k, v = make_qkv(0, 1, 8, 1, 4)
  with pytest.raises(TypeError, match="query must be an array .* got list"):
    FUNCTIONS[name](q.tolist(), k, v)


# ----------------------------------------------------------------------------
# 3. Integer-like block sizes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [
    np.int64(4), np.int32(4), np.array(4), jnp.array(4), jnp.int32(4)],
    ids=["np.int64", "np.int32", "np.array", "jnp.array", "jnp.int32"])
def test_integer_like_block_size(block_size):
  q, k, v = make_qkv(4, 1, 20, 1, 4)
  want = hierarchical_attention(q, k, v, block_size=4)
  got = hierarchical_attention(q, k, v, block_size=block_size)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block_size", [
    True, np.bool_(True), 4.0, np.float32(4), jnp.array(4.0), "4", None],
    ids=["bool", "np.bool_", "float", "np.float32", "jnp.float", "str",
         "none"])
def test_non_integer_block_size_is_rejected(block_size):
  q, k, v = make_qkv(4, 1, 20, 1, 4)
  with pytest.raises(ValueError, match="block_size must be an even integer"):
    hierarchical_attention(q, k, v, block_size=block_size)


def test_traced_block_size_is_rejected():
  q, k, v = make_qkv(4, 1, 20, 1, 4)
  with pytest.raises(ValueError, match="block_size must be a static"):
    jax.jit(lambda b: hierarchical_attention(q, k, v, block_size=b))(4)


# ----------------------------------------------------------------------------
# 4. Zero-size dimensions.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8, 2, 4), (2, 8, 0, 4)],
                         ids=["batch0", "heads0"])
@pytest.mark.parametrize("name", ["full", "hierarchical", "pallas"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_empty_batch_or_heads(name, shape, masked):
  fn = {"pallas": _hier_pallas, **FUNCTIONS}[name]
  q = jnp.zeros(shape, jnp.bfloat16)
  v = jnp.zeros(shape[:3] + (3,), jnp.float32)
  mask = np.ones(shape[:2], bool) if masked else None
  out = fn(q, q, v, mask=mask)
  assert out.shape == shape[:3] + (3,)
  assert out.dtype == jnp.bfloat16
  out = jax.jit(lambda q, k, v: fn(q, k, v, mask=mask, dropout_rate=0.5,
                                   dropout_rng=jax.random.key(0)))(q, q, v)
  assert out.shape == shape[:3] + (3,)


@pytest.mark.parametrize("name", ["full", "hierarchical", "pallas"])
def test_zero_head_dim_is_an_error(name):
  fn = {"pallas": _hier_pallas, **FUNCTIONS}[name]
  q = jnp.zeros((1, 8, 2, 0))
  v = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="head_dim .* must be >= 1"):
    fn(q, q, v)


# ----------------------------------------------------------------------------
# 5. causal must be a bool.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", ["no", 1, 0, None, jnp.array(True)],
                         ids=["str", "one", "zero", "none", "jnp.bool"])
@pytest.mark.parametrize("name", ["full", "hierarchical"])
def test_non_bool_causal_is_rejected(name, causal):
  q, k, v = make_qkv(5, 1, 8, 1, 4)
  with pytest.raises(TypeError, match="causal must be a bool"):
    FUNCTIONS[name](q, k, v, causal=causal)


@pytest.mark.parametrize("name", ["full", "hierarchical"])
def test_numpy_bool_causal(name):
  q, k, v = make_qkv(5, 1, 8, 1, 4)
  fn = FUNCTIONS[name]
  for flag in (False, True):
    np.testing.assert_array_equal(fn(q, k, v, causal=np.bool_(flag)),
                                  fn(q, k, v, causal=flag))


# ----------------------------------------------------------------------------
# 6, 7. dropout_rng must be one key; dropout_rate must be static.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rng", [
    0, "key", np.zeros(3, np.uint32), np.zeros(2, np.int32),
    jax.random.split(jax.random.key(0), 2),
    jax.random.split(jax.random.PRNGKey(0), 2)],
    ids=["int", "str", "uint32[3]", "int32[2]", "typed[2]", "raw[2,2]"])
@pytest.mark.parametrize("name", ["full", "hierarchical"])
def test_bad_dropout_rng_is_named(name, rng):
  q, k, v = make_qkv(6, 1, 8, 1, 4)
  with pytest.raises(TypeError, match="dropout_rng must be one JAX PRNG key"):
    FUNCTIONS[name](q, k, v, dropout_rate=0.1, dropout_rng=rng)


@pytest.mark.parametrize("name", ["full", "hierarchical"])
def test_typed_and_raw_keys(name):
  q, k, v = make_qkv(6, 1, 8, 1, 4)
  fn = FUNCTIONS[name]
  typed = fn(q, k, v, dropout_rate=0.3, dropout_rng=jax.random.key(7))
  raw = fn(q, k, v, dropout_rate=0.3, dropout_rng=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(typed, raw)
  traced = jax.jit(lambda r: fn(q, k, v, dropout_rate=0.3, dropout_rng=r))
  np.testing.assert_allclose(traced(jax.random.key(7)), typed, atol=1e-6)
  np.testing.assert_allclose(traced(jax.random.PRNGKey(7)), typed, atol=1e-6)


@pytest.mark.parametrize("name", ["full", "hierarchical"])
def test_traced_dropout_rate_is_named(name):
  q, k, v = make_qkv(6, 1, 8, 1, 4)
  fn = FUNCTIONS[name]
  run = jax.jit(lambda r: fn(q, k, v, dropout_rate=r,
                             dropout_rng=jax.random.key(0)))
  with pytest.raises(ValueError, match="dropout_rate must be a static"):
    run(0.1)


# ----------------------------------------------------------------------------
# 8. Block sizes far above the length run at the smallest equivalent one.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl,length,block_size,want", [
    ("xla", 8, 8192, 4), ("xla", 9, 8192, 6), ("xla", 1, 64, 2),
    ("xla", 12, 6, 6), ("xla", 16, 8, 8), ("xla", 20, 8, 8),
    ("xla", 8, 4, 4), ("xla", 7, 4, 4),
    ("pallas", 8, 8192, 16), ("pallas", 20, 1024, 16),
    ("pallas", 40, 1024, 32), ("pallas", 40, 16, 16),
    ("pallas", 8, 24, 24), ("pallas_interpret", 100, 4096, 64),
])
def test_fitting_block_size(impl, length, block_size, want):
  assert api._fitting_block_size(block_size, length, impl) == want


def _largest_intermediate(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return max(int(np.prod(var.aval.shape))
             for eqn in jaxpr_equations(jaxpr) for var in eqn.outvars
             if hasattr(var.aval, "shape"))


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_huge_block_size_costs_no_memory(impl):
  q, k, v = make_qkv(8, 1, 8, 1, 4)
  run = lambda q, k, v: hierarchical_attention(
      q, k, v, block_size=2048, implementation=impl)
  assert _largest_intermediate(run, q, k, v) <= 4096


def test_huge_block_size_is_full_attention():
  """(Padded to 2**21 tokens, this call needed terabytes.)"""
  q, k, v = make_qkv(8, 2, 8, 2, 4)
  out = hierarchical_attention(q, k, v, block_size=1 << 20, causal=True,
                               dropout_rate=0.2, dropout_rng=jax.random.key(1))
  want = full_attention(q, k, v, causal=True, dropout_rate=0.2,
                        dropout_rng=jax.random.key(1))
  np.testing.assert_allclose(out, want, atol=2e-6)


@pytest.mark.parametrize("rate", [0.0, 0.3], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_reduced_block_size_gives_the_same_output(causal, rate):
  """The reduced block against the unreduced core (block 64 at length 11),
  values and dropout."""
  q, k, v = make_qkv(9, 2, 11, 2, 4, 3)
  mask = make_mask(9, 2, 11, "suffix")
  rng = jax.random.key(3)
  _, seeds = api._dropout_seeds(rate, rng, q)
  got = hierarchical_attention(q, k, v, block_size=64, causal=causal,
                               mask=mask, dropout_rate=rate, dropout_rng=rng)
  want = hierarchical.hierarchical_attention_xla(
      q, k, v, jnp.asarray(mask), block_size=64, causal=causal,
      dropout_rate=rate, dropout_seeds=seeds)
  np.testing.assert_allclose(got, want, atol=1e-6)
  full = full_attention(q, k, v, causal=causal, mask=mask, dropout_rate=rate,
                        dropout_rng=rng)
  np.testing.assert_allclose(got, full, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_reduced_block_size_gives_the_same_output_kernels(causal):
  """The kernels at block 16 (the reduced 64) against block 64 itself."""
  q, k, v = make_qkv(10, 1, 20, 2, 4, 3)
  mask = make_mask(10, 1, 20, "partial")
  rng = jax.random.key(4)
  _, seeds = api._dropout_seeds(0.3, rng, q)
  got = hierarchical_attention(q, k, v, block_size=64, causal=causal,
                               mask=mask, dropout_rate=0.3, dropout_rng=rng,
                               implementation="pallas_interpret")
  want = kernels.hierarchical_attention_pallas(
      q, k, v, jnp.asarray(mask), block_size=64, causal=causal,
      interpret=True, dropout_rate=0.3, dropout_seeds=seeds)
  np.testing.assert_allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------
# 9. The default implementation on a GPU (pretended).
# ----------------------------------------------------------------------------


@pytest.fixture
def on_gpu(monkeypatch):
  """api reports a GPU; the Triton backend is there unless a test says."""
  monkeypatch.setattr(api, "_backend", lambda: "gpu")
  monkeypatch.setattr(kernels, "triton_missing", lambda: None)
  return monkeypatch


def test_default_on_gpu(on_gpu):
  del on_gpu
  q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert api._default_hierarchical(q, q, 16) == "pallas"
    assert api._default_hierarchical(q.astype(jnp.float16),
                                     q.astype(jnp.float16), 64) == "pallas"
    assert api._default_hierarchical(q, q, 8) == "xla"
    assert api._default_hierarchical(q, q, 24) == "xla"
    f32 = q.astype(jnp.float32)
    assert api._default_hierarchical(f32, f32, 16) == "xla"
    assert api._default_hierarchical(q, f32, 16) == "xla"
    assert api._default_hierarchical(q, q, 16, key=f32) == "xla"


def test_default_on_gpu_without_triton(on_gpu):
  on_gpu.setattr(kernels, "triton_missing", lambda: "no Triton here")
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in make_qkv(11, 1, 32, 1, 16))
  with pytest.warns(RuntimeWarning, match="no Triton here"):
    assert api._default_hierarchical(q, v, 16) == "xla"
  # Through the public function: the warning, and the plain path's output.
  with pytest.warns(RuntimeWarning, match="plain-JAX path"):
    out = hierarchical_attention(q, k, v, block_size=16)
  want = hierarchical_attention(q, k, v, block_size=16, implementation="xla")
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(want, np.float32))


def test_default_on_cpu(monkeypatch):
  monkeypatch.setattr(api, "_backend", lambda: "cpu")
  q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
  assert api._default_hierarchical(q, q, 16) == "xla"
