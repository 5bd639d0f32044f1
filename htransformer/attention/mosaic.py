"""Mosaic GPU (Pallas) kernels: the groundwork of a port of ``kernels.py``.

``kernels.py`` is written for Pallas's Triton backend, which jax 0.11 marks
as deprecated; its kernels are also latency-bound (51-62% of the copy rate
on an H200, docs/benchmarks.md). Mosaic GPU programs copy whole tiles with
the bulk tensor copy engine (TMA), several stages deep, which is what they
lack. The API differs between the jax versions this project runs on (jax
0.10 on Python 3.11, jax 0.11 on the GPU hosts), so kernels are defined
through ``kernel`` below, and checked on a CPU with ``interpret=True``
(Mosaic GPU interpret mode: threads, shared memory and barriers
simulated).

Nothing here is used by the attention yet. ``double`` (a 1 GiB array
doubled through shared memory) is the copy ceiling of such kernels:
``profiling.copy_kernel("mosaic")``.
"""

from __future__ import annotations

import inspect

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def interpret_params():
  """Parameters that run a Mosaic GPU kernel in interpret mode (public
  from jax 0.11; jax 0.10 has them under ``jax._src``)."""
  params = getattr(plgpu, "InterpretGPUParams", None)
  if params is None:
    from jax._src.pallas.mosaic_gpu.interpret import params as private
    params = private.InterpretGPUParams
  return params()


# jax 0.11 renamed plgpu.kernel's out_shape and scratch_shapes.
_NEW_NAMES = "out_type" in inspect.signature(plgpu.kernel).parameters


def kernel(body, *, out_shape, scratch, grid, grid_names, interpret=False):
  """``plgpu.kernel`` under this jax's keyword names: ``body(*in_refs,
  *out_refs, *scratch_refs)`` runs once per point of ``grid`` (its index
  ``lax.axis_index(name)``)."""
  names = (("out_type", "scratch_types") if _NEW_NAMES else
           ("out_shape", "scratch_shapes"))
  return plgpu.kernel(
      body, **{names[0]: out_shape, names[1]: scratch}, grid=grid,
      grid_names=grid_names,
      interpret=interpret_params() if interpret else None)


# Rows of a ``double`` tile: [256, 128] bfloat16, 64 KiB (a TMA box has at
# most 256 elements per dimension).
_TILE = (256, 128)


def double(x, *, interpret=False):
  """``2 * x`` for a [rows, 128] array (rows a multiple of 256): each
  program copies one tile into shared memory (TMA, waiting on a barrier),
  doubles it there and copies it back."""
  rows, width = x.shape
  if width != _TILE[1] or rows % _TILE[0]:
    raise ValueError(f"double takes [n * {_TILE[0]}, {_TILE[1]}] arrays, "
                     f"got {list(x.shape)}.")

  def body(x_gmem, o_gmem, smem, bar):
    at = pl.ds(lax.axis_index("tile") * _TILE[0], _TILE[0])
    plgpu.copy_gmem_to_smem(x_gmem.at[at], smem, bar)
    plgpu.barrier_wait(bar)
    smem[...] = smem[...] * 2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, o_gmem.at[at])
    plgpu.wait_smem_to_gmem(0)

  return kernel(body, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                scratch=[plgpu.SMEM(_TILE, x.dtype),
                         plgpu.Barrier(num_arrivals=1)],
                grid=(rows // _TILE[0],), grid_names=("tile",),
                interpret=interpret)(x)
