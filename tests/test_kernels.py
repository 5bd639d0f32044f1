"""The fused Pallas kernels, run in interpret mode on the CPU.

``implementation="pallas_interpret"`` runs exactly the kernels the GPU runs
(``htransformer/attention/kernels.py``). They are checked here against the
float64 dense reference of the definition (tests/test_attention.py), for
values and gradients, causal and not, with padding and holes, several tiles
per level, several coarsening passes, and extreme rows. Sizes are small:
interpret mode is slow.
"""

import functools
import itertools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htransformer.attention import hierarchical_attention
from htransformer.attention import kernels
from htransformer.attention import mosaic
from tests.scripts_helper import jaxpr_equations
from tests.test_attention import dense_reference, make_mask, make_qkv
from tests.test_attention import max_abs, numpy_reference


def run_pallas(q, k, v, mask, *, causal, block_size=16):
  return np.asarray(jax.jit(lambda q, k, v: hierarchical_attention(
      q, k, v, block_size=block_size, causal=causal, mask=mask,
      implementation="pallas_interpret"))(q, k, v))


# name: (tile, TUNING settings).
SCHEDULES = {
    # The default kernels: a tile of one block (coarse levels read only
    # the neighbour blocks), the pyramid by products over 32 rows.
    # Level by level, every level its own launch (no tail).
    "tile16": (16, dict(levels_per_launch=1, coarsen_heads=1,
                        coarsen_rows=32, coarsen_impl="dot", tail_rows=0)),
    # Tiles of 64 with up to three levels per launch (64, 32 and 16 rows
    # of one program), the pyramid by pair sums with two heads per program,
    # the programs of a launch ordered heads first.
    "3-levels": (64, dict(levels_per_launch=3, coarsen_heads=2,
                          coarsen_rows=16, coarsen_impl="pallas",
                          grid_order="heads", tail_rows=0)),
    # The pyramid by Mosaic GPU passes (levels of 256 rows or more); the
    # default coarse tail (every level from 1 on, at these sizes).
    "mosaic": (16, dict(levels_per_launch=1, coarsen_impl="mosaic")),
    # Tiles of two blocks read in three pieces.
    "tile32": (32, dict(levels_per_launch=1, coarsen_heads=1,
                        coarsen_rows=32, coarsen_impl="dot")),
    # Every level's backward in one sweep (``_sweep_backward``), programs
    # of 4 key blocks however few programs a launch has: several per head
    # at the finer levels, so that the pairs at a program's edges are
    # formed by both neighbours.
    "sweep": (16, dict(levels_per_launch=1, coarsen_impl="dot", tail_rows=0,
                       backward_l0_impl="sweep", sweep_levels=20,
                       sweep_blocks=4, sweep_programs=0)),
    # The same with at least 16 programs per launch (``sweep_programs``):
    # at 256 rows and 2 heads, runs of 2 key blocks at level 0 and of 1
    # from level 1 on.
    "sweep-short-runs": (16, dict(levels_per_launch=1, coarsen_impl="dot",
                                  tail_rows=0, backward_l0_impl="sweep",
                                  sweep_levels=20, sweep_blocks=4,
                                  sweep_programs=16)),
}


@pytest.fixture(params=["tile16", "3-levels", "mosaic"])
def small_passes(request, monkeypatch):
  """Coarsening passes of 2 levels, so that several passes chain, with
  the default kernels (several tiles per level), the "3-levels" schedule
  or the Mosaic GPU pyramid above."""
  _use_schedule(monkeypatch, request.param)


@pytest.fixture
def tile32_passes(monkeypatch):
  """Tiles of 32 rows (two blocks) in three pieces, the default
  otherwise."""
  _use_schedule(monkeypatch, "tile32")


def _use_schedule(monkeypatch, name):
  tile, tuning = SCHEDULES[name]
  monkeypatch.setattr(kernels, "_CHUNK_LEVELS", 2)
  monkeypatch.setattr(kernels, "DEFAULT_TILE", tile)
  for key, value in tuning.items():
    monkeypatch.setitem(kernels.TUNING, key, value)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length,d,dv,mask_kind", [
    (200, 16, 32, "suffix"),   # Lp 256: 4 levels, 8 tiles at level 0
    (64, 16, 16, "empty"),     # a row with no real token
    (256, 32, 16, "none"),
])
def test_matches_dense_definition(small_passes, length, d, dv, mask_kind,
                                  causal):
  q, k, v = make_qkv(length + d, 2, length, 2, d, dv)
  mask = make_mask(length, 2, length, mask_kind)
  out = run_pallas(q, k, v, mask, causal=causal)
  want = numpy_reference(q, k, v, mask, block_size=16, causal=causal)
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 2e-5
  if mask is not None:
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_holes_and_garbage_in_padding(tile32_passes, causal):
  """Holes anywhere; padding holding inf/NaN changes nothing (causal: a
  group's coarse query is that of its first real token)."""
  q, k, v = make_qkv(5, 1, 160, 2, 16, 16)
  mask = np.random.default_rng(5).random((1, 160)) < 0.7
  want = numpy_reference(q, k, v, mask, block_size=16, causal=causal)
  xla = hierarchical_attention(q, k, v, block_size=16, causal=causal,
                               mask=mask, implementation="xla")
  assert max_abs(xla, want) <= 2e-5
  for x in (q, k, v):
    x[~mask] = np.nan
  q[0, np.flatnonzero(~mask[0])[:3]] = np.inf
  out = run_pallas(q, k, v, mask, causal=causal)
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 2e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_extreme_rows(tile32_passes, causal):
  """Rows whose logits sit hundreds apart stay exact (per-row max)."""
  q, k, v = make_qkv(7, 1, 128, 1, 16, 16)
  sign = np.where(np.arange(128) < 64, 1.0, -1.0)
  q[0, :, 0, 0] = 64.0 * sign
  k[0, :, 0, 0] = 32.0
  out = run_pallas(q, k, v, None, causal=causal)
  want = numpy_reference(q, k, v, None, block_size=16, causal=causal)
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 1e-4


def _grads(impl, q, k, v, mask, cot, causal, with_output=False):
  """Gradients of sum(out * cot) for q, k, v: ``impl`` or the dense
  reference ("ref"); with ``with_output``, (gradients, out)."""
  def f(q, k, v):
    if impl == "ref":
      out = dense_reference(q, k, v, mask, block_size=16, causal=causal,
                            xp=jnp)
    else:
      out = hierarchical_attention(q, k, v, block_size=16, causal=causal,
                                   mask=mask, implementation=impl)
    return jnp.sum(out * cot), out
  got = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return got if with_output else got[0]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_match_autodiff_of_reference(small_passes, causal):
  length, d, dv = 150, 16, 32
  q, k, v = make_qkv(31, 2, length, 1, d, dv)
  mask = make_mask(31, 2, length, "suffix")
  mask[1, 20:27] = False  # a hole
  cot = np.random.default_rng(32).standard_normal(
      (2, length, 1, dv)).astype(np.float32)

  got = _grads("pallas_interpret", q, k, v, mask, cot, causal)
  want = _grads("ref", q, k, v, mask, cot, causal)
  for name, g, w in zip("qkv", got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert np.isfinite(g).all(), name
    scale = max(1.0, float(np.abs(w).max()))
    assert max_abs(g, w) <= 1e-4 * scale, name
    assert (g[~mask] == 0).all(), name


@pytest.mark.parametrize("schedule", ["tile16", "3-levels", "sweep",
                                      "sweep-short-runs"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_ignore_garbage_in_padding(monkeypatch, schedule, causal):
  """Gradients with holes and NaN / inf in the padding's q, k, v and
  output cotangent equal the reference's on clean inputs (the default
  kernels, three levels per launch, and the backward in one sweep, also
  in runs of 2 and 1 key blocks)."""
  _use_schedule(monkeypatch, schedule)
  q, k, v = make_qkv(41, 1, 160, 2, 16, 16)
  mask = np.random.default_rng(42).random((1, 160)) < 0.7
  mask[0, 64:80] = False  # a whole block of padding
  cot = np.random.default_rng(43).standard_normal(
      (1, 160, 2, 16)).astype(np.float32)
  want = [np.asarray(w) for w in _grads("ref", q, k, v, mask, cot, causal)]
  # Fresh arrays for the garbage: the reference's inputs may share memory
  # with these on the CPU.
  q, k, v = (x.copy() for x in (q, k, v))
  for x in (q, k, v):
    x[~mask] = np.nan
  q[0, np.flatnonzero(~mask[0])[:3]] = np.inf
  cot = cot.copy()
  cot[~mask] = np.nan  # the output there is zero whatever its cotangent
  got = _grads("pallas_interpret", q, k, v, mask, cot, causal)
  for name, g, w in zip("qkv", got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert np.isfinite(g).all(), name
    scale = max(1.0, float(np.abs(w[mask]).max()))
    assert max_abs(g[mask], w[mask]) <= 1e-4 * scale, name
    assert (g[~mask] == 0).all(), name


@pytest.mark.parametrize("d,dv", [(4, 4), (24, 12)])
def test_narrow_and_odd_head_dims(d, dv):
  """Head dims the kernels do not compute at natively (the LRA Pathfinder
  model's 4, and non-powers of two) are zero-padded to 16 / 32 and the
  output sliced; values and gradients still match the definition."""
  assert kernels.kernel_head_dim(d) > d
  length, causal = 100, d == 4
  q, k, v = make_qkv(d + dv, 2, length, 2, d, dv)
  mask = make_mask(d, 2, length, "suffix")
  out = run_pallas(q, k, v, mask, causal=causal)
  assert out.shape == (2, length, 2, dv)
  want = numpy_reference(q, k, v, mask, block_size=16, causal=causal)
  assert max_abs(out, want) <= 2e-5
  cot = np.random.default_rng(d).standard_normal(out.shape).astype(
      np.float32)

  got = _grads("pallas_interpret", q, k, v, mask, cot, causal)
  want = _grads("ref", q, k, v, mask, cot, causal)
  for name, g, w in zip("qkv", got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape, name
    assert max_abs(g, w) <= 1e-4 * max(1.0, float(np.abs(w).max())), name


def test_bfloat16_inputs():
  q, k, v = make_qkv(41, 1, 96, 2, 16, 16)
  want = numpy_reference(q, k, v, None, block_size=16, causal=False)
  out = run_pallas(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), None,
                   causal=False)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  assert np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-2


def test_bfloat16_handover_between_levels(monkeypatch):
  """With bfloat16 inputs the coarse levels hand bfloat16 to the finer ones
  (TUNING handover_dtype="input", the default): output and gradients stay
  within bfloat16 error of the float64 reference, close to the error of a
  float32 hand-over (three levels, causal)."""
  length = 120
  q, k, v = make_qkv(43, 1, length, 1, 16, 16)
  mask = make_mask(43, 1, length, "suffix")
  cot = np.random.default_rng(44).standard_normal(
      (1, length, 1, 16)).astype(np.float32)
  want = [numpy_reference(q, k, v, mask, block_size=16, causal=True)]
  want += [np.asarray(g) for g in _grads("ref", q, k, v, mask, cot, True)]
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  errors = {}
  for handover in ("float32", "input"):
    monkeypatch.setitem(kernels.TUNING, "handover_dtype", handover)
    # New functions each time: traced anew, so the setting takes effect.
    got = [run_pallas(*bf16, mask, causal=True)]
    got += list(_grads("pallas_interpret", *bf16, mask,
                       jnp.asarray(cot, jnp.bfloat16), True))
    errors[handover] = [
        float(np.linalg.norm(np.asarray(g, np.float32) - w)
              / np.linalg.norm(w)) for g, w in zip(got, want)]
  assert errors["input"] != errors["float32"]  # The setting took effect.
  for name, e32, e16 in zip(["out", "dq", "dk", "dv"], errors["float32"],
                            errors["input"]):
    bound = 1e-2 if name == "out" else 2e-2  # Gradients: two roundings.
    assert e32 < bound and e16 < bound, (name, errors)
    assert e16 < 2 * e32 + 1e-3, (name, errors)


@pytest.mark.parametrize("block_size,d,message", [
    (8, 16, "block_size must be a power of two >= 16"),
    (24, 16, "block_size must be a power of two >= 16"),
])
def test_unsupported_inputs_get_a_clear_error(block_size, d, message):
  q = jnp.zeros((1, 64, 1, d))
  with pytest.raises(ValueError, match="implementation='pallas_interpret' "
                     f"cannot run these inputs: {message}"):
    hierarchical_attention(q, q, q, block_size=block_size,
                           implementation="pallas_interpret")


def test_output_in_the_query_dtype():
  """bfloat16 queries and keys with float32 values: computed in float32,
  returned in the query dtype, as the plain path does."""
  q, k, v = make_qkv(3, 1, 64, 1, 16, 16)
  qb, kb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k))
  out = hierarchical_attention(qb, kb, v, block_size=16,
                               implementation="pallas_interpret")
  assert out.dtype == jnp.bfloat16
  want = numpy_reference(np.asarray(qb, np.float32), np.asarray(kb, np.float32),
                         v, None, block_size=16, causal=False)
  assert max_abs(out, want) <= 1e-2
  # A float32 key among bfloat16 queries and values: float32 throughout.
  vb = jnp.asarray(v, jnp.bfloat16)
  run = lambda q, k, v: np.asarray(hierarchical_attention(
      q, k, v, block_size=16, implementation="pallas_interpret"), np.float32)
  np.testing.assert_array_equal(
      run(qb, k, vb), run(*(jnp.asarray(x, jnp.float32) for x in (qb, k, vb)))
      .astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU only")
def test_pallas_on_cpu_is_a_clear_error():
  q = jnp.zeros((1, 64, 1, 16))
  with pytest.raises(ValueError, match="runs on a GPU"):
    hierarchical_attention(q, q, q, implementation="pallas")


def test_a_jax_without_the_triton_backend(monkeypatch):
  """Pallas's Triton backend (deprecated in jax 0.11) gone, as a later jax
  may have it: 'pallas' is an error that says so, and interpret mode, which
  does not need it, still gives the definition's values."""
  assert kernels.triton_missing() is None  # This jax has it.
  monkeypatch.setitem(sys.modules, kernels.TRITON_MODULE, None)
  assert "no Pallas Triton backend" in kernels.triton_missing()
  q, k, v = make_qkv(11, 1, 64, 1, 16, 16)
  with pytest.raises(ValueError, match="cannot run: .*no Pallas Triton"):
    hierarchical_attention(q, k, v, block_size=16, implementation="pallas")
  out = run_pallas(q, k, v, None, causal=True)
  want = numpy_reference(q, k, v, None, block_size=16, causal=True)
  assert max_abs(out, want) <= 2e-5


def test_layers_of_one_shape_trace_the_kernels_once(monkeypatch):
  """``hierarchical_attention_pallas`` is one jitted function per setting:
  a model's layers of one shape share one trace (and one lowering), under
  a gradient too, and eager calls of that shape reuse it; a changed TUNING
  value, or a function of the module replaced, traces anew and computes
  by the new setting."""
  traced = []
  body = kernels._pallas_attention

  def counting(*args, **settings):
    traced.append(args[0].shape)
    return body(*args, **settings)

  monkeypatch.setattr(kernels, "_pallas_attention", counting)
  q, k, v = (jnp.asarray(x) for x in make_qkv(13, 1, 64, 2, 16, 16))
  attend = functools.partial(kernels.hierarchical_attention_pallas,
                             valid=None, block_size=16, causal=True,
                             interpret=True)

  def model(q, k, v):
    h = q
    for _ in range(3):
      h = h + attend(h, k, v)
    return jnp.sum(h * h)

  grads = jax.jit(jax.grad(model, argnums=(0, 1, 2)))(q, k, v)
  assert len(traced) == 1
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  out = attend(q, k, v)
  assert max_abs(attend(q, k, v), out) == 0
  assert len(traced) == 1
  want = numpy_reference(*(np.asarray(x) for x in (q, k, v)), None,
                         block_size=16, causal=True)
  assert max_abs(out, want) <= 2e-5
  # Another setting: traced again, and the call runs it. A forward and a
  # backward of every level on its own (no tail) equal the defaults'.
  monkeypatch.setitem(kernels.TUNING, "tail_rows", 0)
  assert max_abs(attend(q, k, v), want) <= 2e-5
  assert len(traced) == 2
  # A function replaced: traced again, with it.
  monkeypatch.setattr(kernels, "unsupported_reason",
                      lambda *args: "replaced")
  with pytest.raises(ValueError, match="cannot run these inputs: replaced"):
    attend(q, k, v)
  assert len(traced) == 3


def test_level_groups():
  # 4096 tokens, block 16: 8 levels (4096 .. 32 rows); tiles of 64.
  groups = kernels._level_groups(4096, 8, 64, 16, 3)
  assert groups == [(0, 3, 64), (3, 3, 64), (6, 2, 64)]
  # One level per launch: the plain schedule, tile capped by the level.
  assert kernels._level_groups(256, 4, 64, 16, 1) == [
      (0, 1, 64), (1, 1, 64), (2, 1, 64), (3, 1, 32)]
  # Every level's tile keeps >= 16 rows and >= one block.
  assert kernels._level_groups(256, 4, 64, 16, 8) == [(0, 3, 64), (3, 1, 32)]
  assert kernels._level_groups(1024, 4, 64, 64, 3) == [
      (0, 1, 64), (1, 1, 64), (2, 1, 64), (3, 1, 64)]
  for n0, levels, tile, nr, k in [(65536, 12, 64, 16, 3), (2048, 5, 128, 32, 4)]:
    groups = kernels._level_groups(n0, levels, tile, nr, k)
    assert [f for f, _, _ in groups] == list(
        np.cumsum([0] + [g for _, g, _ in groups[:-1]]))
    assert sum(g for _, g, _ in groups) == levels
    for first, g, t in groups:
      assert t == min(tile, n0 >> first) and (t >> (g - 1)) >= max(16, nr)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_pyramid_same_for_any_heads_per_program(monkeypatch, causal):
  """Pyramid programs of several heads or rows, the XLA pyramid and the
  pyramid by products give the one-head, 2**count-row coarse queries, keys
  and values (d != dv, padded rows)."""
  rng = np.random.default_rng(0)
  b, n, h, d, dv = 2, 64, 4, 16, 32
  q, k = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
          for _ in range(2))
  v = jnp.asarray(rng.standard_normal((b, n, h, dv)), jnp.float32)
  real = np.arange(n)[None, :] < np.array([[50], [64]])
  # Holes at the start of groups of 2, 4 and 8 rows that hold real rows.
  real[0, [0, 4, 5, 8, 9, 10, 16, 17, 18, 19, 20, 21, 22]] = False
  c0 = jnp.asarray(real, jnp.float32)
  monkeypatch.setattr(kernels, "_CHUNK_LEVELS", 2)
  got = {}
  for heads, rows, impl in ((1, 0, "pallas"), (2, 0, "pallas"),
                            (4, 16, "pallas"), (1, 64, "pallas"),
                            (1, 0, "xla"), (1, 0, "dot"), (2, 64, "dot"),
                            (1, 32, "dot")):
    monkeypatch.setitem(kernels.TUNING, "coarsen_heads", heads)
    monkeypatch.setitem(kernels.TUNING, "coarsen_rows", rows)
    monkeypatch.setitem(kernels.TUNING, "coarsen_impl", impl)
    got[heads, rows, impl] = jax.tree.map(np.asarray, kernels._pyramid(
        q, k, v, c0, 4, causal, True))
  base = got.pop((1, 0, "pallas"))
  assert len(base) == 4 and base[3][0].shape == (b, n // 8, h, d)
  assert base[3][2].shape == (b, n // 8, h, dv)
  # Level 1 by hand: the mean (or first) of each pair of real rows.
  c = np.asarray(c0)[:, :, None, None]
  pair = lambda x: x.reshape(b, n // 2, 2, *x.shape[2:])
  mean = lambda x: (pair(np.asarray(x) * c).sum(2)
                    / np.maximum(pair(c).sum(2), 1.0))
  np.testing.assert_allclose(base[1][1], mean(k), atol=1e-6)
  if not causal:
    np.testing.assert_allclose(base[1][0], mean(q), atol=1e-6)
  # Causal, every level: the query of the group's first real row (zero
  # where the group has none).
  for level in range(1, 4) if causal else ():
    g = 2**level
    groups = real.reshape(b, n // g, g)
    first = groups.argmax(-1) + np.arange(0, n, g)
    want = np.take_along_axis(np.asarray(q), first[:, :, None, None], 1)
    want = np.where(groups.any(-1)[:, :, None, None], want, 0.0)
    np.testing.assert_allclose(base[level][0], want, atol=1e-6)
  for other in got.values():  # The same sums; XLA may round the division
    for level in range(4):      # differently for other block shapes.
      for a, e in zip(other[level], base[level]):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl,rows", [("dot", 64), ("pallas", 0),
                                       ("xla", 0)])
def test_causal_pyramid_without_a_mask_takes_first_tokens(monkeypatch, impl,
                                                          rows):
  """Without a mask (padding only at the end) the causal pyramid takes each
  group's first query, no select: the same as the first real one there."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 2, 16)), jnp.float32)
             for _ in range(3))
  c0 = jnp.asarray(np.arange(64)[None, :] < np.array([[37], [64]]),
                   jnp.float32)
  monkeypatch.setattr(kernels, "_CHUNK_LEVELS", 2)
  monkeypatch.setitem(kernels.TUNING, "coarsen_impl", impl)
  monkeypatch.setitem(kernels.TUNING, "coarsen_rows", rows)
  assert kernels._query_mode(True, False) == "first"
  first, real = (jax.tree.map(np.asarray, kernels._pyramid(
      q, k, v, c0, 4, True, True, masked)) for masked in (False, True))
  for level in range(1, 4):
    want = np.asarray(q)[:, ::2**level]
    want = np.where(np.asarray(real[level][3])[:, :, None, None] > 0, want,
                    0.0)
    np.testing.assert_array_equal(first[level][0], want)
    np.testing.assert_array_equal(real[level][0], want)


@pytest.mark.parametrize("passes", [2, 3], ids=["pass2", "pass3"])
@pytest.mark.parametrize("causal,masked", [(False, True), (True, True),
                                           (True, False)],
                         ids=["mean", "first_real", "first"])
def test_mosaic_pyramid_matches_xla(monkeypatch, causal, masked, passes):
  """The pyramid in Mosaic GPU passes (``coarsen_impl="mosaic"``, interpret
  mode): passes of two levels chained (1024 rows: levels 0-2, 2-4), or of
  three (``pyramid_pass``: levels 0-3, then 3-5 in two), the levels too
  short for a pass by the "dot" kernel, q and k of another width than v,
  holes and padding whose rows hold NaN and inf. The levels of XLA's
  reductions: exactly those of the first pass and every selected query; a
  mean from a later pass starts from the last pass's rounded means (XLA's
  from float32 sums over the 6 levels of its pass), one rounding of
  bfloat16 apart."""
  monkeypatch.setitem(kernels.TUNING, "pyramid_pass", passes)
  rng = np.random.default_rng(3)
  b, n, h, d, dv, levels = 2, 1024, 2, 16, 64, 6
  c = np.ones((b, n), np.float32)
  c[0, 900:] = 0.0
  if masked:  # holes at the start of groups of 2 .. 64 rows
    c[1, [0, 2, 3, 64, 65, 66, 67]] = 0.0
    c[1, 128:192] = 0.0
  q, k = (rng.standard_normal((b, n, h, d)).astype(np.float32)
          for _ in range(2))
  v = rng.standard_normal((b, n, h, dv)).astype(np.float32)
  for x, bad in ((q, np.nan), (k, np.inf), (v, -np.inf)):
    x[c == 0] = bad
  args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(c)]
  got = {}
  for impl in ("mosaic", "xla"):
    monkeypatch.setitem(kernels.TUNING, "coarsen_impl", impl)
    got[impl] = jax.tree.map(np.asarray, kernels._pyramid(
        *args, levels, causal, True, masked))
  for level in range(1, levels):
    for name, a, e in zip("qkvc", got["mosaic"][level], got["xla"][level]):
      a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
      assert np.isfinite(a).all(), (level, name)
      assert (a[np.asarray(got["xla"][level][3]) == 0] == 0).all()
      if level <= passes or name == "c" or (name == "q" and causal):
        np.testing.assert_array_equal(a, e, err_msg=f"level {level} {name}")
      else:
        np.testing.assert_allclose(a, e, rtol=2**-7, atol=2**-8,
                                   err_msg=f"level {level} {name}")


@pytest.mark.parametrize("width,dtype", [(16, "bfloat16"), (64, "float16"),
                                         (128, "bfloat16"), (64, "float32"),
                                         (128, "float32")])
def test_mosaic_coarsen_lowers_for_hopper_where_it_fits(monkeypatch, width,
                                                        dtype):
  """The Mosaic GPU pyramid pass compiled (lowered) for a Hopper GPU from
  this CPU: it lowers wherever ``coarsen_smem`` says it fits in shared
  memory, which the kernels check before choosing it; float32 rows of
  128 do not fit (Mosaic GPU says so when lowering), and the pyramid
  takes the products kernel (a ``pallas_call``) for them instead. Rows of
  256 bytes (128 bfloat16, 64 float32) take one output slot: two need
  233,488 bytes (the GPU refused them at 65,536 tokens); two where the
  counts are a number (no mask, no padding: no count vectors loaded)."""
  # Enough steps per program for the pipeline's two stages.
  x = jax.ShapeDtypeStruct((1, 16384, 8, width), dtype)
  c = jax.ShapeDtypeStruct((1, 16384), jnp.float32)
  modes = ["first_real", "mean", "first"]
  fits = [s for s in (2, 1) if mosaic.coarsen_smem(
      [x] * 3, modes, 2, out_slots=s) <= mosaic.SMEM_BYTES]
  lower = lambda slots: jax.jit(lambda a, b, e, c: mosaic.coarsen(
      [a, b, e], modes, c, 2, out_slots=slots)).trace(x, x, x, c).lower(
          lowering_platforms=("cuda",))
  if fits:
    assert "mosaic_gpu" in lower(fits[0]).as_text()
  row_bytes = jnp.dtype(dtype).itemsize * width
  refused = [1] if not fits else [2] if row_bytes == 256 else []
  assert fits == {512: [], 256: [1]}.get(row_bytes, [2, 1])
  for slots in refused:
    with pytest.raises(ValueError, match="exceeds available shared memory"):
      lower(slots)
  monkeypatch.setitem(kernels.TUNING, "coarsen_impl", "mosaic")
  pyramid = jax.make_jaxpr(lambda x, c: kernels._pyramid(
      x, x, x, c, 3, False, True))(jnp.zeros(x.shape, dtype),
                                   jnp.ones(c.shape))
  names = {e.primitive.name for e in jaxpr_equations(pyramid.jaxpr)}
  assert ("pallas_call" in names) == (not fits), names
  # Counts taken as a number (``kernels.Uniform``) load no count vectors:
  # rows of 256 bytes then take two output slots, which lower.
  uniform = [s for s in (2, 1) if mosaic.coarsen_smem(
      [x] * 3, modes, 2, out_slots=s, counts=False) <= mosaic.SMEM_BYTES]
  assert uniform == {512: [], 256: [2, 1]}.get(row_bytes, [2, 1])
  if uniform:
    text = jax.jit(lambda a, b, e: mosaic.coarsen(
        [a, b, e], modes, 1.0, 2, out_slots=uniform[0])).trace(
            x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    arrays = [jnp.zeros(x.shape, dtype)] * 3
    # Passes of two levels (the default takes three where they fit).
    monkeypatch.setitem(kernels.TUNING, "pyramid_pass", 2)
    for counts in (True, False):
      [(_, slots)] = kernels._mosaic_pass(arrays, modes, 6, counts)[1]
      assert slots == (fits if counts else uniform)[0]


def _pyramid_launches(jaxpr):
  """(kind, levels) of each launch in a traced pyramid: a Mosaic GPU pass
  (a ``custom_vmap_call`` in interpret mode) or a "dot" kernel, each with
  one output per level and array (q, k, v)."""
  kinds = {"custom_vmap_call": "mosaic", "pallas_call": "dot"}
  return [(kinds[e.primitive.name], len(e.outvars) // 3)
          for e in jaxpr.eqns if e.primitive.name in kinds]


@pytest.mark.parametrize("width,masked,tuning,want", [
    (64, False, {}, ["mosaic 3 (slots 1)", "mosaic 2 (slots 2)", "dot 1"]),
    (64, False, {"pyramid_pass": 2},
     ["mosaic 2 (slots 2)", "mosaic 2 (slots 2)", "dot 2"]),
    # Three steps ahead fit passes of two levels only.
    (64, False, {"pyramid_stages": 3},
     ["mosaic 2 (slots 2)", "mosaic 2 (slots 2)", "dot 2"]),
    # Counts as arrays (a mask): their vectors fit beside the blocks.
    (64, True, {}, ["mosaic 3 (slots 1)", "mosaic 2 (slots 2)", "dot 1"]),
    (128, False, {}, ["mosaic 2 (slots 2)", "mosaic 2 (slots 2)", "dot 2"]),
    # Rows of 128 three steps ahead fit no pass: the "dot" kernel's.
    (128, False, {"pyramid_stages": 3}, ["dot 6"]),
])
def test_pyramid_plan_is_the_pyramid_the_kernels_build(monkeypatch, width,
                                                       masked, tuning,
                                                       want):
  """``kernels.pyramid_plan`` (what ``profile_kernels.py`` reports with a
  setting) names the launches the forward's pyramid makes under TUNING:
  traced with the Mosaic GPU passes (interpret mode), 2,048 tokens in
  blocks of 16 (levels 1-6 to build)."""
  monkeypatch.setitem(kernels.TUNING, "coarsen_impl", "mosaic")
  for key, value in tuning.items():
    monkeypatch.setitem(kernels.TUNING, key, value)
  x = jax.ShapeDtypeStruct((1, 2048, 2, width), jnp.bfloat16)
  plan = kernels.pyramid_plan(x.shape, x.dtype, 16, uniform=not masked)
  assert plan == want
  c = (jax.ShapeDtypeStruct((1, 2048), jnp.float32) if masked else
       kernels.Uniform(1.0, (1, 2048)))
  traced = jax.make_jaxpr(lambda q, k, v, *c: kernels._pyramid(
      q, k, v, c[0] if c else kernels.Uniform(1.0, (1, 2048)), 7, False,
      True, masked))(x, x, x, *([c] if masked else []))
  assert _pyramid_launches(traced.jaxpr) == [
      (kind, int(levels)) for kind, levels, *_ in (p.split() for p in plan)]


@pytest.mark.parametrize("width,dtype", [(16, "bfloat16"), (64, "bfloat16"),
                                         (128, "bfloat16")])
def test_mosaic_pyramid_passes_of_three_levels_where_they_fit(monkeypatch,
                                                              width, dtype):
  """``pyramid_pass=3``: a pass of three levels reads 8 blocks a step, so
  by ``coarsen_smem`` 16-bit rows of 64 fit in shared memory with one
  output slot, rows of 16 with two, rows of 128 not at all: their passes
  stay at two levels. The chosen pass lowers for Hopper from this CPU
  (Mosaic GPU checks its shared memory there)."""
  x = jax.ShapeDtypeStruct((1, 16384, 8, width), dtype)
  c = jax.ShapeDtypeStruct((1, 16384), jnp.float32)
  modes = ["mean", "mean", "mean"]
  fits = [s for s in (2, 1) if mosaic.coarsen_smem(
      [x] * 3, modes, 3, out_slots=s) <= mosaic.SMEM_BYTES]
  assert fits == {16: [2, 1], 64: [1], 128: []}[width]
  lower = lambda slots: jax.jit(lambda a, b, e, c: mosaic.coarsen(
      [a, b, e], modes, c, 3, out_slots=slots)).trace(x, x, x, c).lower(
          lowering_platforms=("cuda",))
  if fits:
    assert "mosaic_gpu" in lower(fits[0]).as_text()
  arrays = [jnp.zeros(x.shape, dtype)] * 3
  monkeypatch.setitem(kernels.TUNING, "pyramid_pass", 2)
  assert kernels._mosaic_pass(arrays, modes, 6)[0] == 2
  monkeypatch.setitem(kernels.TUNING, "pyramid_pass", 3)  # the default
  step, launches = kernels._mosaic_pass(arrays, modes, 6)
  assert (step, launches) == ((3, [([0, 1, 2], fits[0])]) if fits else
                              (2, [([0, 1, 2], 1)]))
  assert kernels._mosaic_pass(arrays, modes, 1)[0] == 1  # the last level
  # 256 rows: a pass of three levels needs 512.
  assert kernels._mosaic_pass([a[:, :256] for a in arrays], modes, 6)[0] == 2
  # Steps loaded ahead (``pyramid_stages``): what is chosen lowers; at 3
  # or more, rows of 128 fit no pass (the "dot" kernel's turn).
  for stages in (1, 3, 4):
    monkeypatch.setitem(kernels.TUNING, "pyramid_stages", stages)
    chosen = kernels._mosaic_pass(arrays, modes, 6)
    assert (chosen is None) == (width == 128 and stages >= 3), stages
    if chosen:
      [(_, slots)] = chosen[1]
      text = jax.jit(lambda a, b, e, c: mosaic.coarsen(
          [a, b, e], modes, c, chosen[0], out_slots=slots,
          stages=stages)).trace(x, x, x, c).lower(
              lowering_platforms=("cuda",)).as_text()
      assert "mosaic_gpu" in text, stages


def test_mosaic_coarsen_takes_a_number_for_the_counts():
  """``mosaic.coarsen`` with one number for every row's count (no mask,
  no padding: no counts loaded) gives what the same counts as an array
  give, in every mode (interpret mode)."""
  rng = np.random.default_rng(5)
  arrays = [jnp.asarray(rng.standard_normal((1, 512, 2, 16)), jnp.bfloat16)
            for _ in range(3)]
  modes = ["mean", "first", "first_real"]
  for count in (1.0, 4.0):
    got = mosaic.coarsen(arrays, modes, count, 2, interpret=True)
    want = mosaic.coarsen(arrays, modes, jnp.full((1, 512), count), 2,
                          interpret=True)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(e, np.float32))


def test_mosaic_coarsen_takes_several_steps_per_program():
  """``mosaic.coarsen`` with one program per (batch row, head)
  (``programs=1``): each program runs two pipeline steps of 64 groups
  (both its stages), whose levels go to their own groups' rows; every
  mode, with holes, equals one step per program (the default at this
  length) in interpret mode."""
  rng = np.random.default_rng(9)
  c = np.ones((1, 512), np.float32)
  c[0, [0, 2, 3, 257, 258, 259, 300]] = 0.0
  c[0, 480:] = 0.0
  arrays = [jnp.asarray(rng.standard_normal((1, 512, 1, 16)), jnp.bfloat16)
            for _ in range(3)]
  modes = ["mean", "first", "first_real"]
  got, want = (mosaic.coarsen(arrays, modes, jnp.asarray(c), 2,
                              programs=programs, interpret=True)
               for programs in (1, None))
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(e, np.float32))


def test_mosaic_pyramid_loads_no_counts_where_they_are_a_number(
    monkeypatch):
  """The Mosaic GPU pyramid's passes over counts known when tracing
  (``kernels.Uniform``) are chosen without count vectors in shared
  memory: 16-bit rows of 128 then take two output slots per pass, where
  counts as an array leave room for one (traced, not run)."""
  monkeypatch.setitem(kernels.TUNING, "pyramid_pass", 2)
  slots = []
  coarsen = mosaic.coarsen

  def recorded(*args, **kwargs):
    slots.append(kwargs["out_slots"])
    return coarsen(*args, **kwargs)

  monkeypatch.setattr(mosaic, "coarsen", recorded)
  x = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
  modes = ["first_real", "mean", "first"]
  for c, want in ((kernels.Uniform(1.0, (1, 1024)), 2),
                  (jnp.ones((1, 1024)), 1)):
    slots.clear()
    jax.eval_shape(lambda x: kernels._coarsen_mosaic(
        [x] * 3, modes, c, 4, False, 0), x)
    assert slots == [want, want]


def test_mosaic_coarsen_rejects_what_it_cannot_tile():
  x = jnp.zeros((1, 384, 1, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiple of 256, got 384"):
    mosaic.coarsen([x], ["mean"], jnp.ones((1, 384)), 2, interpret=True)
  y = jnp.zeros((1, 512, 1, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="arrays of one shape and dtype"):
    mosaic.coarsen([y, y[..., :16]], ["mean"] * 2, jnp.ones((1, 512)), 2,
                   interpret=True)


def _level_counts(key, b, n, level):
  """Real-token counts [b, n] of a level: 0 or 1 at level 0, 0 to 2 at a
  coarser one (0, 1 or 2 real tokens under a row; the kernels read them
  as weights), with holes, a padded end and a stretch of no real token."""
  c = jax.random.randint(key, (b, n), -1, 3 if level else 2).astype(
      jnp.float32)
  c = jnp.maximum(c, 0.0)
  return c.at[0, n - 100:].set(0.0).at[1, 64:128].set(0.0)


def _garbage(c, arrays):
  """``arrays`` with NaN in the rows of no real token (counts c), and inf
  in a few of them: what a mask may leave there."""
  padding = (c == 0)[:, :, None, None]
  inf_rows = padding & (jnp.arange(c.shape[1]) % 7 == 0)[None, :, None, None]
  return [jnp.where(inf_rows, jnp.inf, jnp.where(padding, jnp.nan, x))
          .astype(x.dtype) for x in arrays]


def check_mosaic_forward_level(nr, n, heads, interpret, lse_atol,
                               causal=False, level=0, zero_rows=False):
  """``mosaic.forward_level`` against the Triton forward of ``level``,
  both in interpret mode or both compiled (tests/test_gpu.py), with a
  parent level: holes, a padded end, a parent row of no key, query rows
  that are not real (at level 0 zeroed queries, zero output; coarser, rows
  of zeros, as the pyramid makes them, and keys weighted by counts of 1
  or 2). The log-normaliser is compared where the Triton kernel computes
  it (it skips tiles of padding only). ``zero_rows`` (level 0): the Mosaic
  GPU kernel gets NaN and inf in q, k and v on those rows and zeroes v's
  itself."""
  keys = jax.random.split(jax.random.key(nr + 10 * level), 6)
  b, d = 2, 64
  q, k, v = (jax.random.normal(x, (b, n, heads, d), jnp.bfloat16)
             for x in keys[:3])
  c = _level_counts(keys[5], b, n, level)
  if zero_rows:  # Windows with no padding too (the kernel skips them).
    c = c.at[:, 128:320].set(1.0)
  if level:
    q, k, v = (jnp.where(c[:, :, None, None] > 0, x, 0) for x in (q, k, v))
  po = jax.random.normal(keys[3], (b, n // 2, heads, d), jnp.bfloat16)
  plse = 3 * jax.random.normal(keys[4], (b, heads, n // 2), jnp.float32)
  plse = plse.at[:, :, 7].set(kernels._NO_KEY)

  def triton(q, k, v, c, po, plse):
    # The level's arrays at its index of a pyramid (the kernel's level).
    return kernels._group_forward(
        [None] * level + [(q, k, v, c)], level, 1, 16, (po, plse), nr=nr,
        causal=causal, scale=0.125, out_dtype=jnp.bfloat16,
        precision=jax.lax.Precision.DEFAULT, interpret=interpret,
        masked=True)

  args = (q, k, v, c, po, plse)
  theirs = (*_garbage(c, (q, k, v)), *args[3:]) if zero_rows else args
  o, lse = jax.jit(lambda *a: mosaic.forward_level(
      *a, nr=nr, scale=0.125, causal=causal, level=level,
      zero_rows=zero_rows, interpret=interpret))(*theirs)
  want_o, want_lse = jax.jit(triton)(*args)
  o, want_o = np.asarray(o, np.float32), np.asarray(want_o, np.float32)
  real = np.asarray(c) > 0
  if level == 0:  # Rows of no real token: zero.
    assert (o[~real] == 0).all()
  else:  # Rows of no real token reach no real row: not compared (the
    o, want_o = o[real], want_o[real]  # Triton kernel skips some).
  np.testing.assert_allclose(o, want_o, rtol=2**-7, atol=2**-7)
  lse, want_lse = np.asarray(lse), np.asarray(want_lse)
  computed = want_lse > 0.5 * kernels._NO_KEY
  assert computed.mean() > 0.7
  np.testing.assert_allclose(lse[computed], want_lse[computed],
                             atol=lse_atol)


def check_mosaic_backward_level(nr, n, heads, interpret, d=64,
                                causal=False, level=0, zero_rows=False):
  """``mosaic.dq_level`` and ``mosaic.dkv_level`` against the Triton dq
  and dk, dv kernels of ``level``, both in interpret mode or both compiled
  (tests/test_gpu.py), with a parent level: holes, a padded end, rows of
  no real token (M = _NO_ROW, E = 0; zero gradients at level 0, the
  parent's share at coarser levels, whose keys weigh their counts of 1 or
  2). ``zero_rows`` (level 0): the Mosaic GPU kernels get NaN and inf in
  q, k, v and dO on those rows and zero what they must themselves."""
  keys = jax.random.split(jax.random.key(nr + 1 + 10 * level), 8)
  b = 2
  q, k, v, g = (jax.random.normal(x, (b, n, heads, d), jnp.bfloat16)
                for x in keys[:4])
  c = _level_counts(keys[4], b, n, level)
  if zero_rows:  # Windows with no padding too (the kernels skip them).
    c = c.at[:, 128:320].set(1.0)
  real = (c > 0)[:, None, :]
  e = jnp.where(real, jax.random.normal(keys[5], (b, heads, n)), 0.0)
  m = jnp.where(real, 2 + jax.random.normal(keys[6], (b, heads, n)),
                kernels._NO_ROW)
  pdq, pdk, pdv = (jax.random.normal(x, (b, n // 2, heads, d), jnp.bfloat16)
                   for x in jax.random.split(keys[7], 3))
  total = jnp.repeat(c.reshape(b, n // 2, 2).sum(-1), 2, axis=-1)
  w_k = jnp.where(total > 0, c / jnp.where(total > 0, total, 1.0), 0.0)
  # Causal queries (with a mask) go to the first real row of each pair.
  first = jnp.repeat(c[:, ::2] > 0, 2, axis=-1)
  even = (jnp.arange(n) % 2 == 0)[None]
  w_q = jnp.where(even, first, ~first).astype(jnp.float32) if causal else w_k
  # As the caller zeroes them at level 0 (garbage may be there with a
  # mask), and the pyramid and the restriction at coarser levels (v too).
  q, k, g = (jnp.where(c[:, :, None, None] > 0, x, 0) for x in (q, k, g))
  if level:
    v = jnp.where(c[:, :, None, None] > 0, v, 0)

  def triton(q, k, v, c, g, e, m, pdq, pdk, pdv):
    return kernels._group_backward(
        [None] * level + [(q, k, v, c)], [None] * level + [(g, e, m)],
        level, 1, 16, (pdq, pdk, pdv), nr=nr, causal=causal, scale=0.125,
        out_dtypes=(jnp.bfloat16,) * 3, precision=jax.lax.Precision.DEFAULT,
        interpret=interpret, masked=True)

  args = (q, k, v, c, g, e, m)
  theirs = args
  if zero_rows:
    bad_q, bad_k, bad_v, bad_g = _garbage(c, (q, k, v, g))
    theirs = (bad_q, bad_k, bad_v, c, bad_g, e, m)
  common = dict(nr=nr, scale=0.125, causal=causal, level=level,
                zero_rows=zero_rows, interpret=interpret)
  dq = jax.jit(lambda *a: mosaic.dq_level(*a, pdq, w_q, **common))(*theirs)
  dk, dv = jax.jit(lambda *a: mosaic.dkv_level(
      *a, pdk, pdv, w_k, **common))(*theirs)
  want = jax.jit(triton)(*args, pdq, pdk, pdv)
  real = np.asarray(c) > 0
  for name, got, ref in zip(["dq", "dk", "dv"], (dq, dk, dv), want):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    if level == 0:  # Rows of no real token: zero.
      assert (got[~real] == 0).all(), name
    else:  # They reach no real row (their children have no real token,
      # and level 0 zeroes those): not compared (the Triton kernel skips
      got, ref = got[real], ref[real]  # some, some take a parent's share).
    scale = float(np.abs(ref).max())
    assert scale > 1, name
    np.testing.assert_allclose(got, ref, rtol=2**-7, atol=2**-7 * scale,
                               err_msg=name)


@pytest.mark.parametrize("nr,causal,level,zero_rows", [
    (16, True, 0, False), (64, True, 0, False), (16, False, 1, False),
    (32, True, 2, False), (16, False, 0, True), (32, True, 0, True),
    (64, False, 0, True)])
def test_mosaic_backward_level_matches_the_triton_kernels(
    nr, causal, level, zero_rows):
  """In interpret mode (``check_mosaic_backward_level``)."""
  check_mosaic_backward_level(nr, n=512, heads=2, interpret=True,
                              causal=causal, level=level,
                              zero_rows=zero_rows)


@pytest.mark.parametrize("nr,d,level", [(16, 64, 0), (32, 128, 0),
                                        (64, 32, 0), (16, 64, 1),
                                        (64, 128, 3)])
def test_mosaic_level_kernels_lower_for_hopper(nr, d, level):
  """The forward, dq and dk, dv compiled (lowered) for a Hopper GPU from
  this CPU, with enough steps per program for two stages, at the stages
  their shared memory allows, at level 0 and coarser (their band and
  count weights): Mosaic GPU's layout inference, tensor-core shapes and
  shared-memory check accept them."""
  x = jax.ShapeDtypeStruct((1, 8192, 16, d), jnp.bfloat16)
  po = jax.ShapeDtypeStruct((1, 4096, 16, d), jnp.bfloat16)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  stats = (x, f32(1, 16, 8192), f32(1, 16, 8192))  # dO, E, M
  for fn, args, stages in (
      (mosaic.forward_level, (po, f32(1, 16, 4096)),
       mosaic.forward_level_stages),
      (mosaic.dq_level, (*stats, po, f32(1, 8192)), mosaic.dq_level_stages),
      (mosaic.dkv_level, (*stats, po, po, f32(1, 8192)),
       mosaic.dkv_level_stages)):
    stages = stages(nr, d, jnp.bfloat16)
    assert stages in (1, 2)
    # Level 0 with its rows of no real token zeroed in shared memory.
    lowered = jax.jit(lambda *a: fn(
        *a, nr=nr, scale=0.125, level=level, stages=stages,
        zero_rows=level == 0)).trace(
            x, x, x, f32(1, 8192), *args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def check_mosaic_level_numbers(level, causal, interpret, n=256, heads=2,
                               d=32):
  """The Mosaic GPU level kernels (forward, dq, and dk, dv) given the
  counts as a number (2**level: every row real) and the prolongation
  weights as one (1/2: keys, and queries by the mean) or "first" (causal
  queries: 1 on each pair's first row) against the same counts and
  weights as arrays: equal in interpret mode, to bfloat16 rounding
  compiled (tests/test_gpu.py)."""
  b = 2
  keys = jax.random.split(jax.random.key(70 + level), 10)
  full = lambda key, rows: jax.random.normal(key, (b, rows, heads, d),
                                             jnp.bfloat16)
  q, k, v, g = (full(x, n) for x in keys[:4])
  po, pdq, pdk, pdv = (full(x, n // 2) for x in keys[4:8])
  plse = 3 * jax.random.normal(keys[8], (b, heads, n // 2), jnp.float32)
  e, m = (2 * jax.random.normal(x, (b, heads, n)) for x in jax.random.split(
      keys[9]))
  count = float(2**level)
  w_q = "first" if causal else 0.5
  common = dict(nr=16, scale=0.125, causal=causal, level=level,
                interpret=interpret)

  def kernels_of(c, wq, wk):
    return (*mosaic.forward_level(q, k, v, c, po, plse, **common),
            mosaic.dq_level(q, k, v, c, g, e, m, pdq, wq, **common),
            *mosaic.dkv_level(q, k, v, c, g, e, m, pdk, pdv, wk, **common))

  got = jax.jit(lambda: kernels_of(count, w_q, 0.5))()
  want = jax.jit(lambda: kernels_of(jnp.full((b, n), count),
                                    _weights_array(w_q, b, n),
                                    _weights_array(0.5, b, n)))()
  for name, x, y in zip(["o", "lse", "dq", "dk", "dv"], got, want):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    scale = float(np.abs(y).max())
    assert np.isfinite(x).all() and scale > 0.1, name
    rtol = 1e-6 if interpret else 2**-7
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale,
                               err_msg=name)


def _weights_array(w, b, n):
  """Prolongation weights [b, n] as ``mosaic.dq_level`` takes them as a
  number or "first"."""
  if w == "first":
    return jnp.broadcast_to((jnp.arange(n) % 2 == 0).astype(jnp.float32),
                            (b, n))
  return jnp.full((b, n), w, jnp.float32)


@pytest.mark.parametrize("level,causal", [(0, False), (0, True), (1, True)],
                         ids=["l0-bidir", "l0-causal", "l1-causal"])
def test_mosaic_level_kernels_take_numbers_for_counts_and_weights(level,
                                                                  causal):
  """Where every row is real (no mask, no padding: ``kernels.Uniform``),
  the Mosaic GPU level kernels take the counts and the prolongation
  weights as numbers: the values equal those of the same as arrays
  (``check_mosaic_level_numbers``, interpret mode), and lowered for a
  Hopper GPU each kernel reads one array fewer (the forward: the counts)
  or two (dq, and dk, dv: the weights too). Counts of 0, or zeroing rows
  of no real token by counts that are a number, are errors."""
  check_mosaic_level_numbers(level, causal, interpret=True)
  b, n = 1, 4096
  x = jax.ShapeDtypeStruct((b, n, 4, 64), jnp.bfloat16)
  half = jax.ShapeDtypeStruct((b, n // 2, 4, 64), jnp.bfloat16)
  rows = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  stats = (x, rows(b, 4, n), rows(b, 4, n))  # dO, E, M
  common = dict(nr=16, scale=0.125, causal=causal, level=level)

  def operands(c, wq, wk):
    text = jax.jit(lambda q, k, v, g, e, m, po, plse: (
        *mosaic.forward_level(q, k, v, c, po, plse, **common),
        mosaic.dq_level(q, k, v, c, g, e, m, po, wq, **common),
        *mosaic.dkv_level(q, k, v, c, g, e, m, po, po, wk, **common))).trace(
            x, x, x, *stats, half, rows(b, 4, n // 2)).lower(
                lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", text)
    return [len(x.split(",")) for x in calls]

  w_q = "first" if causal else 0.5
  assert operands(float(2**level), w_q, 0.5) == [5, 7, 8]
  assert operands(jnp.ones((b, n)), _weights_array(w_q, b, n),
                  _weights_array(0.5, b, n)) == [6, 9, 10]
  q = jnp.zeros((1, 256, 2, 32), jnp.bfloat16)
  with pytest.raises(ValueError, match="positive number"):
    mosaic.forward_level(q, q, q, 0.0, q[:, :128], jnp.zeros((1, 2, 128)),
                         interpret=True, **common)
  with pytest.raises(ValueError, match="give the counts as an array"):
    mosaic.dq_level(q, q, q, 1.0, q, *jnp.zeros((2, 1, 2, 256)), q[:, :128],
                    0.5, interpret=True, zero_rows=True, **common)


def test_mosaic_level_kernels_take_several_tiles_per_program():
  """The Mosaic GPU level kernels with one program per (batch row, head)
  (``programs=1``): each runs the 4 tiles of 256 rows through its two
  pipeline stages (a slot refilled with the tile two ahead), and the
  forward, dq and dk, dv equal those of one tile per program (the default
  at this length) in interpret mode, at a coarse level (keys weighted by
  counts of 0 to 2) with prolongation weights as arrays."""
  b, n, heads, d = 1, 256, 1, 32
  keys = jax.random.split(jax.random.key(80), 11)
  c = jnp.maximum(jax.random.randint(keys[0], (b, n), -1, 3), 0).astype(
      jnp.float32)
  full = lambda key, rows: jax.random.normal(key, (b, rows, heads, d),
                                             jnp.bfloat16)
  q, k, v, g = (jnp.where(c[:, :, None, None] > 0, full(x, n), 0)
                for x in keys[1:5])
  po, pdq, pdk, pdv = (full(x, n // 2) for x in keys[5:9])
  plse = 3 * jax.random.normal(keys[9], (b, heads, n // 2), jnp.float32)
  e, m = (2 * jax.random.normal(x, (b, heads, n))
          for x in jax.random.split(keys[10]))
  w = _weights_array(0.5, b, n)

  def kernels_of(programs):
    common = dict(nr=16, scale=0.125, causal=True, level=1,
                  programs=programs, interpret=True)
    return (*mosaic.forward_level(q, k, v, c, po, plse, **common),
            mosaic.dq_level(q, k, v, c, g, e, m, pdq, w, **common),
            *mosaic.dkv_level(q, k, v, c, g, e, m, pdk, pdv, w, **common))

  got = jax.jit(lambda: kernels_of(1))()
  want = jax.jit(lambda: kernels_of(None))()
  for name, x, y in zip(["o", "lse", "dq", "dk", "dv"], got, want):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.isfinite(y).all() and np.abs(y).max() > 0.1, name
    np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("nr,causal,level,zero_rows", [
    (16, True, 0, False), (64, False, 0, False), (64, True, 0, False),
    (16, False, 1, False), (32, True, 2, False), (16, False, 0, True),
    (32, True, 0, True)])
def test_mosaic_forward_level_matches_the_triton_kernel(
    nr, causal, level, zero_rows):
  """In interpret mode (``check_mosaic_forward_level``)."""
  check_mosaic_forward_level(nr, n=512, heads=2, interpret=True,
                             lse_atol=1e-5, causal=causal, level=level,
                             zero_rows=zero_rows)


def _pallas_call_names(fn, *args):
  """The names of the Pallas (Triton) launches in ``fn``'s jaxpr."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [str(e.params.get("name_and_src_info", e.params.get("name", "")))
          for e in jaxpr_equations(jaxpr) if e.primitive.name == "pallas_call"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_attention_with_the_mosaic_level_kernels(monkeypatch, causal):
  """The Mosaic GPU level kernels in the whole attention at blocks of 16
  (interpret mode), in the combinations the defaults pick on Hopper GPUs
  at level 0 (the backward alone, as at blocks of 16; the forward alone,
  as at blocks of 32) and both at every level long enough
  (``mosaic_levels``): bfloat16 inputs with holes, a padded end and NaN /
  inf in the padding give the Triton kernels' values and gradients on
  clean inputs (to bfloat16 rounding) and the float64 reference's; the
  Mosaic GPU kernels replace the Triton ones at those levels, causal or
  not, with the padding zeroed in the kernels or in XLA
  (``mosaic_zero_rows``); every level its own launch (no coarse tail)."""
  monkeypatch.setattr(kernels, "_CHUNK_LEVELS", 2)
  monkeypatch.setitem(kernels.TUNING, "tail_rows", 0)
  length, heads, d = 200, 2, 32
  q, k, v = make_qkv(61, 2, length, heads, d)
  mask = np.random.default_rng(62).random((2, length)) < 0.8
  mask[1, 150:] = False
  cot = np.random.default_rng(63).standard_normal(
      (2, length, heads, d)).astype(np.float32)
  clean = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  for x in (q, k, v):
    x[~mask] = np.nan
  q[0, np.flatnonzero(~mask[0])[:3]] = np.inf
  cot[~mask] = np.nan
  garbage = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]

  def loss(q, k, v):
    out = hierarchical_attention(q, k, v, block_size=16, causal=causal,
                                 mask=mask, implementation="pallas_interpret")
    return jnp.sum(jnp.where(mask[:, :, None, None],
                             out.astype(jnp.float32) * cot, 0.0)), out

  results = {}
  # 256 rows of blocks of 16: levels 0 (256 rows) and 1 (128) hold a
  # Mosaic GPU window (96 rows, 64 per tile), level 2 (64) does not.
  # (forward, backward, Mosaic GPU levels, where the padding is zeroed)
  settings = (("triton", "triton", 1, "xla"),
              ("triton", "mosaic", 1, "kernel"),
              ("mosaic", "triton", 1, "kernel"),
              ("mosaic", "mosaic", 8, "xla"))
  for fwd, bwd, levels, zero_rows in settings:
    monkeypatch.setitem(kernels.TUNING, "forward_l0_impl", fwd)
    monkeypatch.setitem(kernels.TUNING, "backward_l0_impl", bwd)
    monkeypatch.setitem(kernels.TUNING, "mosaic_levels", levels)
    monkeypatch.setitem(kernels.TUNING, "mosaic_zero_rows", zero_rows)
    assert kernels.level0_impl("forward", interpret=True) == fwd
    assert kernels.level0_impl("backward", interpret=True) == bwd
    grad = jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2))
    names = _pallas_call_names(grad, *clean)
    for level in (0, 1, 2):
      for kind, impl in (("fwd", fwd), ("dq", bwd), ("dkv", bwd)):
        count = sum(f"hattn_{kind}_l{level}" in name for name in names)
        triton = impl == "triton" or level >= min(levels, 2)
        assert count == (1 if triton else 0), (kind, impl, level)
    # The Mosaic GPU kernels (not Pallas launches) by name.
    mosaic_names = set(re.findall(r"hattn_\w+_mosaic",
                                  str(jax.make_jaxpr(grad)(*clean))))
    kinds = (["fwd"] if fwd == "mosaic" else []) + (
        ["dq", "dkv"] if bwd == "mosaic" else [])
    assert mosaic_names == {f"hattn_{kind}_l{level}_mosaic" for kind in kinds
                            for level in range(min(levels, 2))}, mosaic_names
    # A new jit for each setting: TUNING is read when tracing.
    inputs = clean if (fwd, bwd) == ("triton", "triton") else garbage
    (_, out), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True))(*inputs)
    results[fwd, bwd, levels, zero_rows] = [np.asarray(x, np.float32)
                                            for x in (out, *grads)]
  want = numpy_reference(*(np.asarray(x, np.float32) for x in clean),
                         mask, block_size=16, causal=causal)
  triton = results[settings[0]]
  for impls in settings[1:]:
    out = results[impls][0]
    assert (out[~mask] == 0).all()
    assert max_abs(out, want) <= 2e-2
    for name, got, ref in zip(["out", "dq", "dk", "dv"], results[impls],
                              triton):
      assert np.isfinite(got).all(), (name, impls)
      scale = max(1.0, float(np.abs(ref).max()))
      np.testing.assert_allclose(got, ref, rtol=0, atol=2**-7 * scale,
                                 err_msg=f"{name} {impls}")


def test_auto_takes_the_mosaic_level0_kernels_where_they_are_faster(
    monkeypatch):
  """``forward_l0_impl`` and ``backward_l0_impl`` "auto" on a Hopper GPU
  (the device probe set; traced, not run): Mosaic GPU at the blocks and
  head widths of ``MOSAIC_L0_FASTER`` (causal: ``MOSAIC_L0_FASTER_CAUSAL``)
  without dropout, the backward's sweep at ``SWEEP_L0_FASTER`` (not
  causal); the Triton kernels elsewhere, and always in interpret mode or
  on other devices."""
  assert kernels.TUNING["forward_l0_impl"] == "auto"
  assert kernels.TUNING["backward_l0_impl"] == "auto"
  assert kernels.MOSAIC_L0_FASTER == {"forward": {(16, 64), (32, 64),
                                                  (16, 128)},
                                      "backward": {(16, 64), (16, 128)}}
  assert kernels.MOSAIC_L0_FASTER_CAUSAL == {"forward": set(),
                                             "backward": {(16, 64)}}
  assert kernels.SWEEP_L0_FASTER == {(32, 64), (64, 64)}

  def triton_l0(nr, d, causal=False, rate=0.0, interpret=False):
    """How many Triton level-0 kernels (forward, dq, dk and dv, the
    sweep's dq, dk and dv) the attention's gradient launches."""
    x = jnp.zeros((1, 1024, 2, d), jnp.bfloat16)
    seeds = jnp.zeros((1, 2), jnp.uint32)
    names = _pallas_call_names(jax.grad(
        lambda q: jnp.sum(kernels.hierarchical_attention_pallas(
            q, q, q, None, block_size=nr, causal=causal, dropout_rate=rate,
            dropout_seeds=seeds, interpret=interpret).astype(jnp.float32))),
        x)
    return [sum(f"hattn_{kind}_l0" in name for name in names)
            for kind in ("fwd", "dq", "dkv", "dqkv")]

  for nr, d in ((32, 64), (16, 128), (16, 64)):  # Not a Hopper GPU.
    assert triton_l0(nr, d) == [1, 1, 1, 0]
  monkeypatch.setattr(kernels, "mosaic_gpu", lambda: True)
  for kind in ("forward", "backward"):
    assert kernels.level0_impl(kind, interpret=True) == "triton"
  assert kernels.level0_impl("forward", block_size=64,
                             head_dim=64) == "triton"
  assert kernels.level0_impl("backward", block_size=64,
                             head_dim=64) == "sweep"
  assert kernels.level0_impl("backward", block_size=64, head_dim=64,
                             causal=True) == "triton"
  assert kernels.level0_impl("forward", block_size=16,
                             head_dim=64) == "mosaic"
  assert kernels.level0_impl("forward", block_size=16, head_dim=64,
                             causal=True) == "triton"
  assert kernels.level0_impl("backward", block_size=16,
                             head_dim=64) == "mosaic"
  assert triton_l0(32, 64) == [0, 0, 0, 1]
  assert triton_l0(64, 64) == triton_l0(64, 64, rate=0.1) == [1, 0, 0, 1]
  assert triton_l0(16, 64) == [0, 0, 0, 0]
  assert triton_l0(16, 64, causal=True) == [1, 0, 0, 0]
  # 100 is computed at width 128.
  assert triton_l0(16, 128) == triton_l0(16, 100) == [0, 0, 0, 0]
  for case in (dict(nr=32, d=64, causal=True), dict(nr=32, d=128),
               dict(nr=16, d=128, causal=True),
               dict(nr=16, d=128, rate=0.1),
               dict(nr=16, d=128, interpret=True),
               dict(nr=64, d=64, interpret=True)):
    assert triton_l0(**case) == [1, 1, 1, 0], case


def test_auto_takes_the_coarse_sweep_where_it_is_faster(monkeypatch):
  """``sweep_levels`` None (the default) on a Hopper GPU: the coarse
  levels of ``SWEEP_COARSE_LEVELS`` take the sweep (level 1 at blocks of
  16, head_dim 64 and 128; levels 1 and 2 at blocks of 64, head_dim 64),
  not causal, unless ``mosaic_levels`` gives level 1 to Mosaic GPU; no
  level elsewhere, in interpret mode or on other devices; a set value
  always holds. Launched at 65,536 tokens:
  ``test_default_kernels_lower_for_hopper_at_the_benchmark_length``."""
  assert kernels.TUNING["sweep_levels"] is None
  assert dict(kernels.SWEEP_COARSE_LEVELS) == {
      (16, 64): 1, (64, 64): 2, (16, 128): 1}
  monkeypatch.setattr(kernels, "mosaic_gpu", lambda: False)
  assert kernels.sweep_levels(False, 64, 64) == 0
  monkeypatch.setattr(kernels, "mosaic_gpu", lambda: True)
  assert [kernels.sweep_levels(False, nr, d) for nr, d in (
      (16, 64), (32, 64), (64, 64), (16, 128), (64, 128))] == [
          1, 0, 2, 1, 0]
  assert kernels.sweep_levels(False, 64, 64, causal=True) == 0
  assert kernels.sweep_levels(True, 64, 64) == 0
  monkeypatch.setitem(kernels.TUNING, "mosaic_levels", 2)
  assert kernels.sweep_levels(False, 64, 64) == 0
  monkeypatch.setitem(kernels.TUNING, "sweep_levels", 3)
  assert kernels.sweep_levels(True, 32, 128, causal=True) == 3


@pytest.mark.parametrize("d,nr,causal,masked,dtype,backward", [
    (64, 16, False, False, "bfloat16", "auto"),
    (64, 16, False, True, "bfloat16", "triton"),
    (64, 16, True, True, "bfloat16", "auto"),
    (128, 16, False, True, "bfloat16", "auto"),
    (64, 32, False, False, "bfloat16", "auto"),
    (64, 64, False, True, "bfloat16", "auto"),
    (128, 64, True, False, "float16", "auto"),
    (128, 16, False, False, "float32", "auto"),
    (64, 64, False, False, "bfloat16", "mosaic"),
    (64, 32, True, True, "bfloat16", "mosaic"),
    (64, 16, False, True, "bfloat16", "all_levels"),
    (128, 32, True, False, "bfloat16", "all_levels")])
def test_default_kernels_lower_for_hopper_at_the_benchmark_length(
    monkeypatch, d, nr, causal, masked, dtype, backward):
  """The forward and backward at 65,536 tokens, heads 8 (the benchmark's
  shape), as the defaults choose them on a Hopper GPU (the device probe
  set; Mosaic GPU pyramid and, where it is faster, level-0 forward),
  compiled (lowered) from this CPU: Mosaic GPU checks shared memory when
  lowering. At head_dim 128 the pyramid's old estimate let through a pass
  that needs more than a program may have (docs/benchmarks.md); the GPU
  tests' short sequences did not reach it. Also with the Mosaic GPU
  level-0 backward everywhere (``backward_l0_impl="mosaic"``; "auto"
  takes the sweep at blocks of 32 and 64, head_dim 64, and level 1's at
  blocks of 16 and 64), and with
  both Mosaic GPU level kernels at every level long enough for them,
  zeroing the padding themselves ("all_levels": ``mosaic_levels``,
  ``mosaic_zero_rows``)."""
  monkeypatch.setattr(kernels, "mosaic_gpu", lambda: True)
  every = backward == "all_levels"
  if every:  # Every level its own launch (no tail), each on Mosaic GPU.
    monkeypatch.setitem(kernels.TUNING, "tail_rows", 0)
    monkeypatch.setitem(kernels.TUNING, "forward_l0_impl", "mosaic")
    monkeypatch.setitem(kernels.TUNING, "mosaic_levels", 20)
    monkeypatch.setitem(kernels.TUNING, "mosaic_zero_rows", "kernel")
    backward = "mosaic"
  monkeypatch.setitem(kernels.TUNING, "backward_l0_impl", backward)
  x = jax.ShapeDtypeStruct((1, 65536, 8, d), dtype)
  valid = jax.ShapeDtypeStruct((1, 65536), jnp.bool_) if masked else None

  def loss(q, k, v, valid):
    out = kernels.hierarchical_attention_pallas(
        q, k, v, valid, block_size=nr, causal=causal)
    return jnp.sum(out.astype(jnp.float32))

  try:
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        x, x, x, valid).lower(lowering_platforms=("cuda",))
  except RuntimeError as e:  # jax 0.11 without a GPU (0.10 lowers here)
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip("this jax lowers the Triton kernels only with a GPU")
  text = lowered.as_text()
  # float32 rows of 128 do not fit a Mosaic GPU pyramid pass.
  assert ("mosaic_gpu" in text) == (jnp.dtype(dtype).itemsize * d < 512)
  half = dtype != "float32"
  faster = (kernels.MOSAIC_L0_FASTER_CAUSAL if causal
            else kernels.MOSAIC_L0_FASTER)
  assert ("hattn_fwd_l0_mosaic" in text) == (half and (
      every or (nr, d) in faster["forward"]))
  if every:  # Level l has 65,536 >> l rows; a window needs 64 + 2 nr.
    for level in range(1, 12):
      fits = 65536 >> level >= 64 + 2 * nr
      for kind in ("fwd", "dq", "dkv"):
        assert (f"hattn_{kind}_l{level}_mosaic" in text) == fits, (
            kind, level)
  for kind in ("dq", "dkv"):
    assert (f"hattn_{kind}_l0_mosaic" in text) == (half and (
        backward == "mosaic" or (backward == "auto"
                                 and (nr, d) in faster["backward"])))
  assert ("hattn_dqkv_l0" in text) == (backward == "auto" and not causal
                                      and (nr, d) in kernels.SWEEP_L0_FASTER)
  # The coarse levels' sweep by default (kernels.sweep_levels), whatever
  # level 0's.
  swept = 0 if every or causal else kernels.SWEEP_COARSE_LEVELS.get(
      (nr, d), 0)
  for level in (1, 2, 3):
    assert (f"hattn_dqkv_l{level}" in text) == (level <= swept), level
    assert (f"hattn_dq_l{level}" in text) == (level > swept), level


def test_mosaic_forward_level_rejects_what_it_cannot_run():
  def inputs(n, dtype):
    x = jnp.zeros((1, n, 1, 16), dtype)
    return x, x, x, jnp.ones((1, n)), x[:, ::2], jnp.zeros((1, 1, n // 2))

  for args, nr, match in (
      (inputs(256, jnp.float32), 16, "16-bit inputs and blocks of 16, 32 "
       "or 64 rows, got float32 and 16"),
      (inputs(256, jnp.bfloat16), 128, "got bfloat16 and 128"),
      (inputs(80, jnp.bfloat16), 16, "multiple of 64 and at least 96, "
       "got 80")):
    with pytest.raises(ValueError, match=match):
      mosaic.forward_level(*args, nr=nr, scale=1.0, interpret=True)


def test_pyramid_products_only_with_counts_the_dtype_holds(monkeypatch):
  """A level-9 row counts up to 512 tokens, and bfloat16 holds 257 as 256:
  coarsening such rows by products would weigh them wrongly, so the
  kernel sums pairs in float32 there. Pairs of counts 257 and 255 whose
  values are 1 and -1 have the mean 2 / 512 (by products: 1 / 512)."""
  monkeypatch.setitem(kernels.TUNING, "coarsen_impl", "dot")
  monkeypatch.setitem(kernels.TUNING, "coarsen_rows", 32)  # level 1 by dot
  n, d = 32, 16
  x = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[None, :, None, None]
  x = jnp.asarray(np.broadcast_to(x, (1, n, 1, d)), jnp.bfloat16)
  c = jnp.asarray(np.where(np.arange(n) % 2 == 0, 257.0, 255.0)[None])
  for base, want in ((9, 2 / 512), (0, 1 / 512)):
    # At base 0 (counts of at most 1) the same counts show the products.
    [[level1]] = kernels._coarsen([x], ["mean"], c, 1, True, base=base)
    np.testing.assert_array_equal(np.asarray(level1, np.float32),
                                  np.full((1, n // 2, 1, d), want))


def test_coarsen_rows_divide_the_level(monkeypatch):
  for want, n, count, expect in ((0, 4096, 6, 64), (256, 4096, 6, 256),
                                 (100, 4096, 6, 64), (512, 128, 6, 128),
                                 (512, 96, 2, 32), (8, 64, 6, 64)):
    monkeypatch.setitem(kernels.TUNING, "coarsen_rows", want)
    assert kernels._coarsen_rows(n, count) == expect, (want, n, count)


def test_coarsen_heads_is_a_power_of_two_dividing_the_heads(monkeypatch):
  for want, h, expect in ((1, 8, 1), (8, 8, 8), (3, 8, 2), (4, 6, 2),
                          (16, 8, 8), (4, 5, 1), (None, 8, 1)):
    monkeypatch.setitem(kernels.TUNING, "coarsen_heads", want)
    assert kernels._coarsen_heads(h) == expect, (want, h)


def test_restrict_matches_its_definition_with_padding_blocks():
  """(G, E, M) restricted fine to coarse (module doc), where whole blocks
  are padding (their programs skip the work and write the fills)."""
  rng = np.random.default_rng(1)
  b, n, h, dv, count = 2, 32, 2, 16, 2
  c = np.ones((b, n), np.float32)
  c[0, 20:] = 0.0  # rows 20..31: blocks 5..7 of 4 rows are all padding
  c[1, 3] = 0.0  # a hole inside a block
  g = rng.standard_normal((b, n, h, dv)).astype(np.float32)
  e = rng.standard_normal((b, h, n)).astype(np.float32)
  m = rng.standard_normal((b, h, n)).astype(np.float32)
  m = np.where(c[:, None, :] > 0, m, kernels._NO_ROW).astype(np.float32)
  got = kernels._restrict(jnp.asarray(g), jnp.asarray(e), jnp.asarray(m),
                          jnp.asarray(c), count, True)
  gw = np.where(c[:, :, None, None] > 0, g, 0.0).astype(np.float64)
  ew, mw = e.astype(np.float64), m.astype(np.float64)
  for level, (g_got, e_got, m_got) in enumerate(got, start=1):
    m2 = mw.reshape(b, h, -1, 2)
    mw = m2.min(-1)
    w = np.where(m2 < 0.5 * kernels._NO_ROW, np.exp(mw[..., None] - m2), 0.0)
    gw = (gw.reshape(b, -1, 2, h, dv)
          * np.transpose(w, (0, 2, 3, 1))[..., None]).sum(2)
    ew = (ew.reshape(b, h, -1, 2) * w).sum(-1)
    np.testing.assert_array_equal(np.asarray(m_got), mw.astype(np.float32))
    np.testing.assert_allclose(np.asarray(g_got), gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(e_got), ew, rtol=1e-5, atol=1e-6)
    assert (np.asarray(m_got)[0, :, (20 >> level) + 1:] == kernels._NO_ROW
            ).all()


def test_restrict_from_output_forms_level0_stats():
  """The first restriction takes dO, O and lse: it writes level 0's E = dO
  . O and M = lse (0 and _NO_ROW on padding, garbage there ignored) and
  restricts them as from E and M given."""
  rng = np.random.default_rng(2)
  b, n, h, dv, count = 2, 32, 2, 16, 2
  c = np.ones((b, n), np.float32)
  c[0, 20:] = 0.0  # blocks of padding only
  c[1, 3] = 0.0  # a hole
  g, o = (rng.standard_normal((b, n, h, dv)).astype(np.float32)
          for _ in range(2))
  lse = rng.standard_normal((b, h, n)).astype(np.float32)
  o[c == 0] = np.nan
  lse[np.broadcast_to(c[:, None, :] == 0, lse.shape)] = np.inf
  args = [jnp.asarray(x) for x in (g, o, lse, c)]
  got = kernels._restrict(*args[:3], args[3], count, True, from_output=True)
  assert len(got) == count + 1 and got[0][0] is args[0]
  live = c[:, None, :] > 0
  e = np.where(live, np.einsum("bnhd,bnhd->bhn", g, o), 0.0)
  np.testing.assert_allclose(np.asarray(got[0][1]), e, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got[0][2]),
                                np.where(live, lse, kernels._NO_ROW))
  want = kernels._restrict(args[0], got[0][1], got[0][2], args[3], count,
                           True)
  for got_level, want_level in zip(got[1:], want):
    for a, w in zip(got_level, want_level):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(w))


@pytest.mark.parametrize("impl", ["dot", "pallas", "xla"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_coarse_rows_are_clean_whatever_level_0_holds(monkeypatch, impl,
                                                      causal):
  """What lets the level kernels read rows of no real token as they are
  at every coarse level (only the level-0 kernels zero such rows,
  ``kernels._zeroed``): even with NaN and inf in level 0's q, k, v and
  cotangent where tokens are not real, every coarse row of the pyramid
  (each ``coarsen_impl``, several passes) and of the restriction is
  finite, and zero where its count is 0."""
  monkeypatch.setattr(kernels, "_CHUNK_LEVELS", 2)
  monkeypatch.setitem(kernels.TUNING, "coarsen_impl", impl)
  # Programs of 32 rows: level 1 by products ("dot").
  monkeypatch.setitem(kernels.TUNING, "coarsen_rows", 32)
  rng = np.random.default_rng(5)
  b, n, h, d, levels = 2, 64, 2, 16, 5
  c = np.ones((b, n), np.float32)
  c[0, 40:] = 0.0  # padding: coarse rows of count 0 up to level 3
  c[1, 8:12] = 0.0  # a hole: coarse rows of count 0 up to level 2
  c[1, 17] = 0.0
  q, k, v, g = (rng.standard_normal((b, n, h, d)).astype(np.float32)
                for _ in range(4))
  for x, bad in ((q, np.nan), (k, np.inf), (v, -np.inf), (g, np.nan)):
    x[c == 0] = bad
  pyramid = kernels._pyramid(*(jnp.asarray(x) for x in (q, k, v, c)),
                             levels, causal, True)
  lse = np.where(c[:, None, :] > 0, 0.5, np.inf).astype(np.float32)
  stats = kernels._restrict(jnp.asarray(g), jnp.asarray(q), jnp.asarray(lse),
                            jnp.asarray(c), 2, True, from_output=True)
  stats += kernels._restrict(*stats[2], pyramid[2][3], 2, True)
  checked = 0
  for level in range(1, levels):
    counts = np.asarray(pyramid[level][3])
    rows = list(pyramid[level][:3]) + [stats[level][0]]
    for name, x in zip(("q", "k", "v", "G"), rows):
      x = np.asarray(x, np.float32)
      assert np.isfinite(x).all(), (level, name)
      assert (x[counts == 0] == 0).all(), (level, name)
      checked += int((counts == 0).any())
  assert checked >= 3 * 4  # rows of count 0 at levels 1-3


def _xla_row_reductions(jaxpr):
  """Sums over the last axis of 4-D arrays outside the kernels."""
  return [eqn for eqn in jaxpr_equations(jaxpr)
          if eqn.primitive.name == "reduce_sum"
          and eqn.invars[0].aval.ndim == 4
          and tuple(eqn.params["axes"]) == (3,)]


@pytest.mark.parametrize("length", [20, 50, 150])
def test_gradients_from_few_levels(length):
  """One level (nothing to restrict: E and M of level 0 in XLA), two (one
  restriction of a level, which forms E and M from dO, O and lse) and
  more: gradients match the reference; only the one-level backward
  reduces dO . O in XLA."""
  q, k, v = make_qkv(length, 2, length, 1, 16, 16)
  mask = make_mask(length, 2, length, "suffix")
  mask[1, 5:9] = False
  cot = np.random.default_rng(length).standard_normal(
      (2, length, 1, 16)).astype(np.float32)
  got = _grads("pallas_interpret", q, k, v, mask, cot, True)
  want = _grads("ref", q, k, v, mask, cot, True)
  for name, g, w in zip("qkv", got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert max_abs(g, w) <= 1e-4 * max(1.0, float(np.abs(w).max())), name
    assert (g[~mask] == 0).all(), name
  loss = lambda q: jnp.sum(hierarchical_attention(
      q, k, v, block_size=16, causal=True, mask=mask,
      implementation="pallas_interpret") * cot)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(q).jaxpr
  assert bool(_xla_row_reductions(jaxpr)) == (length <= 32)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_dropout_values_and_gradients(small_passes, causal):
  """Attention dropout in the kernels drops the weights the definition
  (tests/test_attention.py's reference, dropout.py) drops: values and
  gradients, with padding and a hole, several tiles and levels per launch
  (over a mesh: tests/test_distributed.py)."""
  length, d, dv = 150, 16, 32
  q, k, v = make_qkv(61, 2, length, 2, d, dv)
  mask = make_mask(61, 2, length, "suffix")
  mask[1, 20:27] = False
  cot = np.random.default_rng(62).standard_normal(
      (2, length, 2, dv)).astype(np.float32)
  rng = jax.random.PRNGKey(63)

  def f(impl):
    def loss(q, k, v):
      if impl == "ref":
        out = dense_reference(q, k, v, mask, block_size=16, causal=causal,
                              xp=jnp, dropout=(0.3, rng))
      else:
        out = hierarchical_attention(q, k, v, block_size=16, causal=causal,
                                     mask=mask, implementation=impl,
                                     dropout_rate=0.3, dropout_rng=rng)
      return jnp.sum(out * cot), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  got, out = f("pallas_interpret")
  want = numpy_reference(q, k, v, mask, block_size=16, causal=causal,
                         dropout=(0.3, rng))
  assert max_abs(out, want) <= 2e-5
  assert max_abs(numpy_reference(q, k, v, mask, block_size=16,
                                 causal=causal), want) > 0.05
  want_grads, _ = f("ref")
  for name, g, w in zip("qkv", got, want_grads):
    g, w = np.asarray(g), np.asarray(w)
    scale = max(1.0, float(np.abs(w).max()))
    assert max_abs(g, w) <= 1e-4 * scale, name
    assert (g[~mask] == 0).all(), name


def test_sweep_runs_shorten_to_launch_enough_programs(monkeypatch):
  """``_sweep_run``: ``sweep_blocks`` key blocks per program, at most the
  level's, halved while the launch has fewer than ``sweep_programs``
  programs (blocks / run x batch rows x heads), down to one block."""
  monkeypatch.setitem(kernels.TUNING, "sweep_blocks", 16)
  monkeypatch.setitem(kernels.TUNING, "sweep_programs", 0)  # never shorter
  assert [kernels._sweep_run(blocks, 8) for blocks in (1024, 256, 8)] == [
      16, 16, 8]
  monkeypatch.setitem(kernels.TUNING, "sweep_programs", 256)
  # 1 x 65,536 tokens, heads 8, blocks of 64: levels 0-3.
  assert [kernels._sweep_run(1024 >> level, 8) for level in range(4)] == [
      16, 16, 8, 4]
  assert kernels._sweep_run(16, 2) == 1  # 32 programs at most
  assert kernels._sweep_run(16, 64) == 4


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_backward_in_one_sweep(monkeypatch, causal):
  """``backward_l0_impl="sweep"`` and ``sweep_levels`` (one kernel for a
  level's dq, dk and dv, each program walking ``sweep_blocks`` key
  blocks) take every level's backward; with attention dropout (a sweep
  longer than the level: one program per head) and for a sequence of one
  block (one level, no parent) the gradients equal the dense
  reference's. (With garbage in the padding and several programs per
  head: test_gradients_ignore_garbage_in_padding.)"""
  _use_schedule(monkeypatch, "sweep")
  q = jnp.zeros((1, 250, 2, 16))
  names = _pallas_call_names(jax.grad(lambda q: jnp.sum(
      hierarchical_attention(q, q, q, block_size=16, causal=causal,
                             implementation="pallas_interpret"))), q)
  for level in range(4):  # 256 rows: 16 blocks, 8, 4, 2
    assert sum(f"hattn_dqkv_l{level}" in name for name in names) == 1
  assert not any(re.search(r"hattn_dk?q?_l", name) for name in names)

  monkeypatch.setitem(kernels.TUNING, "sweep_blocks", 64)
  rng = jax.random.PRNGKey(84)
  for length in (64, 16):  # levels 0 and 1 (4 and 2 blocks); level 0
    q, k, v = make_qkv(85, 2, length, 1, 16, 16)
    cot = np.random.default_rng(86).standard_normal(
        (2, length, 1, 16)).astype(np.float32)

    def loss(q, k, v, impl):
      kw = dict(block_size=16, causal=causal, mask=None)
      if impl == "ref":
        out = dense_reference(q, k, v, xp=jnp, dropout=(0.3, rng), **kw)
      else:
        out = hierarchical_attention(q, k, v, implementation=impl,
                                     dropout_rate=0.3, dropout_rng=rng, **kw)
      return jnp.sum(out * cot)

    got, want = (jax.jit(jax.grad(functools.partial(loss, impl=impl),
                                  argnums=(0, 1, 2)))(q, k, v)
                 for impl in ("pallas_interpret", "ref"))
    for name, g, w in zip("qkv", got, want):
      assert max_abs(g, w) <= 1e-4 * max(1.0, float(np.abs(w).max())), (
          name, length)


def _inputs_with_holes(seed, length, heads, mask_kind):
  """q, k (head_dim 16), v (32) of 2 rows and their mask: holes in row 1,
  row 0 padding from 150 on, NaN wherever the mask is False."""
  q, k, v = make_qkv(seed, 2, length, heads, 16, 32)
  mask = make_mask(seed + 1, 2, length, mask_kind)
  mask[1, 40:77] = False
  mask[0, 150:] = False
  for x in (q, k, v):
    x[~mask] = np.nan
  return q, k, v, mask


def _interpret_attention(block_size, causal, mask, rate, rng):
  return lambda q, k, v: hierarchical_attention(
      q, k, v, block_size=block_size, causal=causal, mask=mask,
      implementation="pallas_interpret", dropout_rate=rate, dropout_rng=rng)


def _check_values_and_gradients(fn, q, k, v, mask, *, block_size, causal,
                                dropout, seed):
  """``fn(q, k, v)`` (inputs NaN where ``mask`` is False) against the
  float64 reference on clean inputs: the output, zero where not real, and
  the gradients of ``sum(out * cotangent)`` at real positions, zero
  elsewhere."""
  clean = [np.nan_to_num(x) for x in (q, k, v)]
  want = numpy_reference(*clean, mask, block_size=block_size, causal=causal,
                         dropout=dropout)
  out = np.asarray(jax.jit(fn)(q, k, v))
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 2e-5
  assert (out[~mask] == 0).all()
  cot = np.random.default_rng(seed).standard_normal(out.shape).astype(
      np.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cot)
  ref = lambda q, k, v: dense_reference(
      q, k, v, mask, block_size=block_size, causal=causal, xp=jnp,
      dropout=dropout)
  got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  want_g = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(*clean)
  for name, g, w in zip("qkv", got, want_g):
    # At real positions (causal: the reference's zero query of a hole that
    # is its group's first token takes a gradient; a hole's content is
    # ignored, so the kernels give it none).
    g, w = np.asarray(g), np.asarray(w)
    scale = max(1.0, float(np.abs(w).max()))
    assert max_abs(g[mask], w[mask]) <= 1e-4 * scale, name
    assert (g[~mask] == 0).all(), name


@pytest.mark.parametrize("block_size,tile,causal,rate", [
    (32, 16, False, 0.0), (64, 16, True, 0.3), (64, 32, False, 0.0)])
def test_tiles_smaller_than_a_block(monkeypatch, block_size, tile, causal,
                                    rate):
  """Programs of fewer rows than a block (each reads its whole block's
  neighbours in pieces of its own rows and masks by row): values and
  gradients against the float64 reference, with holes, garbage in the
  padding and dropout."""
  monkeypatch.setattr(kernels, "default_tile", lambda nr: tile)
  monkeypatch.setattr(kernels, "_CHUNK_LEVELS", 2)
  # Lp 256: three levels of blocks of 32, two of 64 (row 0 ends early,
  # row 1 is real to the end, so coarse rows past the first block count).
  q, k, v, mask = _inputs_with_holes(81, 240, 1, "partial")
  rng = jax.random.PRNGKey(83)
  fn = _interpret_attention(block_size, causal, mask, rate, rng)
  # Level 0 runs 256 / tile programs per (batch row, head), whose logits
  # come in pieces of the tile's rows.
  jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
  assert re.search(rf"grid=\({256 // tile}, 1, 2\)[^\n]*hattn_fwd_l0",
                   jaxpr.replace("\n", " "))
  logits = set(re.findall(  # q k^T: contracting both operands' dim 1
      rf"f32\[{tile},(\d+)\] = dot_general\[\s*dimension_numbers="
      r"\(\(\[1\], \[1\]\)", jaxpr))
  assert logits == {str(tile)}, logits
  _check_values_and_gradients(fn, q, k, v, mask, block_size=block_size,
                              causal=causal,
                              dropout=(rate, rng) if rate else None, seed=84)


@pytest.mark.parametrize("nr", [16, 32])
def test_piece_masks_from_offsets_equal_row_numbers(nr):
  """The block structure of a piece from its offset to the program's first
  row (a multiple of a block) and one in-bounds flag, as the level kernels
  take it, equals the structure from row numbers, for every piece a tile
  of 1, 2 or 4 blocks meets at the ends and in the middle of a level."""
  n = 8 * nr
  checked = 0
  for tile, level0, causal in itertools.product(
      (nr, 2 * nr, 4 * nr), (True, False), (True, False)):
    for start in range(0, n, tile):
      for off, size in ((-nr, nr), (0, tile), (tile, nr)):
        own, other = start + np.arange(tile), start + off + np.arange(size)
        inside = 0 <= start + off < n
        for own_queries in (True, False):
          kw = dict(n=n, nr=nr, level0=level0, causal=causal,
                    own_queries=own_queries)
          by_rows = kernels._piece_allowed(jnp.asarray(own),
                                           jnp.asarray(other), None, **kw)
          by_offset = kernels._piece_allowed(
              jnp.asarray(own), jnp.asarray(other),
              (off, jnp.asarray(inside)), **kw)
          np.testing.assert_array_equal(by_offset, by_rows)
          checked += int(np.asarray(by_rows).any())
  assert checked > 100  # most pieces see something


@pytest.mark.parametrize("tile,after,level0,loops", [
    (16, True, True, True),     # level 0 without causality: 3 pieces
    (16, False, True, False),   # causal level 0: 2 pieces, unrolled
    (16, True, False, False),   # a coarse level: 2 pieces, unrolled
    (32, True, True, False),    # a tile of two blocks: pieces of 16 and 32
    (8, True, True, True),      # less than a block: 6 pieces of 8 rows
])
def test_pieces_in_a_loop_are_the_unrolled_pieces(tile, after, level0,
                                                   loops):
  """``_over_pieces`` with ``loop``: a loop only over three or more pieces
  of one size at even offsets, and the same pieces, rows and masks as
  unrolled (the forward takes the loop, dq and dk, dv unroll)."""
  nr, n, start = 16, 128, 48 if tile >= 16 else 56
  rows = jnp.arange(n * 2, dtype=jnp.float32).reshape(n, 2)
  own = start + jnp.arange(tile)

  def body(carry, piece, other, rel):
    ok = kernels._piece_allowed(own, other, rel, n=n, nr=nr, level0=level0,
                                causal=not after, own_queries=True)
    part = jnp.where(ok, piece[0][None, :, 0] * (other[None, :] + 1), 0.0)
    return part.sum(1) if carry is None else carry + part.sum(1)

  def run(loop):
    return kernels._over_pieces(kernels._neighbours(
        [rows], start, tile, nr, n, after, level0), body, loop)

  eqns = jax.make_jaxpr(lambda: run(True))().jaxpr.eqns
  assert any(e.primitive.name in ("scan", "while") for e in eqns) == loops
  # Traced, as in a kernel: the rows stand in for a ref, and jax from 0.11
  # on no longer indexes an array with a pl.ds of a concrete start.
  looped = jax.jit(lambda: run(True))()
  unrolled = jax.jit(lambda: run(False))()
  np.testing.assert_array_equal(looped, unrolled)
  assert float(jnp.abs(unrolled).sum()) > 0


def test_warps_by_kind_and_width(monkeypatch):
  """Triton warps: the level kernels one per 16 rows of 64 elements, the
  pyramid and restriction one per 64 (1 at head_dim 64, 2 at 128), unless
  TUNING says otherwise."""
  pytest.importorskip(kernels.TRITON_MODULE)
  warps = lambda *a, **k: kernels._compiler_params(False, *a, **k).num_warps
  assert warps(16, 64) == 1 and warps(64, 64) == 4 and warps(16, 128) == 2
  assert warps(64, 64, kind="dq") == 4
  assert warps(64, 64, kind="pyramid") == 1
  assert warps(64, 128, kind="pyramid") == 2
  assert warps(32, 64, kind="pyramid") == 1
  monkeypatch.setitem(kernels.TUNING, "pyramid_warps", 4)
  assert warps(64, 64, kind="pyramid") == 4
  monkeypatch.setitem(kernels.TUNING, "num_warps", 2)
  assert warps(64, 64) == 2 and warps(64, 64, kind="pyramid") == 4
  assert kernels._compiler_params(True, 64, 64, kind="pyramid") is None


def test_bad_tuning_is_named(monkeypatch):
  """A TUNING value the kernels cannot use (a typo in a choice's name, an
  odd warp count) stops the call with the key's name, before any kernel."""
  kernels.check_tuning()  # the defaults
  q, k, v = make_qkv(5, 1, 64, 1, 16, 16)
  for key, value in (("coarsen_impl", "xl"), ("handover_dtype", "bfloat16"),
                     ("num_warps", 3), ("pyramid_warps", 64),
                     ("dq_warps", 0), ("dkv_warps", 48),
                     ("num_stages", 0), ("coarsen_rows", 48),
                     ("levels_per_launch", "2"), ("coarsen_heads", 0),
                     ("mosaic_zero_rows", "smem"), ("sweep_levels", -1),
                     ("sweep_levels", "auto"), ("sweep_blocks", None),
                     ("pyramid_pass", 4), ("pyramid_stages", 0)):
    with monkeypatch.context() as m:
      m.setitem(kernels.TUNING, key, value)
      with pytest.raises(ValueError, match=re.escape(f"TUNING[{key!r}]")):
        run_pallas(q, k, v, None, causal=False)
  with monkeypatch.context() as m:
    m.setitem(kernels.TUNING, "tile_row", 64)
    with pytest.raises(ValueError, match="unknown TUNING key 'tile_row'"):
      run_pallas(q, k, v, None, causal=False)
  # A tile the kernels cannot run (under the 16 rows of the smallest
  # product) is named too.
  for tile in (8, 24):
    with pytest.raises(ValueError, match=f"tile must be a power of two >= "
                       f"16, got {tile}"):
      kernels.hierarchical_attention_pallas(
          q, k, v, None, block_size=16, causal=False, interpret=True,
          tile=tile)


@pytest.mark.parametrize("causal,masked,merge_rows", [
    (False, True, 64), (False, False, 2), (True, False, 64),
    (True, False, 2)])
def test_coarse_tail_in_one_launch(monkeypatch, causal, masked, merge_rows):
  """``TUNING["tail_rows"]``: levels 2-4 of a 512-token sequence (128, 64
  and 32 rows per batch row and head) in one launch per pass, merged into
  level 2: values and gradients equal the dense reference's; causal
  without a mask (queries by their first token, a weight of 0 or 1 down
  the chain) and not, with padding and a hole; merge programs of 64 rows
  and of 2 (coarse rows read one at a time and broadcast). Causal with a
  mask takes no tail."""
  _use_schedule(monkeypatch, "tile16")
  monkeypatch.setitem(kernels.TUNING, "tail_rows", 512)
  monkeypatch.setattr(kernels, "_MERGE_ROWS", merge_rows)
  # Rows over the batch (2) and heads (2): 512 from level 2 on.
  assert kernels._tail_first(512, 5, causal, masked, 4) == 2
  assert kernels._tail_first(512, 5, True, True, 4) == 5
  assert kernels._tail_first(512, 3, causal, masked, 4) == 3  # one level
  assert kernels._tail_first(512, 5, causal, masked, 1) == 1
  length, d, dv = 500, 16, 32
  q, k, v = make_qkv(71, 2, length, 2, d, dv)
  mask = None
  if masked:
    mask = make_mask(71, 2, length, "suffix")
    mask[1, 40:47] = False
  cot = np.random.default_rng(72).standard_normal(
      (2, length, 2, dv)).astype(np.float32)

  got, out = _grads("pallas_interpret", q, k, v, mask, cot, causal,
                    with_output=True)
  want, ref = _grads("ref", q, k, v, mask, cot, causal, with_output=True)
  assert max_abs(out, ref) <= 1e-5
  for name, g, w in zip("qkv", got, want):
    g, w = np.asarray(g), np.asarray(w)
    scale = max(1.0, float(np.abs(w).max()))
    assert max_abs(g, w) <= 1e-4 * scale, name
    if masked:
      assert (g[~mask] == 0).all(), name
  # The tail's launches are there (names of the kernels in the jaxpr).
  text = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(hierarchical_attention(
      q, k, v, block_size=16, causal=causal, mask=mask,
      implementation="pallas_interpret") * cot)))(q))
  for name in ("fwd_tail_l2", "fwd_merge_l2", "bwd_tail_l2", "bwd_merge_l2"):
    assert f"hattn_{name}" in text, name
  assert "hattn_fwd_l3" not in text and "hattn_dq_l2" not in text


@pytest.mark.parametrize("schedule", ["tile16", "3-levels", "mosaic",
                                      "sweep"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_counts_known_when_tracing(monkeypatch, schedule, causal):
  """Without a mask, at a length that needs no padding, every level's
  counts are known when tracing (``kernels.Uniform``): no count array is
  made and the kernels read none (the pyramid by products, pair sums and
  Mosaic GPU passes; the level kernels, the backward's sweep, the coarse
  tail and its merges, the restriction). Values and gradients equal those
  of the same counts as arrays (to float32 rounding), and the dense
  reference's."""
  _use_schedule(monkeypatch, schedule)
  length, d, dv = 512, 16, 32
  q, k, v = make_qkv(81, 2, length, 2, d, dv)
  cot = jnp.asarray(np.random.default_rng(82).standard_normal(
      (2, length, 2, dv)), jnp.float32)
  per_launch = kernels.TUNING["levels_per_launch"]

  def grads(c0):
    def f(q, k, v):
      out = kernels._attention(
          q, k, v, c0, None, 16, causal, kernels.DEFAULT_TILE, True,
          jax.lax.Precision.HIGHEST, per_launch, 0.25, 0.0, False)
      return jnp.sum(out * cot), out
    return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  uniform = kernels.Uniform(1.0, (2, length))
  (got, out), (arrays, out_arrays) = grads(uniform), grads(
      jnp.ones((2, length), jnp.float32))
  # Equal up to float32 rounding (XLA may order a product by a constant
  # count differently).
  np.testing.assert_allclose(out, out_arrays, rtol=1e-6, atol=1e-7)
  for name, g, w in zip("qkv", got, arrays):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=name)
  want, ref = _grads("ref", q, k, v, None, cot, causal, with_output=True)
  assert max_abs(out, ref) <= 2e-5
  for name, g, w in zip("qkv", got, want):
    scale = max(1.0, float(np.abs(np.asarray(w)).max()))
    assert max_abs(np.asarray(g), np.asarray(w)) <= 1e-4 * scale, name
  # The public call takes them where it can (no mask, no padding): no
  # operation outside the kernels reduces or broadcasts.
  def outside(length):
    jaxpr = jax.make_jaxpr(lambda q: hierarchical_attention(
        q[:, :length], k[:, :length], v[:, :length], block_size=16,
        causal=causal, implementation="pallas_interpret"))(q)
    return {e.primitive.name for e in jaxpr_equations(jaxpr.jaxpr)}
  assert not {"reduce_sum", "broadcast_in_dim"} & outside(length)
  assert "reduce_sum" in outside(500)  # counts of levels with padding


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_counts_known_when_tracing_in_the_mosaic_level_kernels(monkeypatch,
                                                               causal):
  """The Mosaic GPU level kernels (forward and backward, levels 0 and 1)
  take ``kernels.Uniform`` counts as numbers, and the backward's
  prolongation weights too: values and gradients equal those of the same
  counts as arrays (bfloat16 inputs, interpret mode) and the dense
  reference's to bfloat16 rounding."""
  monkeypatch.setattr(kernels, "_CHUNK_LEVELS", 2)
  for key, value in dict(forward_l0_impl="mosaic", backward_l0_impl="mosaic",
                         mosaic_levels=2, tail_rows=0).items():
    monkeypatch.setitem(kernels.TUNING, key, value)
  length, heads, d = 256, 2, 32
  q, k, v = (jnp.asarray(x, jnp.bfloat16)
             for x in make_qkv(91, 2, length, heads, d))
  cot = jnp.asarray(np.random.default_rng(92).standard_normal(
      (2, length, heads, d)), jnp.float32)

  def grads(c0):
    def f(q, k, v):
      out = kernels._attention(
          q, k, v, c0, None, 16, causal, kernels.DEFAULT_TILE, True,
          jax.lax.Precision.DEFAULT, 1, d**-0.5, 0.0, False)
      return jnp.sum(out.astype(jnp.float32) * cot), out
    fn = jax.grad(f, argnums=(0, 1, 2), has_aux=True)
    names = set(re.findall(r"hattn_\w+_mosaic", str(jax.make_jaxpr(fn)(
        q, k, v))))
    assert names == {f"hattn_{kind}_l{level}_mosaic"
                     for kind in ("fwd", "dq", "dkv") for level in (0, 1)}
    grads, out = jax.jit(fn)(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]

  got = grads(kernels.Uniform(1.0, (2, length)))
  arrays = grads(jnp.ones((2, length), jnp.float32))
  for name, x, y in zip(["out", "dq", "dk", "dv"], got, arrays):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=name)
  want = _grads("ref", *(np.asarray(x, np.float32) for x in (q, k, v)), None,
                cot, causal, with_output=True)
  want = [np.asarray(x, np.float32) for x in (want[1], *want[0])]
  for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
    scale = max(1.0, float(np.abs(y).max()))
    assert max_abs(x, y) <= 2e-2 * scale, name


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_forward_without_a_mask_launches_only_kernels(monkeypatch, masked):
  """Lowered for a Hopper GPU from this CPU, the forward at 1 x 4,096
  tokens with no mask is the kernels alone: the pyramid's Mosaic GPU
  passes and the level kernels, with no XLA operation between them (each
  would be a launch of its own: the counts of every level were about 17
  at 65,536 tokens) but one, level 1's lse repeated for level 0's Mosaic
  GPU forward (``mosaic.forward_level``). With a mask the counts are
  arrays, reductions of it (the check sees them)."""
  monkeypatch.setattr(kernels, "mosaic_gpu", lambda: True)
  x = jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.bfloat16)
  valid = jax.ShapeDtypeStruct((1, 4096), jnp.bool_) if masked else None
  try:
    text = jax.jit(lambda q, k, v, m: kernels.hierarchical_attention_pallas(
        q, k, v, m, block_size=16, causal=False)).trace(
            x, x, x, valid).lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:  # jax 0.11 without a GPU (0.10 lowers here)
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip("this jax lowers the Triton kernels only with a GPU")
  ops = set(re.findall(r"= (stablehlo\.[a-z_]+)", text))
  assert "stablehlo.custom_call" in text and "mosaic_gpu" in text
  if masked:
    assert "stablehlo.reduce" in ops
  else:
    assert ops == {"stablehlo.reshape", "stablehlo.custom_call",
                   "stablehlo.broadcast_in_dim"}, ops
    repeats = re.findall(r"= stablehlo\.broadcast_in_dim .*", text)
    assert len(repeats) == 1 and repeats[0].endswith(
        "(tensor<1x2x2048xf32>) -> tensor<1x2x2048x2xf32>"), repeats


def _launch_grids(fn, *args):
  """{kernel name: grid} of the ``pallas_call``s in ``fn``'s jaxpr."""
  grids = {}
  for e in jaxpr_equations(jax.make_jaxpr(fn)(*args).jaxpr):
    if e.primitive.name == "pallas_call":
      name = e.params.get("name") or getattr(
          e.params.get("name_and_src_info"), "name", "")
      grids[str(name)] = tuple(e.params["grid_mapping"].grid)
  return grids


@pytest.mark.parametrize("tail_rows", [0, 16384], ids=["levels", "tail"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_coarse_levels_on_larger_tiles(monkeypatch, causal, tail_rows):
  """``TUNING["coarse_tile"]``: programs of 64 query rows from level 1 on
  (the coarse tail's too), of one block at level 0: launches of fewer
  programs, and values and gradients (holes, a block of padding, NaN
  there) equal the dense reference's."""
  _use_schedule(monkeypatch, "tile16")
  monkeypatch.setitem(kernels.TUNING, "tail_rows", tail_rows)
  monkeypatch.setitem(kernels.TUNING, "coarse_tile", 64)
  assert kernels._level_groups(512, 5, 16, 16, 1) == [
      (0, 1, 16), (1, 1, 64), (2, 1, 64), (3, 1, 64), (4, 1, 32)]
  length, d, dv = 480, 16, 16
  q, k, v = make_qkv(91, 1, length, 2, d, dv)
  mask = np.random.default_rng(92).random((1, length)) < 0.8
  mask[0, 128:144] = False
  cot = np.random.default_rng(93).standard_normal(
      (1, length, 2, dv)).astype(np.float32)
  want, ref = _grads("ref", q, k, v, mask, cot, causal, with_output=True)
  q, k, v = (x.copy() for x in (q, k, v))
  for x in (q, k, v):
    x[~mask] = np.nan
  got, out = _grads("pallas_interpret", q, k, v, mask, cot, causal,
                    with_output=True)
  assert max_abs(np.asarray(out)[mask], np.asarray(ref)[mask]) <= 2e-5
  for name, g, w in zip("qkv", got, want):
    g, w = np.asarray(g), np.asarray(w)
    scale = max(1.0, float(np.abs(w[mask]).max()))
    assert max_abs(g[mask], w[mask]) <= 1e-4 * scale, name
    assert (g[~mask] == 0).all(), name
  grids = _launch_grids(lambda q: hierarchical_attention(
      q, k, v, block_size=16, causal=causal, mask=mask,
      implementation="pallas_interpret"), q)
  assert grids["hattn_fwd_l0"] == (32, 2, 1)  # 512 rows in tiles of 16
  if tail_rows and not causal:  # (causal with a mask takes no tail)
    # Levels 1-4 (256 .. 32 rows) in tiles of 64 at most.
    assert grids["hattn_fwd_tail_l1"] == (4 + 2 + 1 + 1, 2, 1)
  else:
    assert grids["hattn_fwd_l1"] == (4, 2, 1)
    assert grids["hattn_fwd_l3"] == (1, 2, 1)
