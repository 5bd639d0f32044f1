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


# ----------------------------------------------------------- the pyramid

_TILING = (8, 64)  # shared-memory tiles of bfloat16 rows of 64 (128 bytes)


def _transforms(width, dtype):
  """Tiling and swizzle of a [rows, width] shared-memory block."""
  swizzle = plgpu.find_swizzle(width * jax.numpy.dtype(dtype).itemsize * 8)
  elems = swizzle // jax.numpy.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _load(ref, layout, interpret):
  """A shared-memory block in registers, in ``layout`` (ignored in
  interpret mode, where jax 0.10's ``plgpu.load`` does not trace)."""
  return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def coarsen_mean(x, c, levels, *, rows=64, stages=2, programs=None,
                 out_slots=2, interpret=False):
  """Levels 1 .. ``levels`` of x [B, n, H, D]: each row the mean of the real
  rows of its pair one level down (counts c [B, n] of real tokens).

  The [B, n, H, D] array is read as [B, n / T, T, H, D] (T = 2**levels):
  a pipeline step loads, for one head, the T strided [rows, D] blocks of
  ``rows`` groups of T consecutive rows, and writes each level's rows in
  the same strided form; the levels are sums of pairs, all elementwise.
  """
  jnp = jax.numpy
  b, n, h, d = x.shape
  t = 2**levels
  groups = n // t
  if n % t or groups % rows:
    raise ValueError(f"coarsen_mean needs a length that is a multiple of "
                     f"{t * rows}, got {n}.")
  steps = groups // rows
  if programs is None:
    programs = 1
    while (programs * 2 * b * h <= 264 and steps % (programs * 2) == 0):
      programs *= 2
  per = steps // programs
  xv = x.reshape(b, groups, t, h, d)
  cv = jnp.swapaxes(c.astype(jnp.float32).reshape(b, groups, t), 1, 2)
  out_type = [jax.ShapeDtypeStruct((b, groups, t >> l, h, d), x.dtype)
              for l in range(1, levels + 1)]
  tf = _transforms(d, x.dtype)
  block = plgpu.BlockSpec((rows, d), lambda i: (i, 0), transforms=tf)
  vec = plgpu.BlockSpec((rows,), lambda i: (i,))
  wg, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

  def compute(*refs):
    x_refs, c_refs, o_refs = refs[:t], refs[t:2 * t], refs[2 * t:]
    sums, counts = [], []
    for x_ref, c_ref in zip(x_refs, c_refs):
      cs = _load(c_ref, row, interpret)
      xs = _load(x_ref, wg, interpret).astype(jnp.float32)
      cb = lax.broadcast_in_dim(cs, (rows, d), [0])
      sums.append(jnp.where(cb > 0, xs * cb, 0.0))
      counts.append(cs)
    at = 0
    for _ in range(levels):
      sums = [sums[2 * i] + sums[2 * i + 1] for i in range(len(sums) // 2)]
      counts = [counts[2 * i] + counts[2 * i + 1]
                for i in range(len(counts) // 2)]
      for s, cs in zip(sums, counts):
        inv = 1.0 / jnp.maximum(cs, 1.0)
        o_refs[at][...] = (s * lax.broadcast_in_dim(inv, (rows, d), [0])
                           ).astype(x.dtype)
        at += 1

  def body(x_gmem, c_gmem, *refs):
    o_gmems, out_smem = refs[:levels], refs[levels]
    bi, hi = lax.axis_index("b"), lax.axis_index("h")
    first = lax.axis_index("p") * per

    def step(idx, *in_refs):
      # Out blocks: ``out_slots`` slots; with two, a slot's copies of two
      # steps ago are done when at most the last step's t - 1 copies are
      # pending.
      slot = idx[0] % out_slots
      plgpu.wait_smem_to_gmem((t - 1) * (out_slots - 1), wait_read_only=True)
      o_refs = [out_smem.at[slot, j] for j in range(t - 1)]
      compute(*in_refs, *o_refs)
      plgpu.commit_smem()
      span = pl.ds((first + idx[0]) * rows, rows)
      at = 0
      for o in o_gmems:
        for j in range(o.shape[2]):
          plgpu.copy_smem_to_gmem(o_refs[at], o.at[bi, span, j, hi])
          at += 1

    span = pl.ds(first * rows, per * rows)
    ins = [x_gmem.at[bi, span, s, hi] for s in range(t)]
    ins += [c_gmem.at[bi, s, span] for s in range(t)]
    plgpu.emit_pipeline(step, grid=(per,), in_specs=[block] * t + [vec] * t,
                        max_concurrent_steps=stages)(*ins)
    plgpu.wait_smem_to_gmem(0)

  outs = kernel(body, out_shape=out_type,
                scratch=[plgpu.SMEM((out_slots, t - 1, rows, d), x.dtype,
                                    transforms=tf)],
                grid=(programs, h, b), grid_names=("p", "h", "b"),
                interpret=interpret)(xv, cv)
  return [o.reshape(b, n >> l, h, d) for l, o in enumerate(outs, 1)]


# ------------------------------------------------- the forward at level 0

_NO_KEY = -1e30  # kernels._NO_KEY: a masked logit; the lse of a row of none


def _programs(steps, per_batch_head, most=264):
  """Programs per (batch, head) over ``steps`` tiles: a power of two that
  divides them, as many as keep the launch within ``most`` programs."""
  p = 1
  while p * 2 * per_batch_head <= most and steps % (p * 2) == 0:
    p *= 2
  return p


def forward_level0(q, k, v, c, po, plse, *, nr, scale, stages=2,
                   programs=None, interpret=False):
  """Level 0 of the non-causal forward (``kernels._fwd_rows`` at level 0
  with the parent level's output ``po`` [B, n/2, H, D] and lse ``plse``
  [B, H, n/2]), in Mosaic GPU.

  A step takes 128 query rows as two [64, D] tiles, the even and the odd
  rows (TMA reads [B, n/2, 2, H, D] views): each row's parent is then row
  i of the same [64, D] parent tile, with no regrouping of rows in
  registers. Keys: a window of 128 + 2 max(nr, 32) rows around them. Returns
  (o [B, n, H, D], lse as [B, H, 2, n/2], the even rows' then the odd
  rows').
  """
  jnp = jax.numpy
  f32 = jnp.float32
  b, n, h, d = q.shape
  rows, tile = 64, 128
  # Keys: ``edge`` rows each side, at least a block, and a window whose
  # rows are a multiple of 64 (the product of weights and values reads it
  # in 64-row steps).
  edge = max(nr, 32)
  win = tile + 2 * edge
  if n % tile or n < win or win > 256:
    raise ValueError(f"forward_level0 needs a length that is a multiple "
                     f"of {tile} and at least {win}, blocks of at most 64; "
                     f"got {n} and {nr}.")
  steps = n // tile
  programs = programs or _programs(steps, b * h)
  per = steps // programs
  stages = min(stages, per)
  qv = q.reshape(b, n // 2, 2, h, d)
  cq = jnp.swapaxes(c.astype(f32).reshape(b, n // 2, 2), 1, 2)
  c = c.astype(f32)
  tq, tp = _transforms(d, q.dtype), _transforms(d, po.dtype)
  wg, row, col = (plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1),
                  plgpu.Layout.WGMMA.reduce(0))
  shift = nr.bit_length() - 1

  def body(q_g, k_g, v_g, c_g, cq_g, po_g, plse_g, o_g, lse_g, q_s, k_s,
           v_s, c_s, cq_s, po_s, plse_s, o_s, lse_s, bar):
    bi, hi = lax.axis_index("b"), lax.axis_index("h")
    first = lax.axis_index("p") * per

    def window(i):
      # (first query row, first key row, the query tiles' rows in the
      # [B, n/2, 2, H, D] view). Offsets are products (the key window's a
      # clamped index times ``edge``): Mosaic GPU checks that a TMA
      # offset is a multiple of the shared-memory tiling, and proves it
      # only through products.
      t = first + i
      at = jnp.clip(t * (tile // edge) - 1, 0, (n - win) // edge) * edge
      return t * tile, at, pl.ds(t * rows, rows)

    def issue(i, slot):
      _, at, half = window(i)
      keys, into = pl.ds(at, win), bar.at[slot]
      for s in range(2):
        plgpu.copy_gmem_to_smem(q_g.at[bi, half, s, hi], q_s.at[slot, s],
                                into)
      plgpu.copy_gmem_to_smem(k_g.at[bi, keys, hi], k_s.at[slot], into)
      plgpu.copy_gmem_to_smem(v_g.at[bi, keys, hi], v_s.at[slot], into)
      plgpu.copy_gmem_to_smem(c_g.at[bi, keys], c_s.at[slot], into)
      plgpu.copy_gmem_to_smem(cq_g.at[bi, :, half], cq_s.at[slot], into)
      plgpu.copy_gmem_to_smem(po_g.at[bi, half, hi], po_s.at[slot], into)
      plgpu.copy_gmem_to_smem(plse_g.at[bi, hi, half], plse_s.at[slot], into)

    for i in range(stages):
      issue(i, i)

    @pl.loop(0, per)
    def _(i):
      slot = i % stages
      plgpu.barrier_wait(bar.at[slot])
      start, at, half = window(i)
      ck = _load(c_s.at[slot], col, interpret)
      po = _load(po_s.at[slot], wg, interpret).astype(f32)
      pm = _load(plse_s.at[slot], row, interpret)
      qrow = _iota2((rows, win), 0, wg, interpret)
      kj = at + _iota2((rows, win), 1, wg, interpret)
      real = lax.broadcast_in_dim(ck, (rows, win), [1])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      for s in range(2):
        qi = start + 2 * qrow + s
        bq, bk = qi >> shift, kj >> shift
        ok = (bk >= bq - 1) & (bk <= bq + 1) & (real > 0)

        x = _matmul(q_s.at[slot, s], k_s.at[slot], True, interpret)
        x = jnp.where(ok, x * scale, _NO_KEY)
        m = jnp.max(x, axis=1)
        p = jnp.where(ok, jnp.exp(x - lax.broadcast_in_dim(m, x.shape, [0])),
                      0.0) * real
        z = jnp.sum(p, axis=1)
        p = p.astype(v.dtype)

        y = _matmul(p, v_s.at[slot], False, interpret)
        big = jnp.maximum(m, pm)
        a = jnp.exp(m - big)
        w = jnp.where(pm > 0.5 * _NO_KEY, jnp.exp(pm - big), 0.0)
        z = z * a + w
        y = (y * lax.broadcast_in_dim(a, y.shape, [0])
             + po * lax.broadcast_in_dim(w, y.shape, [0]))
        has = z > 0
        zs = jnp.where(has, z, 1.0)
        real_q = _load(cq_s.at[slot, s], row, interpret) > 0
        keep = (real_q & has).astype(f32) / zs
        o_s.at[s][...] = (y * lax.broadcast_in_dim(keep, y.shape, [0])
                          ).astype(o_s.dtype)
        lse_s.at[s][...] = jnp.where(has, big + jnp.log(zs), _NO_KEY)
      plgpu.commit_smem()
      for s in range(2):
        plgpu.copy_smem_to_gmem(o_s.at[s], o_g.at[bi, half, s, hi])
        plgpu.copy_smem_to_gmem(lse_s.at[s], lse_g.at[bi, hi, s, half])

      @pl.when(i + stages < per)
      def _():
        issue(i + stages, slot)

    plgpu.wait_smem_to_gmem(0)

  out_type = [jax.ShapeDtypeStruct((b, n // 2, 2, h, d), q.dtype),
              jax.ShapeDtypeStruct((b, h, 2, n // 2), f32)]
  scratch = [plgpu.SMEM((stages, 2, rows, d), q.dtype, transforms=tq),
             plgpu.SMEM((stages, win, d), k.dtype, transforms=tq),
             plgpu.SMEM((stages, win, d), v.dtype, transforms=tq),
             plgpu.SMEM((stages, win), f32),
             plgpu.SMEM((stages, 2, rows), f32),
             plgpu.SMEM((stages, rows, d), po.dtype, transforms=tp),
             plgpu.SMEM((stages, rows), f32),
             plgpu.SMEM((2, rows, d), q.dtype, transforms=tq),
             plgpu.SMEM((2, rows), f32),
             plgpu.Barrier(num_arrivals=8, num_barriers=stages)]
  o, lse = kernel(body, out_shape=out_type, scratch=scratch,
                  grid=(programs, h, b), grid_names=("p", "h", "b"),
                  interpret=interpret)(qv, k, v, c, cq, po, plse)
  return o.reshape(b, n, h, d), lse


def _iota2(shape, axis, layout, interpret):
  """int32 indices along ``axis`` of ``shape``, in ``layout`` on a GPU."""
  if interpret:
    return lax.broadcasted_iota(jax.numpy.int32, shape, axis)
  return plgpu.broadcasted_iota(jax.numpy.int32, shape, axis, layout=layout)


def _matmul(a, b_ref, transpose_b, interpret):
  """float32 ``a @ b`` (``a @ b.T`` with ``transpose_b``) on the tensor
  cores (``a`` a shared-memory ref or registers, ``b_ref`` shared memory).
  Interpret mode, whose ``wgmma`` takes neither a transposed ref nor
  registers, multiplies the loaded arrays instead."""
  jnp = jax.numpy
  if interpret:
    a = a if isinstance(a, jax.Array) else a[...]
    b = b_ref[...]
    return jnp.dot(a, b.T if transpose_b else b,
                   preferred_element_type=jnp.float32)
  b = b_ref.transpose((1, 0)) if transpose_b else b_ref
  rows, cols = a.shape[0], b.shape[1]

  def product(acc):
    plgpu.wgmma(acc, a, b)
    return acc[...]

  return pl.run_scoped(product, plgpu.ACC((rows, cols), jnp.float32))
