"""Mosaic GPU (Pallas) kernels: a partial port of ``kernels.py``.

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
up to two levels, the default on Hopper GPUs (``kernels.TUNING
["coarsen_impl"]``). ``forward_level`` is a level's forward, causal or
not, on contiguous tiles of 64 query rows, and ``dq_level`` and
``dkv_level`` its backward on the same tiles and windows: by default on
Hopper GPUs at level 0, at the block sizes, head widths and causality
where they were measured faster (``kernels.TUNING["forward_l0_impl"]``,
``["backward_l0_impl"]``, ``kernels.MOSAIC_L0_FASTER`` and
``MOSAIC_L0_FASTER_CAUSAL``); at coarser levels with
``TUNING["mosaic_levels"]`` (timed slower than the Triton kernels there).
``scripts/profile_kernels.py --mosaic_forward``, ``--mosaic_dq`` and
``--mosaic_dkv`` time level 0's against the Triton kernels
(docs/benchmarks.md, sections "Mosaic GPU"). ``double`` (a 1 GiB array
doubled through shared memory) is the copy ceiling of such kernels:
``profiling.copy_kernel("mosaic")``.

Every kernel here is checked on a CPU twice
(``tests/test_kernels.py``): their values in interpret mode
(where ``wgmma`` is replaced by ``jnp.dot``: interpret mode takes neither
a transposed operand nor one in registers), and their compilation for a
Hopper GPU (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``
runs Mosaic GPU's layout inference and shared-memory check).
"""

from __future__ import annotations

import inspect
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# A masked logit, and the lse of a row that sees no key.
from htransformer.attention.kernels import _NO_KEY, _allowed


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

def _transforms(width, dtype, most=128):
  """Tiling and swizzle of a [rows, width] shared-memory block (a swizzle
  of at most ``most`` bytes: the rows of a block that is the second
  operand of a tensor-core product, [K, N], come in steps of the swizzle's
  width, 64 rows at 128 bytes of bfloat16, 32 at 64)."""
  itemsize = jax.numpy.dtype(dtype).itemsize
  swizzle = min(plgpu.find_swizzle(width * itemsize * 8), most)
  elems = swizzle // itemsize
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
  counts [rows], or one number for all rows: every row real):
  ``kernels._coarsen_kernel``'s modes."""
  (xa, ca), (xb, cb) = a, b
  if mode == "mean":
    return xa + xb, ca + cb
  if mode == "first_real" and not isinstance(ca, float):
    first = lax.broadcast_in_dim(ca, xa.shape, [0]) > 0
    return jax.numpy.where(first, xa, xb), ca + cb
  return xa, ca  # "first"


# Shared memory a Hopper program may use (227 KiB), less room for barriers.
SMEM_BYTES = 227 * 1024 - 1024


def coarsen_smem(arrays, modes, levels, *, rows=64, stages=2, out_slots=2,
                 counts=True):
  """Shared memory of a ``coarsen`` launch (bytes, at least what Mosaic
  GPU allocates): the largest array's pipeline buffers (``stages`` steps
  of its blocks and, unless ``counts`` is False, as where ``coarsen``
  takes them as a number, their counts) and the output slots."""
  t = 2**levels
  block = lambda x: _aligned(
      rows * x.shape[-1] * jax.numpy.dtype(x.dtype).itemsize)
  count = _aligned(4 * rows) if counts else 0
  pipeline = max(stages * len(_loaded_rows(m, t)) * (block(x) + count)
                 for x, m in zip(arrays, modes))
  return pipeline + out_slots * (t - 1) * max(block(x) for x in arrays)


def _aligned(nbytes):
  """A shared-memory buffer's bytes rounded up to 1 KiB: what Mosaic GPU
  allocates for it is within that (its 256-byte count vectors take more
  than 256: a [64, 128] bfloat16 pyramid pass that this bound without the
  rounding let through needed 233,488 bytes, over the 232,448)."""
  return -(-nbytes // 1024) * 1024


def coarsen(arrays, modes, c, levels, *, rows=64, stages=2, programs=None,
            out_slots=2, interpret=False):
  """Levels 1 .. ``levels`` of each [B, n, H, D] array of ``arrays``, by
  its mode (``kernels._coarsen``: "mean", the mean of a pair's real rows;
  "first", the pair's first row; "first_real", its first real row), from
  the counts c [B, n] of real tokens; rows of none are zeros. ``c`` may
  be a number instead: every row's count (no mask and no padding; no
  counts are then read, ``kernels.Uniform``). One launch.

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
  count = _counts(c, False, "mosaic.coarsen")
  uniform = count is not None
  cv = [] if uniform else [
      jnp.swapaxes(c.astype(jnp.float32).reshape(b, groups, t), 1, 2)]
  out_type = [jax.ShapeDtypeStruct((b, groups, t >> l, h, d), x.dtype)
              for x in arrays for l in range(1, levels + 1)]
  dtype = arrays[0].dtype
  tf = _transforms(d, dtype)
  block = plgpu.BlockSpec((rows, d), lambda i: (i, 0), transforms=tf)
  vec = plgpu.BlockSpec((rows,), lambda i: (i,))
  wg, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

  def compute(mode, x_refs, c_refs, o_refs):
    level = []  # (values or float32 sums, counts) of the level below
    for i, x_ref in enumerate(x_refs):
      xs = _load(x_ref, wg, interpret).astype(jnp.float32)
      if uniform:  # Every row real, each of c tokens: no select.
        level.append((xs * count if mode == "mean" else xs, count))
        continue
      cs = _load(c_refs[i], row, interpret)
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
        if mode == "mean" and uniform:
          x = x * (1.0 / cs)
        elif mode == "mean":
          x = x * lax.broadcast_in_dim(1.0 / jnp.maximum(cs, 1.0), x.shape,
                                       [0])
        o_refs[at][...] = x.astype(dtype)
        at += 1

  def body(*refs):
    x_gmems, c_gmem = refs[:len(arrays)], refs[len(arrays)] if cv else None
    o_gmems, out_smem = refs[len(arrays) + len(cv):-1], refs[-1]
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
      ins += [c_gmem.at[bi, s, span] for s in read] if cv else []
      plgpu.emit_pipeline(
          step, grid=(per,),
          in_specs=[block] * len(read) + [vec] * (len(read) if cv else 0),
          max_concurrent_steps=stages)(*ins)
      # The next array's steps count their slots from 0 again.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.wait_smem_to_gmem(0)

  body.__name__ = "hattn_coarsen_mosaic"  # the kernel's name in profiles
  outs = kernel(body, out_shape=out_type,
                scratch=[plgpu.SMEM((out_slots, t - 1, rows, d), dtype,
                                    transforms=tf)],
                grid=(programs, h, b), grid_names=("p", "h", "b"),
                interpret=interpret)(*views, *cv)
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


# ------------------------------------------------- the levels (0 and up)

_ROWS = 64  # rows of a level tile (a tensor-core product's least)


def _buffers(kind, nr, d, dtype, counts=True, weights=True):
  """A level kernel's shared-memory buffers, (staged, outs), each a list of
  (shape, dtype, transforms) (``_Level.scratch``): ``staged`` get a copy per
  step and a slot per stage, ``outs`` one slot; ``counts`` or ``weights``
  False, those buffers None (a kernel that takes them as numbers reads
  none). "forward": q, the window's k, v and counts, the tile's counts, the
  parents' output and the parent lse; the output and its lse. "dq": q, the
  window's k, v and counts, the tile's counts, dO, E, M, the parents' dq and
  the weights; the output. "dkv": the window's q, the tile's k, v, the
  window's and the tile's counts, the window's dO, E and M, the parents' dk
  and dv, the weights; the two outputs. A product's operands in shared
  memory share one swizzle: q, k and dO of the dq, and every block of the
  dk, dv, are second operands both transposed and not, so they take the
  64-byte swizzle (steps of 32 rows) that the non-transposed use needs."""
  f32, rows, win = jax.numpy.float32, _ROWS, _ROWS + 2 * nr
  wide, narrow = _transforms(d, dtype), _transforms(d, dtype, most=64)
  blk = lambda r, t: ((r, d), dtype, t)
  vec = lambda r: ((r,), f32, ())
  cnt = lambda r: vec(r) if counts else None
  wts = lambda r: vec(r) if weights else None
  if kind == "forward":
    return ([blk(rows, wide), blk(win, wide), blk(win, narrow), cnt(win),
             cnt(rows), blk(rows // 2, narrow), vec(rows)],
            [blk(rows, wide), vec(rows)])
  if kind == "dq":
    return ([blk(rows, narrow), blk(win, narrow), blk(win, wide), cnt(win),
             cnt(rows), blk(rows, wide), vec(rows), vec(rows),
             blk(rows // 2, narrow), wts(rows)],
            [blk(rows, wide)])
  return ([blk(win, narrow), blk(rows, narrow), blk(rows, narrow),
           cnt(win), cnt(rows), blk(win, narrow), vec(win), vec(win),
           blk(rows // 2, narrow), blk(rows // 2, narrow), wts(rows)],
          [blk(rows, narrow), blk(rows, narrow)])


def _number(x):
  """A level kernel's counts or weights given as one value for every row
  (a number; the weights also "first"): that value; None for an array."""
  return x if isinstance(x, (int, float, str)) else None


def _fill(refs, like):
  """A kernel's ``refs`` laid out as ``like`` (its possible inputs or
  buffers): each in the place of an entry that is not None, None in the
  others (those taken as numbers)."""
  refs = iter(refs)
  return [None if x is None else next(refs) for x in like]


def _counts(c, zero_rows, name):
  """A kernel's counts (``coarsen``'s, a level kernel's) as a number
  (every row real, each of that many tokens: positive), or None for an
  array [B, n]; ``zero_rows`` needs the array (it finds rows of no real
  token by their counts)."""
  count = _number(c)
  if count is None:
    return None
  if isinstance(count, str) or not count > 0:
    raise ValueError(f"{name} takes the counts as an array or a positive "
                     f"number, got {count!r}.")
  if zero_rows:
    raise ValueError(f"{name} zeroes the rows of no real token by their "
                     "counts: with zero_rows, give the counts as an array.")
  return float(count)


def level_smem(kind, nr, d, dtype, stages):
  """Shared memory of a level program of ``kind`` ("forward", "dq",
  "dkv") at ``stages`` (bytes, at least what Mosaic GPU allocates), from
  its ``_buffers``."""
  nbytes = lambda shape, dt, _: _aligned(
      math.prod(shape) * jax.numpy.dtype(dt).itemsize)
  staged, outs = _buffers(kind, nr, d, dtype)
  return (stages * sum(nbytes(*x) for x in staged)
          + sum(nbytes(*x) for x in outs))


def _stages(smem):
  """Pipelining stages of a level kernel whose shared memory at S stages
  is ``smem(S)``: two where two programs still fit on an SM, else one (on
  an H200 at 65,536 tokens, the forward at blocks of 16 and 32 and
  head_dim 64 is 10-14% faster with two; at blocks of 64, and head_dim
  128, 25-35% faster with one: docs/benchmarks.md); 0 where even one does
  not fit in shared memory."""
  if smem(2) <= SMEM_BYTES // 2:
    return 2
  return 1 if smem(1) <= SMEM_BYTES else 0


def forward_level_stages(nr, d, dtype):
  """``forward_level``'s stages (``_stages``)."""
  return _stages(lambda s: level_smem("forward", nr, d, dtype, s))


def dq_level_stages(nr, d, dtype):
  """``dq_level``'s stages (``_stages``)."""
  return _stages(lambda s: level_smem("dq", nr, d, dtype, s))


def dkv_level_stages(nr, d, dtype):
  """``dkv_level``'s stages (``_stages``)."""
  return _stages(lambda s: level_smem("dkv", nr, d, dtype, s))


def _level_shape_problem(q, nr):
  """What a level kernel cannot tile in [B, n, H, D] inputs like ``q``
  (None if nothing): 16-bit inputs, blocks of 16, 32 or 64 rows, a length
  that is a multiple of 64 and holds a window."""
  n, win = q.shape[1], _ROWS + 2 * nr
  if jax.numpy.dtype(q.dtype).itemsize != 2 or nr not in (16, 32, 64):
    return (f"takes 16-bit inputs and blocks of 16, 32 or 64 rows, got "
            f"{q.dtype} and {nr}")
  if n % _ROWS or n < win:
    return (f"needs a length that is a multiple of {_ROWS} and at least "
            f"{win}, got {n}")
  return None


def level_unsupported(q, v, others, nr, stages):
  """Why the level kernels whose stage rules are ``stages`` (e.g.
  ``[forward_level_stages]``) cannot take these inputs (None if they
  can): q as ``_level_shape_problem`` wants it, ``others`` (k, the
  parent level's arrays, ...) of q's dtype, one head width (16 to 128)
  for q and v, and shared memory for at least one stage."""
  d = q.shape[-1]
  problem = _level_shape_problem(q, nr)
  if problem:
    return problem
  if any(x.dtype != q.dtype for x in others):
    return (f"takes one dtype, got {q.dtype} and "
            f"{sorted({str(x.dtype) for x in others})}")
  if v.shape[-1] != d or d not in (16, 32, 64, 128):
    return f"takes one head width of 16 to 128, got {d} and {v.shape[-1]}"
  if not all(rule(nr, d, q.dtype) for rule in stages):
    return "needs more shared memory than one stage has"
  return None


class _Level:
  """The tiling of the level kernels: tiles of ``_ROWS`` rows of a level's
  [B, n, H, D] arrays (queries for the forward and dq, keys for dk, dv),
  each with the window of ``_ROWS + 2 nr`` rows around it (the other side:
  keys or queries), ``stages`` of them in flight (TMA copies into shared
  memory). ``level``: 0 for the caller's arrays, l for the pyramid's level
  l (its rows weighted by their real-token counts).

  A launch has ``programs`` programs per (batch row, head), each taking
  ``per`` consecutive tiles of it (by default a power of two of them,
  at most 1,024 programs in all; a fixed number of programs in all, each
  taking every P-th tile of every head, was 19-24% slower on an H200:
  docs/benchmarks.md)."""

  def __init__(self, name, q, nr, stages, programs, interpret, level):
    b, n, h, _ = q.shape
    self.rows, self.win, self.nr, self.n = _ROWS, _ROWS + 2 * nr, nr, n
    self.level = level
    problem = _level_shape_problem(q, nr)
    if problem:
      raise ValueError(f"{name} {problem}.")
    steps = n // self.rows
    programs = programs or _programs(steps, b * h, most=1024)
    self.per = steps // programs
    self.stages = min(stages, self.per)
    self.grid = (programs, h, b)
    self.interpret = interpret

  def where(self, i):
    """(batch row, head, tile index) of this program's step ``i``."""
    return (lax.axis_index("b"), lax.axis_index("h"),
            lax.axis_index("p") * self.per + i)

  def window(self, i):
    """(tile index, first window row) of this program's step ``i``: the
    offset as a product (a clamped block index times nr), which is how
    Mosaic GPU proves a TMA offset a multiple of the shared-memory
    tiling."""
    rows, nr = self.rows, self.nr
    t = self.where(i)[2]
    at = jax.numpy.clip(t * (rows // nr) - 1, 0, (self.n - self.win) // nr)
    return t, at * nr

  def slices(self, i):
    """(tile rows, window rows, parent rows) of step ``i``."""
    t, at = self.window(i)
    return (pl.ds(t * self.rows, self.rows), pl.ds(at, self.win),
            pl.ds(t * (self.rows // 2), self.rows // 2))

  def band(self, i, counts, causal, tile_queries=True):
    """bool [rows, win]: the pairs of a tile row and a window row that
    the level lets meet (``kernels._allowed``; level 0: blocks at most one
    apart, causal the key's block one before the query's or the same block
    and the key not after the query; coarser: the neighbour blocks minus
    the quarters a finer level covers), from the offsets (tile and window
    start at multiples of nr: row numbers from the tile's first row keep
    the blocks' boundaries), where the window row has a real token
    (``counts`` [win]; None: every row has). ``tile_queries``: the tile's
    rows are the queries (else the keys)."""
    t, at = self.window(i)
    shape, wg = (self.rows, self.win), plgpu.Layout.WGMMA
    tile = _iota(shape, 0, wg, self.interpret)
    other = _iota(shape, 1, wg, self.interpret) + (at - t * self.rows)
    qi, kj = (tile, other) if tile_queries else (other, tile)
    near = _allowed(qi, kj, None, self.nr, self.level == 0, causal)
    if counts is None:
      return near
    return near & (lax.broadcast_in_dim(counts, shape, [1]) > 0)

  def parent_rows(self, parents):
    """float32 [rows, D]: each tile row's parent, row r // 2 of the
    ``rows / 2`` parent rows in shared memory, by a product with the 0/1
    matrix R[r, j] = (r // 2 == j) (exact)."""
    shape, wg = (self.rows, self.rows // 2), plgpu.Layout.WGMMA
    repeat = ((_iota(shape, 0, wg, self.interpret) >> 1)
              == _iota(shape, 1, wg, self.interpret))
    return _matmul(repeat.astype(parents.dtype), parents, False,
                   self.interpret)

  def weights(self, w_s, weight, shape):
    """Each tile row's share of its parent, for products with [rows, D]
    arrays of ``shape``: float32 ``shape`` from the weights ``w_s`` [rows]
    in shared memory, or from ``weight`` where they are None: a number
    (every row's) or "first" (1 on each pair's first row, 0 on the
    second; a tile starts at an even row)."""
    wg = plgpu.Layout.WGMMA
    if w_s is not None:
      return lax.broadcast_in_dim(
          _load(w_s, wg.reduce(1), self.interpret), shape, [0])
    if weight == "first":
      r = _iota(shape, 0, wg, self.interpret)
      return ((r >> 1) * 2 == r).astype(jax.numpy.float32)
    return weight

  @staticmethod
  def copy_in(copies, slot, bar):
    """Starts the copies of a step: each (memory ref, index, staged
    buffer) of ``copies`` (``ref.at[index]``) into the buffer's ``slot``,
    arriving on ``bar.at[slot]``; those of a ref that is None (taken as a
    number) skipped."""
    for src, at, dst in copies:
      if src is not None:
        plgpu.copy_gmem_to_smem(src.at[at], dst.at[slot], bar.at[slot])

  def store(self, i, outs):
    """Writes step ``i``'s results: each (value, output buffer, output in
    memory) into its buffer, once the last step's stores have read them,
    then copies the buffers to the tile's rows of the outputs ([B, n, H,
    D] arrays, or [B, H, n] per-row values)."""
    bi, hi, _ = self.where(i)
    own = self.slices(i)[0]
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's
    for value, buf, _ in outs:
      buf[...] = value.astype(buf.dtype)
    plgpu.commit_smem()
    for _, buf, out in outs:
      at = (bi, own, hi) if len(out.shape) == 4 else (bi, hi, own)
      plgpu.copy_smem_to_gmem(buf, out.at[at])

  def zero_rows(self, pairs):
    """Zeroes, in shared memory, the rows of each (block [R, D], counts [R])
    pair whose count is 0 (no real token), where a mask may have left
    NaN or inf that a zero weight would carry into a product. In pieces of
    64 rows (the tensor-core layout's), the last ending at row R (it
    overlaps the one before where R is not a multiple of 64; the shared
    rows get the same value from both), each piece skipped where all its
    rows are real; then a fence makes the writes visible to the tensor
    cores."""
    jnp = jax.numpy
    wg, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
    for block, counts in pairs:
      r = block.shape[0]
      for at in sorted({*range(0, r - _ROWS + 1, _ROWS), r - _ROWS}):
        piece = block.at[pl.ds(at, _ROWS)]
        real = _load(counts.at[pl.ds(at, _ROWS)], row, self.interpret) > 0
        some_pad = jnp.min(real.astype(jnp.int32)) == 0

        @pl.when(some_pad)
        def _(piece=piece, real=real):
          x = _load(piece, wg, self.interpret)
          piece[...] = jnp.where(lax.broadcast_in_dim(real, x.shape, [0]), x,
                                 jnp.zeros_like(x))
    plgpu.commit_smem()

  def scratch(self, staged, outs):
    """The kernel's shared memory: ``staged`` buffers (shape, dtype,
    transforms; None: none), each with one copy per step (``copy_in``) and
    a slot per stage; ``outs`` output buffers (the same, one slot); the
    barrier of each slot, waiting for as many copies as there are staged
    buffers."""
    smem = lambda shape, dtype, transforms: plgpu.SMEM(
        shape, dtype, transforms=transforms)
    staged = [x for x in staged if x is not None]
    return ([smem((self.stages, *shape), dtype, t)
             for shape, dtype, t in staged]
            + [smem(*out) for out in outs]
            + [plgpu.Barrier(num_arrivals=len(staged),
                             num_barriers=self.stages)])

  def run(self, bar, issue, step):
    """The pipeline: ``issue(i, slot)`` starts step i's copies into
    ``slot`` (arriving on ``bar.at[slot]``); each step waits for its slot,
    runs ``step(i, slot)`` and refills the slot with step i + stages; at
    the end, the last stores to memory are waited for."""
    for i in range(self.stages):
      issue(i, i)

    @pl.loop(0, self.per)
    def _(i):
      slot = i % self.stages
      plgpu.barrier_wait(bar.at[slot])
      step(i, slot)

      @pl.when(i + self.stages < self.per)
      def _():
        issue(i + self.stages, slot)

    plgpu.wait_smem_to_gmem(0)

  def call(self, body, name, out_shape, scratch, *args):
    body.__name__ = name  # the kernel's name in profiles
    return kernel(body, out_shape=out_shape, scratch=scratch,
                  grid=self.grid, grid_names=("p", "h", "b"),
                  interpret=self.interpret)(*args)


def forward_level(q, k, v, c, po, plse, *, nr, scale, causal=False,
                  level=0, stages=2, programs=None, zero_rows=False,
                  interpret=False):
  """A level of the forward in Mosaic GPU: ``kernels._fwd_rows`` (``causal``
  or not; no dropout) of ``level`` (0: the caller's q, k, v; l >= 1: the
  pyramid's level l), with the level's real-token counts c [B, n] (each
  key's weight; or a number, every row's count, where every row is real: no
  counts are read, ``kernels.Uniform``), the parent level's normalised
  output ``po`` [B, n/2, H, D] and lse ``plse`` [B, H, n/2]. Returns (o [B,
  n, H, D] in q's dtype; lse [B, H, n]); at level 0, o is zero on rows that
  are not real (a coarse level keeps what those rows compute, as the Triton
  kernel). ``zero_rows``: v's rows of no real token are zeroed in shared
  memory (``_Level.zero_rows``; else v must hold zeros or finite values
  there).

  A program loops over tiles of 64 query rows (a tensor-core product's
  least), each with the window of 64 + 2 nr keys around it (TMA, ``stages``
  tiles ahead): 2x the logits of the band at blocks of 16. A row's parent
  is row i // 2 of the tile's 32 parent rows: a product with a 0/1 matrix
  repeats them (exact); the parent lse comes repeated from XLA (4 bytes a
  row).
  """
  jnp = jax.numpy
  f32 = jnp.float32
  b, n, h, d = q.shape
  t0 = _Level("forward_level", q, nr, stages, programs, interpret, level)
  count = _counts(c, zero_rows, "forward_level")
  plse2 = jnp.repeat(plse.astype(f32), 2, axis=-1)  # [B, H, n]
  row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
  ins = [q, k, v, None if count else c.astype(f32), po, plse2]
  present = [x for x in ins if x is not None]
  staged, outs = _buffers("forward", nr, d, q.dtype, counts=not count)

  def body(*refs):
    q_g, k_g, v_g, c_g, po_g, pl_g = _fill(refs[:len(present)], ins)
    o_g, lse_g = refs[len(present):len(present) + 2]
    q_s, k_s, v_s, ck_s, cq_s, po_s, pl_s = _fill(
        refs[len(present) + 2:-3], staged)
    o_s, lse_s, bar = refs[-3:]

    def issue(i, slot):
      bi, hi, _ = t0.where(i)
      own, keys, parents = t0.slices(i)
      t0.copy_in(((q_g, (bi, own, hi), q_s), (k_g, (bi, keys, hi), k_s),
                  (v_g, (bi, keys, hi), v_s), (c_g, (bi, keys), ck_s),
                  (c_g, (bi, own), cq_s), (po_g, (bi, parents, hi), po_s),
                  (pl_g, (bi, hi, own), pl_s)), slot, bar)

    def step(i, slot):
      if zero_rows:
        t0.zero_rows([(v_s.at[slot], ck_s.at[slot])])
      ck = None if count else _load(ck_s.at[slot], col, interpret)
      ok = t0.band(i, ck, causal)
      x = _matmul(q_s.at[slot], k_s.at[slot], True, interpret) * scale
      real_q = None  # Every row real where the counts are a number.
      if level == 0 and not count:
        # A query row that is not real is a row of zeros (as ``_zeroed``
        # makes it for the Triton kernels): its logits are 0. (A coarse
        # level's such rows are zeros already.)
        real_q = _load(cq_s.at[slot], row, interpret) > 0
        x = jnp.where(lax.broadcast_in_dim(real_q, x.shape, [0]), x, 0.0)
      x = jnp.where(ok, x, _NO_KEY)
      m = jnp.max(x, axis=1)
      p = jnp.where(ok, jnp.exp(x - lax.broadcast_in_dim(m, x.shape, [0])),
                    0.0)
      if level:  # Each key weighs its count (level 0's are 0/1: ``ok``).
        p = p * (count or lax.broadcast_in_dim(ck, p.shape, [1]))
      z = jnp.sum(p, axis=1)
      y = _matmul(p.astype(v.dtype), v_s.at[slot], False, interpret)
      parent = t0.parent_rows(po_s.at[slot])
      pm = _load(pl_s.at[slot], row, interpret)
      big = jnp.maximum(m, pm)
      a = jnp.exp(m - big)
      w = jnp.where(pm > 0.5 * _NO_KEY, jnp.exp(pm - big), 0.0)
      z = z * a + w
      y = (y * lax.broadcast_in_dim(a, y.shape, [0])
           + parent * lax.broadcast_in_dim(w, y.shape, [0]))
      has = z > 0
      zs = jnp.where(has, z, 1.0)
      keep = (has if real_q is None else real_q & has).astype(f32) / zs
      t0.store(i, ((y * lax.broadcast_in_dim(keep, y.shape, [0]), o_s, o_g),
                   (jnp.where(has, big + jnp.log(zs), _NO_KEY), lse_s,
                    lse_g)))

    t0.run(bar, issue, step)

  out_type = [jax.ShapeDtypeStruct((b, n, h, d), q.dtype),
              jax.ShapeDtypeStruct((b, h, n), f32)]
  return t0.call(body, f"hattn_fwd_l{level}_mosaic", out_type,
                 t0.scratch(staged, outs), *present)


def dq_level(q, k, v, c, g, e, m, pdq, w, *, nr, scale, causal=False,
             level=0, stages=2, programs=None, zero_rows=False,
             interpret=False):
  """A level's dq in Mosaic GPU: ``kernels._dq_rows`` (``causal`` or not)
  without dropout, on the tiles and key windows of ``forward_level``
  (``level`` as there).

  q, k, v [B, n, H, D] (16-bit; k zero on rows that are not real where a
  mask may leave garbage there, as ``kernels._forward_level_mosaic`` does
  for v, or ``zero_rows`` to zero them in shared memory), counts c [B, n]
  (or a number, as ``forward_level``'s), the output cotangent g [B, n, H,
  D], E = dO . O and M = lse [B, H, n] (``kernels._row_stats``), the
  parent level's dq ``pdq`` [B, n/2, H, D] and the prolongation weights
  ``w`` [B, n] (a row's share of its parent, ``kernels._prolong_weight``
  of the queries' mode; or a number, every row's, or "first": 1 on each
  pair's first row, 0 on the second, ``_Level.weights``). Returns dq [B,
  n, H, D] in q's dtype, at level 0 zero on rows that are not real.

  Per tile: s = q k^T and dp = g v^T over the window (the band's keys
  kept), ds = p (dp - E), dq = scale ds k + w (R pdq) with R the 0/1
  matrix that repeats parent rows (exact). k serves as the second operand
  both transposed and not, so it takes the 64-byte swizzle (steps of 32
  keys) that the non-transposed use needs.
  """
  f32 = jax.numpy.float32
  b, n, h, d = q.shape
  t0 = _Level("dq_level", q, nr, stages, programs, interpret, level)
  count = _counts(c, zero_rows, "dq_level")
  weight = _number(w)
  ins = [q, k, v, None if count else c.astype(f32), g, e, m, pdq,
         None if weight is not None else w.astype(f32)]
  present = [x for x in ins if x is not None]
  staged, outs = _buffers("dq", nr, d, q.dtype, counts=not count,
                          weights=weight is None)

  def body(*refs):
    gmems = _fill(refs[:len(present)], ins)
    o_g, (o_s, bar) = refs[len(present)], refs[-2:]
    smems = _fill(refs[len(present) + 1:-2], staged)

    def issue(i, slot):
      t0.copy_in(_dq_copies(t0, i, gmems, smems), slot, bar)

    def step(i, slot):
      here = [None if x is None else x.at[slot] for x in smems]
      if zero_rows:  # the window's k, by the window's counts
        t0.zero_rows([(here[1], here[3])])
      dq = _dq_tile(t0, i, here, scale=scale, causal=causal, count=count,
                    weight=weight)
      t0.store(i, ((dq, o_s, o_g),))

    t0.run(bar, issue, step)

  return t0.call(body, f"hattn_dq_l{level}_mosaic",
                 jax.ShapeDtypeStruct((b, n, h, d), q.dtype),
                 t0.scratch(staged, outs), *present)


def dkv_level(q, k, v, c, g, e, m, pdk, pdv, w, *, nr, scale,
              causal=False, level=0, stages=2, programs=None,
              zero_rows=False, interpret=False):
  """A level's dk, dv in Mosaic GPU: ``kernels._dkv_rows`` (``causal`` or
  not) without dropout (``level`` as ``forward_level``'s). A program's
  tile is 64 key rows, its window the 64 + 2 nr query rows around them (as
  ``forward_level``'s keys).

  Inputs as ``dq_level``'s (q and g zero on rows that are not real where
  a mask may leave garbage there, or ``zero_rows``), with the parent
  level's dk, dv ``pdk``, ``pdv`` [B, n/2, H, D] in place of its dq.
  Returns (dk, dv) [B, n, H, D] in k's and v's dtype, at level 0 zero on
  rows that are not real.

  Per tile: s^T = k q^T and dp^T = v g^T over the window, p^T and ds^T as
  in the dq, dv = p^T g, dk = scale ds^T q, plus each parent's share (R
  repeats parent rows). Every operand in shared memory takes the 64-byte
  swizzle: q and g are second operands both transposed and not.
  """
  f32 = jax.numpy.float32
  b, n, h, d = q.shape
  t0 = _Level("dkv_level", q, nr, stages, programs, interpret, level)
  count = _counts(c, zero_rows, "dkv_level")
  weight = _number(w)
  ins = [q, k, v, None if count else c.astype(f32), g, e, m, pdk, pdv,
         None if weight is not None else w.astype(f32)]
  present = [x for x in ins if x is not None]
  staged, outs = _buffers("dkv", nr, d, q.dtype, counts=not count,
                          weights=weight is None)

  def body(*refs):
    gmems = _fill(refs[:len(present)], ins)
    out_g = refs[len(present):len(present) + 2]
    smems = _fill(refs[len(present) + 2:-3], staged)
    dk_s, dv_s, bar = refs[-3:]

    def issue(i, slot):
      t0.copy_in(_dkv_copies(t0, i, gmems, smems), slot, bar)

    def step(i, slot):
      here = [None if x is None else x.at[slot] for x in smems]
      if zero_rows:  # the window's q and dO, by the window's counts
        t0.zero_rows([(here[0], here[3]), (here[5], here[3])])
      dk, dv = _dkv_tile(t0, i, here, scale=scale, causal=causal,
                         count=count, weight=weight)
      t0.store(i, ((dk, dk_s, out_g[0]), (dv, dv_s, out_g[1])))

    t0.run(bar, issue, step)

  out = [jax.ShapeDtypeStruct((b, n, h, d), k.dtype),
         jax.ShapeDtypeStruct((b, n, h, d), v.dtype)]
  return t0.call(body, f"hattn_dkv_l{level}_mosaic", out,
                 t0.scratch(staged, outs), *present)


def _dq_copies(t0, i, gmems, smems):
  """(memory ref, index, shared-memory buffer) of step ``i`` of the dq
  (``_Level.copy_in``): from q, k, v, counts, dO, E, M, the parents' dq
  and the weights in memory, the buffers ``_dq_tile`` reads."""
  q, k, v, c, g, e, m, p, w = gmems
  bi, hi, _ = t0.where(i)
  own, keys, parents = t0.slices(i)
  return list(zip((q, k, v, c, c, g, e, m, p, w),
                  ((bi, own, hi), (bi, keys, hi), (bi, keys, hi),
                   (bi, keys), (bi, own), (bi, own, hi), (bi, hi, own),
                   (bi, hi, own), (bi, parents, hi), (bi, own)), smems))


def _dkv_copies(t0, i, gmems, smems):
  """The same for the dk, dv (``_dkv_tile``): from q, k, v, counts, dO,
  E, M, the parents' dk and dv and the weights in memory."""
  q, k, v, c, g, e, m, pk, pv, w = gmems
  bi, hi, _ = t0.where(i)
  own, qs, parents = t0.slices(i)
  return list(zip((q, k, v, c, c, g, e, m, pk, pv, w),
                  ((bi, qs, hi), (bi, own, hi), (bi, own, hi), (bi, qs),
                   (bi, own), (bi, qs, hi), (bi, hi, qs), (bi, hi, qs),
                   (bi, parents, hi), (bi, parents, hi), (bi, own)), smems))


def _dq_tile(t0, i, refs, *, scale, causal, count=None, weight=None):
  """float32 dq [rows, D] of step ``i``'s tile of queries (``dq_level``)
  from its shared-memory blocks: q, the window's k, v and counts, the
  tile's counts, dO, E, M, the parents' dq and the weights (the counts
  None where they are ``count``, the weights where they are ``weight``:
  ``dq_level``'s numbers)."""
  jnp = jax.numpy
  q_s, k_s, v_s, ck_s, cq_s, g_s, e_s, m_s, p_s, w_s = refs
  rows, win, level, interpret = t0.rows, t0.win, t0.level, t0.interpret
  row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
  ck = None if count else _load(ck_s, col, interpret)
  ok = t0.band(i, ck, causal)
  bcast = lambda x: lax.broadcast_in_dim(x, (rows, win), [0])
  s = _matmul(q_s, k_s, True, interpret) * scale
  mrow = _load(m_s, row, interpret)
  p = jnp.where(ok, jnp.exp(jnp.minimum(s - bcast(mrow), 0.0)), 0.0)
  if level:  # The keys' counts (level 0's: ``ok``).
    p = p * (count or lax.broadcast_in_dim(ck, p.shape, [1]))
  dp = _matmul(g_s, v_s, True, interpret)
  erow = _load(e_s, row, interpret)
  # Selected, not multiplied: dp may be NaN where v is garbage.
  ds = jnp.where(ok, p * (dp - bcast(erow)), 0.0)
  dq = _matmul(ds.astype(k_s.dtype), k_s, False, interpret)
  parent = t0.parent_rows(p_s)
  dq = dq * scale + t0.weights(w_s, weight, dq.shape) * parent
  if level == 0 and not count:
    real_q = lax.broadcast_in_dim(_load(cq_s, row, interpret),
                                  dq.shape, [0]) > 0
    dq = jnp.where(real_q, dq, 0.0)
  return dq


def _dkv_tile(t0, i, refs, *, scale, causal, count=None, weight=None):
  """float32 (dk, dv) [rows, D] of step ``i``'s tile of keys
  (``dkv_level``) from its shared-memory blocks: the window's q, the
  tile's k, v, the window's and the tile's counts, the window's dO, E and
  M, the parents' dk and dv, the weights (None where they are numbers, as
  ``_dq_tile``'s)."""
  jnp = jax.numpy
  q_s, k_s, v_s, cq_s, ck_s, g_s, e_s, m_s, pk_s, pv_s, w_s = refs
  rows, win, level, interpret = t0.rows, t0.win, t0.level, t0.interpret
  row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
  ok = t0.band(i, None if count else _load(cq_s, col, interpret), causal,
               tile_queries=False)
  bcast = lambda x: lax.broadcast_in_dim(x, (rows, win), [1])
  st = _matmul(k_s, q_s, True, interpret) * scale
  mcol = _load(m_s, col, interpret)
  p = jnp.where(ok, jnp.exp(jnp.minimum(st - bcast(mcol), 0.0)), 0.0)
  ck = None if count else _load(ck_s, row, interpret)
  if level:  # The keys' counts (level 0 zeroes its own below).
    p = p * (count or lax.broadcast_in_dim(ck, p.shape, [0]))
  dv = _matmul(p.astype(g_s.dtype), g_s, False, interpret)
  dp = _matmul(v_s, g_s, True, interpret)
  ecol = _load(e_s, col, interpret)
  ds = jnp.where(ok, p * (dp - bcast(ecol)), 0.0)
  dk = _matmul(ds.astype(q_s.dtype), q_s, False, interpret)
  wrow = t0.weights(w_s, weight, dk.shape)
  dk = dk * scale + wrow * t0.parent_rows(pk_s)
  dv = dv + wrow * t0.parent_rows(pv_s)
  if level == 0 and not count:
    real_k = lax.broadcast_in_dim(ck, dk.shape, [0]) > 0
    dk, dv = (jnp.where(real_k, x, 0.0) for x in (dk, dv))
  return dk, dv


def _iota(shape, axis, layout, interpret):
  """int32 indices along ``axis`` of ``shape``, in ``layout`` on a GPU."""
  if interpret:
    return lax.broadcasted_iota(jax.numpy.int32, shape, axis)
  return plgpu.broadcasted_iota(jax.numpy.int32, shape, axis, layout=layout)


def _matmul(a, b_ref, transpose_b, interpret):
  """float32 ``a @ b`` (``a @ b.T`` with ``transpose_b``) on the tensor
  cores (``a`` a shared-memory ref or registers, ``b_ref`` shared memory).
  Interpret mode, whose ``wgmma`` takes neither a transposed ref nor
  registers, multiplies the loaded arrays."""
  jnp = jax.numpy
  if interpret:
    a = a if isinstance(a, jax.Array) else a[...]
    b = b_ref[...]
    return jnp.dot(a, b.T if transpose_b else b,
                   preferred_element_type=jnp.float32)
  b = b_ref.transpose((1, 0)) if transpose_b else b_ref
  shape = (a.shape[0], b.shape[1])

  def product(acc):
    plgpu.wgmma(acc, a, b)
    return acc[...]

  return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
