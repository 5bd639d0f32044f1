"""The public attention functions at the edges a model meets them at.

Numpy float64 inputs with x64 off, rows whose every logit sits below
-1e30, float16 at counts of coarse keys past float16's range, and the fused
kernels called inside a caller's own ``shard_map``. Values are checked
against the float64 definition (``tests/test_attention.py``).
"""

import functools
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htransformer.attention import hierarchical_attention
from tests.scripts_helper import ROOT, child_env
from tests.test_attention import make_mask, make_qkv, max_abs, numpy_reference

# ----------------------------------------------------------------------------
# 1. Numpy float64 inputs (numpy's default) with x64 off.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_numpy_float64_inputs_without_x64(impl):
  """JAX holds them as float32: the output is float32 and exact, with no
  warning (the plain path asked for float64 at every cast and warned each
  time) and no refusal (the kernels took them for float64)."""
  assert not jax.config.jax_enable_x64
  q, k, v = make_qkv(1, 2, 20, 2, 4, 3, dtype=np.float64)
  mask = make_mask(1, 2, 20, "partial")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = hierarchical_attention(q, k, v, block_size=16, causal=True,
                                 mask=mask, implementation=impl)
  assert out.dtype == jnp.float32
  want = numpy_reference(q.astype(np.float32), k.astype(np.float32),
                         v.astype(np.float32), mask, block_size=16,
                         causal=True)
  assert max_abs(out, want) <= 2e-5


# ----------------------------------------------------------------------------
# 2. Rows whose every logit is below -1e30.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_rows_with_all_logits_below_minus_1e30(causal):
  """Queries opposite to the keys, 1e16 long: every logit is near -1e32
  (float32 holds it). A level with no key in a row used to stand at -1e30,
  above the row's real logits, and zeroed or mis-weighted the row. (Not
  the fused kernels: they hand each row's float32 log-normaliser between
  levels and to the backward, which at logits this large has lost the
  normaliser's digits; kernels.py, "Precision".)"""
  q, k, v = make_qkv(2, 1, 40, 1, 4, 4)
  q[..., 0], k[..., 0] = -1e16, 1e16
  out = np.asarray(jax.jit(functools.partial(
      hierarchical_attention, block_size=4, causal=causal,
      implementation="xla"))(q, k, v))
  want = numpy_reference(q, k, v, block_size=4, causal=causal)
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 2e-5


# ----------------------------------------------------------------------------
# 3. float16: a coarse key's count past 65,504.
# ----------------------------------------------------------------------------


def test_float16_coarse_counts_beyond_float16_range():
  """131,073 tokens in blocks of 2: the coarsest keys stand for 65,536
  tokens each, a weight float16 cannot hold (it was inf, and so was every
  output). Equal logits: the definition is the mean of the values."""
  length = 2**17 + 1
  v = np.random.default_rng(3).standard_normal((1, length, 2, 1)).astype(
      np.float16)
  q = np.zeros_like(v)
  out = jax.jit(functools.partial(hierarchical_attention, block_size=2,
                                  implementation="xla"))(q, q, v)
  assert out.dtype == jnp.float16
  out = np.asarray(out, np.float64)
  want = np.broadcast_to(v.astype(np.float64).mean(1, keepdims=True),
                         v.shape)
  assert np.isfinite(out).all()
  assert max_abs(out, want) <= 1e-3


# ----------------------------------------------------------------------------
# 4. The fused kernels inside a caller's shard_map.
# ----------------------------------------------------------------------------

_SHARD_MAP_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from htransformer.attention import hierarchical_attention
    from tests.test_attention import make_mask, make_qkv, numpy_reference

    q, k, v = make_qkv(4, 4, 20, 4, 4, 3)
    mask = make_mask(4, 4, 20, "suffix")
    want = numpy_reference(q, k, v, mask, block_size=16, causal=True)
    fn = lambda q, k, v, m: hierarchical_attention(
        q, k, v, mask=m, block_size=16, causal=True,
        implementation="pallas_interpret")
    mesh = jax.make_mesh((2, 2), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rows = P("data", None, "model")
    for names in (None, {"data"}):
      split = rows if names is None else P("data")
      extra = {} if names is None else {"axis_names": names}
      run = jax.shard_map(fn, mesh=mesh, in_specs=(split,) * 3 + (P("data"),),
                          out_specs=split, check_vma=False, **extra)
      out = np.asarray(jax.jit(run)(q, k, v, mask))
      print(names, float(np.abs(out - want).max()))
""")


def test_kernels_inside_a_callers_shard_map():
  """Over the mesh axes of a caller's shard_map (all of them, or "data"
  only) each device already holds its share: the kernels run on it as it
  is. (Where a device's batch rows or heads divided by those axes again,
  they went into a shard_map of their own over the same axes, which does
  not lower.)"""
  r = subprocess.run(
      [sys.executable, "-c", _SHARD_MAP_SCRIPT], cwd=ROOT,
      env=child_env(JAX_PLATFORMS="cpu", add_xla_flags=[
          "--xla_force_host_platform_device_count=4"]),
      capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.split("\n")[:2]
  assert [line.split()[0] for line in lines] == ["None", "{'data'}"], lines
  for line in lines:
    assert float(line.split()[-1]) <= 2e-5, line
