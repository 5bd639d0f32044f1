"""The fused backward (``TUNING["backward"] = "fused"``), in interpret mode.

The level kernels take dq, dk, dv of levels a+1 .. ; one launch over tiles
of ``nr * 2**a`` fine rows computes levels a .. 0 block by block and writes
level 0's (``kernels._fused_backward``). Checked against the gradients of
the dense reference (autodiff of its float32 definition), against the
default level-by-level backward, and by the launches its jaxpr holds.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htransformer.attention import kernels
from tests.test_attention import dense_reference, make_mask, make_qkv
from tests.test_attention import max_abs
from tests.test_fused_forward import _attention, _grads, _holes_and_garbage
from tests.test_fused_forward import SHAPES, _launches
from tests.test_fused_forward import assert_default_path_gradients


def _fused(monkeypatch, tile_rows=64, forward="levels", **tuning):
  """The fused backward on tiles of ``tile_rows`` fine rows (a = 2 at
  blocks of 16), with the forward ``forward``, ``tuning`` set as well."""
  monkeypatch.setitem(kernels.TUNING, "backward", "fused")
  monkeypatch.setitem(kernels.TUNING, "forward", forward)
  monkeypatch.setitem(kernels.TUNING, "tile_rows", tile_rows)
  for key, value in tuning.items():
    monkeypatch.setitem(kernels.TUNING, key, value)


def _reference_grads(q, k, v, mask, cot, causal, block_size=16):
  """Gradients of sum(reference output * cot), the dense definition's,
  differentiated by JAX in float32."""
  def loss(q, k, v):
    out = dense_reference(q, k, v, mask, block_size=block_size,
                          causal=causal, xp=jnp)
    return jnp.sum(out * cot)
  return [np.asarray(g) for g in
          jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]


def _check(got, want, mask, tol=1e-4):
  for name, g, w in zip("qkv", got, want):
    assert np.isfinite(g).all(), name
    if mask is not None:
      assert (g[~mask] == 0).all(), name
      g, w = g[mask], w[mask]
    scale = max(1.0, float(np.abs(w).max()))
    assert max_abs(g, w) <= tol * scale, (name, max_abs(g, w), scale)


@pytest.mark.parametrize("forward", ["levels", "fused"])
@pytest.mark.parametrize("tail_rows", [16384, 0], ids=["tail", "no-tail"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_matches_dense_definition_with_holes_and_garbage(
    monkeypatch, causal, tail_rows, forward):
  """500 of 512 rows at blocks of 16 with holes, NaN and inf where not
  real (also in the cotangent): levels 0 .. 2 in the fused launch, 3 and
  4 by the coarse tail or a launch each; after either forward."""
  (q, k, v), clean, mask = _holes_and_garbage(3, 500, 2)
  cot = np.random.default_rng(4).standard_normal(
      (2, 500, 2, 32)).astype(np.float32)
  want = _reference_grads(*clean, mask, np.where(mask[..., None, None], cot,
                                                 0.0), causal)
  cot[~mask] = np.nan
  _fused(monkeypatch, forward=forward, tail_rows=tail_rows)
  _check(_grads(_attention(mask, causal), q, k, v, cot), want, mask)


@pytest.mark.parametrize("tile_rows,length,mask_kind", SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_matches_dense_definition(monkeypatch, tile_rows, length, mask_kind,
                                  causal):
  _fused(monkeypatch, tile_rows=tile_rows)
  q, k, v = make_qkv(length, 2, length, 2, 16, 16)
  mask = make_mask(length, 2, length, mask_kind)
  cot = np.random.default_rng(length).standard_normal(
      (2, length, 2, 16)).astype(np.float32)
  if mask is not None:
    cot = np.where(mask[..., None, None], cot, 0.0).astype(np.float32)
  want = _reference_grads(q, k, v, mask, cot, causal)
  _check(_grads(_attention(mask, causal), q, k, v, cot), want, mask)


def test_blocks_of_32_and_levels_above_in_one_launch(monkeypatch):
  """Blocks of 32, tiles of 128 rows (a = 2); levels 3 and up by launches
  of several levels (tiles of 64, ``levels_per_launch`` 3)."""
  _fused(monkeypatch, tile_rows=128, tail_rows=0, levels_per_launch=3)
  monkeypatch.setattr(kernels, "DEFAULT_TILE", 64)
  (q, k, v), clean, mask = _holes_and_garbage(11, 1000, 1)
  cot = np.random.default_rng(12).standard_normal(
      (2, 1000, 1, 32)).astype(np.float32)
  cot = np.where(mask[..., None, None], cot, 0.0).astype(np.float32)
  want = _reference_grads(*clean, mask, cot, False, block_size=32)
  fn = _attention(mask, False, 32)
  _check(_grads(fn, q, k, v, cot), want, mask)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_equals_the_default_path(monkeypatch, causal, dtype):
  """The same gradients as the level-by-level backward."""
  assert_default_path_gradients(
      monkeypatch, lambda m: _fused(m, tile_rows=256), causal, dtype)


def test_dropout_equals_the_default_path(monkeypatch):
  """Attention dropout drops the same weights as the level kernels'."""
  (q, k, v), _, mask = _holes_and_garbage(9, 500, 2)
  cot = np.random.default_rng(10).standard_normal(
      (2, 500, 2, 32)).astype(np.float32)
  fn = lambda: _attention(mask, False, rate=0.3, rng=jax.random.PRNGKey(1))
  want = _grads(fn(), q, k, v, cot)
  _fused(monkeypatch)
  got = _grads(fn(), q, k, v, cot)
  for name, g, w in zip("qkv", got, want):
    assert max_abs(g, w) <= 1e-5 * max(1.0, float(np.abs(w).max())), name
  plain = _grads(_attention(mask, False), q, k, v, cot)
  assert max_abs(got[2], plain[2]) > 0.05  # the dropout took effect


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_launches(monkeypatch, causal):
  """The gradient: one fused backward launch for levels 0 .. 2 and the dq
  and dk, dv level kernels of levels 3 and 4 only."""
  q, k, v = make_qkv(1, 1, 512, 2, 16, 16)
  mask = make_mask(1, 1, 512, "suffix")
  loss = lambda q, k, v: jnp.sum(_attention(mask, causal)(q, k, v))
  _fused(monkeypatch, tail_rows=0)
  names = _launches(jax.grad(loss), q, k, v)
  assert sum("hattn_bwd_fused2" in name for name in names) == 1, names
  levels = sorted(int(m.group(1)) for name in names
                  for m in [re.search(r"hattn_dq_l(\d+)", name)] if m)
  assert levels == [3, 4], names
  assert not any(re.search(r"hattn_(dkv|sweep)\w*_l[0-2]\b", name)
                 for name in names), names


# TUNING's checks of the fused keys and the lowering for an sm_90 card:
# tests/test_fused_forward.py.
