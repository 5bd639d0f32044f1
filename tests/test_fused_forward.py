"""The fused forward (``TUNING["forward"] = "fused"``), in interpret mode.

The level kernels run levels a+1 .. on the pyramid; one launch over tiles
of ``nr * 2**a`` fine rows computes levels a .. 0 (``kernels._fused_forward``).
Checked against the float64 dense reference (values), against the default
level-by-level forward (gradients, through the same backward), and by the
launches its jaxpr holds.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htransformer.attention import hierarchical_attention
from htransformer.attention import kernels
from tests.scripts_helper import jaxpr_equations
from tests.test_attention import make_mask, make_qkv, max_abs
from tests.test_attention import numpy_reference


def _fused(monkeypatch, tile_rows=64, **tuning):
  """The fused forward on tiles of ``tile_rows`` fine rows (a = 2 at
  blocks of 16), ``tuning`` set as well."""
  monkeypatch.setitem(kernels.TUNING, "forward", "fused")
  monkeypatch.setitem(kernels.TUNING, "tile_rows", tile_rows)
  for key, value in tuning.items():
    monkeypatch.setitem(kernels.TUNING, key, value)


def _attention(mask, causal, block_size=16, rate=0.0, rng=None):
  return lambda q, k, v: hierarchical_attention(
      q, k, v, block_size=block_size, causal=causal, mask=mask,
      implementation="pallas_interpret", dropout_rate=rate,
      dropout_rng=rng)


def _holes_and_garbage(seed, length, heads, d=16, dv=32):
  """q, k, v and a mask of 2 rows: row 0 padded from 400 on, row 1 with
  holes (one a whole block, one across a tile's edge); NaN and inf where
  the mask is False."""
  q, k, v = make_qkv(seed, 2, length, heads, d, dv)
  mask = np.ones((2, length), bool)
  mask[0, 400:] = False
  mask[1, 48:64] = False
  mask[1, 60:71] = False
  mask[1] &= np.random.default_rng(seed).random(length) < 0.8
  clean = [x.copy() for x in (q, k, v)]
  for x in (q, k, v):
    x[~mask] = np.nan
  q[1, np.flatnonzero(~mask[1])[:3]] = np.inf
  return (q, k, v), clean, mask


def test_fused_levels():
  # Tiles of at most tile_rows rows and at most half the sequence.
  assert kernels.fused_levels(16, 5, 256) == 4
  assert kernels.fused_levels(16, 5, 64) == 2
  assert kernels.fused_levels(16, 5, 16) == 0
  assert kernels.fused_levels(16, 3, 256) == 2
  assert kernels.fused_levels(64, 6, 256) == 2
  # The level kernels' launches above a = 4: levels 5 .. 7.
  assert kernels._level_groups(4096, 8, 16, 16, 1, 5) == [
      (5, 1, 16), (6, 1, 16), (7, 1, 16)]
  assert kernels._level_groups(4096, 8, 64, 16, 3, 5) == [(5, 3, 64)]


@pytest.mark.parametrize("tail_rows", [16384, 0], ids=["tail", "no-tail"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_matches_dense_definition_with_holes_and_garbage(monkeypatch,
                                                         causal, tail_rows):
  """512 rows at blocks of 16: levels 0 .. 4, the fused launch levels 0 ..
  2, levels 3 and 4 by the coarse tail or by a launch each."""
  _fused(monkeypatch, tail_rows=tail_rows)
  (q, k, v), clean, mask = _holes_and_garbage(3, 500, 2)
  want = numpy_reference(*clean, mask, block_size=16, causal=causal)
  out = np.asarray(jax.jit(_attention(mask, causal))(q, k, v))
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 2e-5
  assert (out[~mask] == 0).all()


# (tile_rows, length, mask kind) at blocks of 16, also the fused backward's.
SHAPES = [
    (64, 512, "none"),    # every count known when tracing (Uniform)
    (16, 200, "suffix"),  # a = 0: level 0 alone, from level 1's result
    (256, 128, "suffix"),  # a = 2 = the coarsest level: no parent
    (32, 256, "empty"),   # a row with no real token
]


@pytest.mark.parametrize("tile_rows,length,mask_kind", SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_matches_dense_definition(monkeypatch, tile_rows, length, mask_kind,
                                  causal):
  _fused(monkeypatch, tile_rows=tile_rows)
  q, k, v = make_qkv(length, 2, length, 2, 16, 16)
  mask = make_mask(length, 2, length, mask_kind)
  want = numpy_reference(q, k, v, mask, block_size=16, causal=causal)
  out = np.asarray(jax.jit(_attention(mask, causal))(q, k, v))
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 2e-5


def test_levels_above_in_one_launch(monkeypatch):
  """Levels 3 and 4 in one launch of the level kernels (tiles of 64,
  ``levels_per_launch`` 3), then the fused launch."""
  _fused(monkeypatch, tail_rows=0, levels_per_launch=3)
  monkeypatch.setattr(kernels, "DEFAULT_TILE", 64)
  (q, k, v), clean, mask = _holes_and_garbage(13, 500, 1)
  fn = _attention(mask, True)
  assert "hattn_fwd_l3_2" in " ".join(_launches(fn, q, k, v))
  want = numpy_reference(*clean, mask, block_size=16, causal=True)
  out = np.asarray(jax.jit(fn)(q, k, v))
  assert max_abs(out, want) <= 2e-5
  assert (out[~mask] == 0).all()


def test_blocks_of_32(monkeypatch):
  """Blocks of 32, tiles of 128 rows: a = 2, levels 3 and up above."""
  _fused(monkeypatch, tile_rows=128)
  (q, k, v), clean, mask = _holes_and_garbage(11, 700, 1)
  want = numpy_reference(*clean, mask, block_size=32, causal=False)
  out = np.asarray(jax.jit(_attention(mask, False, 32))(q, k, v))
  assert max_abs(out, want) <= 2e-5
  assert (out[~mask] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bfloat16(monkeypatch, causal):
  """bfloat16 inputs: the output in bfloat16, within its error of the
  reference, and close to the level-by-level forward's."""
  (q, k, v), clean, mask = _holes_and_garbage(5, 500, 2, 16, 16)
  want = numpy_reference(*clean, mask, block_size=16, causal=causal)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  fn = _attention(mask, causal)
  levels = np.asarray(jax.jit(fn)(*bf16), np.float32)
  _fused(monkeypatch)
  out = jax.jit(_attention(mask, causal))(*bf16)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  assert np.isfinite(out).all()
  assert (out[~mask] == 0).all()
  error = lambda x: np.linalg.norm(x - want) / np.linalg.norm(want)
  assert error(out) < 1e-2
  assert error(out) < 1.5 * error(levels) + 1e-3, (error(out),
                                                   error(levels))


def _grads(fn, q, k, v, cot):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)
  return [np.asarray(g, np.float32) for g in
          jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_equal_the_default_path(monkeypatch, causal, dtype):
  """The backward runs from the pyramid, output and lse the fused forward
  returns: the gradients equal the default path's."""
  assert_default_path_gradients(monkeypatch, _fused, causal, dtype)


def assert_default_path_gradients(monkeypatch, fuse, causal, dtype):
  """The gradients with ``fuse(monkeypatch)``'s settings equal the default
  path's (float32: to rounding; bfloat16: within its rounding of the
  output and lse), 500 rows with holes, NaN and inf where not real (also
  in the cotangent), and are zero there."""
  (q, k, v), _, mask = _holes_and_garbage(7, 500, 2)
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  cot = np.random.default_rng(8).standard_normal(
      (2, 500, 2, 32)).astype(np.float32)
  cot[~mask] = np.nan  # the output there is zero whatever its cotangent
  want = _grads(_attention(mask, causal), q, k, v, cot)
  fuse(monkeypatch)
  got = _grads(_attention(mask, causal), q, k, v, cot)
  for name, g, w in zip("qkv", got, want):
    assert np.isfinite(g).all(), name
    assert (g[~mask] == 0).all(), name
    if dtype == "float32":
      assert max_abs(g, w) <= 1e-5 * max(1.0, float(np.abs(w).max())), name
    else:
      assert np.linalg.norm(g - w) / np.linalg.norm(w) < 2e-2, name


def test_dropout_equals_the_default_path(monkeypatch):
  """Attention dropout drops the same weights as the level kernels."""
  (q, k, v), _, mask = _holes_and_garbage(9, 500, 2)
  fn = _attention(mask, False, rate=0.3, rng=jax.random.PRNGKey(1))
  want = np.asarray(jax.jit(fn)(q, k, v))
  _fused(monkeypatch)
  fn = _attention(mask, False, rate=0.3, rng=jax.random.PRNGKey(1))
  got = np.asarray(jax.jit(fn)(q, k, v))
  assert max_abs(got, want) <= 2e-5
  assert max_abs(got, np.asarray(jax.jit(_attention(mask, False))(
      q, k, v))) > 0.05  # the dropout took effect


def _launches(fn, *args):
  """The names of the Pallas launches in ``fn``'s jaxpr."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [str(e.params.get("name_and_src_info", e.params.get("name", "")))
          for e in jaxpr_equations(jaxpr) if e.primitive.name == "pallas_call"]


def _forward_levels(names):
  """The levels of the per-level forward launches among ``names``."""
  return sorted(int(m.group(1)) for name in names
                for m in [re.search(r"hattn_fwd_l(\d+)", name)] if m)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_launches(monkeypatch, causal):
  """Forward and gradient: one fused launch for levels 0 .. 2, no level
  kernel of those levels' forward, the level kernels for levels 3 and 4."""
  q, k, v = make_qkv(1, 1, 512, 2, 16, 16)
  mask = make_mask(1, 1, 512, "suffix")
  loss = lambda q, k, v: jnp.sum(_attention(mask, causal)(q, k, v))
  monkeypatch.setitem(kernels.TUNING, "tail_rows", 0)
  default = _launches(jax.grad(loss), q, k, v)
  assert _forward_levels(default) == [0, 1, 2, 3, 4]
  assert not any("fused" in name for name in default)
  _fused(monkeypatch)
  for fn in (_attention(mask, causal), jax.grad(loss)):
    names = _launches(fn, q, k, v)
    assert sum("hattn_fwd_fused2" in name for name in names) == 1, names
    assert _forward_levels(names) == [3, 4], names
  # The backward's launches are the default path's.
  backward = lambda names: sorted(n.split(" ")[0] for n in names
                                  if "fwd" not in n)
  assert backward(names) == backward(default)


def test_tuning_is_checked(monkeypatch):
  q, k, v = make_qkv(1, 1, 64, 1, 16, 16)
  for key, value in (("forward", "tile"), ("tile_rows", 48),
                     ("tile_rows", 8), ("backward", "tile"),
                     ("fused_warps", 3), ("fused_bwd_warps", 64)):
    with monkeypatch.context() as m:
      m.setitem(kernels.TUNING, key, value)
      with pytest.raises(ValueError, match=re.escape(f"TUNING[{key!r}]")):
        jax.jit(_attention(None, False))(q, k, v)
  assert kernels.parse_tuning(["forward=fused", "tile_rows=128",
                               "backward=fused", "fused_bwd_warps=2"]) == {
      "forward": "fused", "tile_rows": 128, "backward": "fused",
      "fused_bwd_warps": 2}


@pytest.mark.parametrize("causal,masked", [(False, False), (True, True)])
def test_lowers_for_hopper(monkeypatch, causal, masked):
  """The fused forward's launch (a = 4: tiles of 256 rows at blocks of 16,
  the default ``tile_rows``) lowers to Triton IR for an sm_90 card from
  this CPU, forward+backward at 2,048 tokens, heads 8, head_dim 64,
  bfloat16 (``scripts/kernel_registers.py``'s capture), with the level
  kernels' backward and with the fused backward's launch."""
  from tests.scripts_helper import load_script
  capture = lambda: set(load_script("kernel_registers").capture_kernels(
      2048, 16, 64, causal, masked))
  monkeypatch.setitem(kernels.TUNING, "forward", "fused")
  found = capture()
  assert "hattn_fwd_fused4" in found, sorted(found)
  assert not {"hattn_fwd_l0", "hattn_fwd_l4"} & found, sorted(found)
  assert {"hattn_dq_l0", "hattn_dkv_l0"} <= found, sorted(found)
  monkeypatch.setitem(kernels.TUNING, "backward", "fused")
  found = capture()
  assert {"hattn_fwd_fused4", "hattn_bwd_fused4"} <= found, sorted(found)
  assert not {"hattn_dq_l0", "hattn_dkv_l0", "hattn_dq_l4"} & found, (
      sorted(found))
