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

``coarsen`` is the pyramid of ``kernels.py`` (its three modes) in passes of
up to two levels, chosen by ``kernels.TUNING["coarsen_impl"] = "mosaic"``;
``double`` (a 1 GiB array doubled through shared memory) is the copy
ceiling of such kernels: ``profiling.copy_kernel("mosaic")``.
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


# ----------------------------------------------------------- the pyramid

def _transforms(width, dtype):
  """Tiling and swizzle of a [rows, width] shared-memory block."""
  swizzle = plgpu.find_swizzle(width * jax.numpy.dtype(dtype).itemsize * 8)
  elems = swizzle // jax.numpy.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


# jax 0.10's plgpu.load needs an index after the ref; 0.11 deprecates it.
_LOAD_NEEDS_INDEX = (inspect.signature(plgpu.load).parameters["idx"].default
                     is inspect.Parameter.empty)


def _load(ref, layout, interpret):
  """A shared-memory block in registers, in ``layout`` (ignored in
  interpret mode, where jax 0.10's ``plgpu.load`` does not trace)."""
  if interpret:
    return ref[...]
  if _LOAD_NEEDS_INDEX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _loaded_rows(mode, t):
  """Which of the T rows of a group a mode reads ("first": the first of
  each pair)."""
  return list(range(0, t, 2)) if mode == "first" else list(range(t))


def _combine(mode, a, b):
  """One level up from a pair of (values or float32 sums [rows, D], real
  counts [rows]): ``kernels._coarsen_kernel``'s modes."""
  (xa, ca), (xb, cb) = a, b
  if mode == "mean":
    return xa + xb, ca + cb
  if mode == "first_real":
    first = lax.broadcast_in_dim(ca, xa.shape, [0]) > 0
    return jax.numpy.where(first, xa, xb), ca + cb
  return xa, ca  # "first"


# Shared memory a Hopper program may use (227 KiB), less room for barriers.
SMEM_BYTES = 227 * 1024 - 1024


def coarsen_smem(arrays, modes, levels, *, rows=64, stages=2, out_slots=2):
  """Shared memory of a ``coarsen`` launch (bytes): the largest array's
  pipeline buffers (``stages`` steps of its blocks and counts) and the
  output slots."""
  t = 2**levels
  block = lambda x: rows * x.shape[-1] * jax.numpy.dtype(x.dtype).itemsize
  pipeline = max(stages * len(_loaded_rows(m, t)) * (block(x) + 4 * rows)
                 for x, m in zip(arrays, modes))
  return pipeline + out_slots * (t - 1) * max(block(x) for x in arrays)


def coarsen(arrays, modes, c, levels, *, rows=64, stages=2, programs=None,
            out_slots=2, interpret=False):
  """Levels 1 .. ``levels`` of each [B, n, H, D] array of ``arrays``, by
  its mode (``kernels._coarsen``: "mean", the mean of a pair's real rows;
  "first", the pair's first row; "first_real", its first real row), from
  the counts c [B, n] of real tokens; rows of none are zeros. One launch.

  Each array is read as [B, n / T, T, H, D] (T = 2**levels): a pipeline
  step loads, for one head, the T strided [rows, D] blocks of ``rows``
  groups of T consecutive rows (TMA, ``stages`` steps ahead), and writes
  each level's rows in the same strided form: every level is then an
  elementwise function of two blocks, with no regrouping of rows in
  registers. Returns [[level 1, ..., level ``levels``] of each array].
  """
  jnp = jax.numpy
  b, n, h, d = arrays[0].shape
  if any(x.shape != arrays[0].shape or x.dtype != arrays[0].dtype
         for x in arrays):
    raise ValueError("mosaic.coarsen takes arrays of one shape and dtype, "
                     f"got {[(x.shape, str(x.dtype)) for x in arrays]}.")
  t = 2**levels
  groups = n // t
  if n % t or groups % rows:
    raise ValueError(f"mosaic.coarsen needs a length that is a multiple "
                     f"of {t * rows}, got {n}.")
  steps = groups // rows
  programs = programs or _programs(steps, b * h)
  per = steps // programs
  views = [x.reshape(b, groups, t, h, d) for x in arrays]
  cv = jnp.swapaxes(c.astype(jnp.float32).reshape(b, groups, t), 1, 2)
  out_type = [jax.ShapeDtypeStruct((b, groups, t >> l, h, d), x.dtype)
              for x in arrays for l in range(1, levels + 1)]
  dtype = arrays[0].dtype
  tf = _transforms(d, dtype)
  block = plgpu.BlockSpec((rows, d), lambda i: (i, 0), transforms=tf)
  vec = plgpu.BlockSpec((rows,), lambda i: (i,))
  wg, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

  def compute(mode, x_refs, c_refs, o_refs):
    level = []  # (values or float32 sums, counts) of the level below
    for x_ref, c_ref in zip(x_refs, c_refs):
      cs = _load(c_ref, row, interpret)
      xs = _load(x_ref, wg, interpret).astype(jnp.float32)
      cb = lax.broadcast_in_dim(cs, xs.shape, [0])
      level.append((jnp.where(cb > 0, xs * cb if mode == "mean" else xs,
                              0.0), cs))
    if mode == "first":  # Only the even rows were read: level 1 is them.
      level = [(x, cs) for x, cs in level for _ in range(2)]
    at = 0
    for _ in range(levels):
      level = [_combine(mode, level[2 * i], level[2 * i + 1])
               for i in range(len(level) // 2)]
      for x, cs in level:
        if mode == "mean":
          x = x * lax.broadcast_in_dim(1.0 / jnp.maximum(cs, 1.0), x.shape,
                                       [0])
        o_refs[at][...] = x.astype(dtype)
        at += 1

  def body(*refs):
    x_gmems, c_gmem = refs[:len(arrays)], refs[len(arrays)]
    o_gmems, out_smem = refs[len(arrays) + 1:-1], refs[-1]
    bi, hi = lax.axis_index("b"), lax.axis_index("h")
    first = lax.axis_index("p") * per
    span = pl.ds(first * rows, per * rows)
    for a, (x_gmem, mode) in enumerate(zip(x_gmems, modes)):
      outs = o_gmems[a * levels:(a + 1) * levels]
      read = _loaded_rows(mode, t)

      def step(idx, *in_refs, mode=mode, outs=outs, read=read):
        # Out blocks: ``out_slots`` slots; with two, a slot's copies of two
        # steps ago are done when at most the last step's t - 1 copies
        # are pending.
        slot = idx[0] % out_slots
        plgpu.wait_smem_to_gmem((t - 1) * (out_slots - 1),
                                wait_read_only=True)
        o_refs = [out_smem.at[slot, j] for j in range(t - 1)]
        compute(mode, in_refs[:len(read)], in_refs[len(read):], o_refs)
        plgpu.commit_smem()
        at_rows = pl.ds((first + idx[0]) * rows, rows)
        at = 0
        for o in outs:
          for j in range(o.shape[2]):
            plgpu.copy_smem_to_gmem(o_refs[at], o.at[bi, at_rows, j, hi])
            at += 1

      ins = [x_gmem.at[bi, span, s, hi] for s in read]
      ins += [c_gmem.at[bi, s, span] for s in read]
      plgpu.emit_pipeline(
          step, grid=(per,), in_specs=[block] * len(read) + [vec] * len(read),
          max_concurrent_steps=stages)(*ins)
      # The next array's steps count their slots from 0 again.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.wait_smem_to_gmem(0)

  body.__name__ = "hattn_coarsen_mosaic"  # the kernel's name in profiles
  outs = kernel(body, out_shape=out_type,
                scratch=[plgpu.SMEM((out_slots, t - 1, rows, d), dtype,
                                    transforms=tf)],
                grid=(programs, h, b), grid_names=("p", "h", "b"),
                interpret=interpret)(*views, cv)
  shaped = [o.reshape(b, n >> (1 + j % levels), h, d)
            for j, o in enumerate(outs)]
  return [shaped[a * levels:(a + 1) * levels] for a in range(len(arrays))]


def _programs(steps, per_batch_head, most=264):
  """Programs per (batch, head) over ``steps`` tiles: a power of two that
  divides them, as many as keep the launch within ``most`` programs."""
  p = 1
  while p * 2 * per_batch_head <= most and steps % (p * 2) == 0:
    p *= 2
  return p
