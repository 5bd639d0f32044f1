"""Fused hierarchical attention: Pallas kernels (Triton on GPU) with a VJP.

Same contract as ``hierarchical.py`` (``docs/h_attention.md``); the output
equals the dense definition. Where the plain path writes every level's
logits to memory, here each level is one kernel that reads its queries, keys
and values once, keeps logits and probabilities on chip, and merges the
coarser levels' result into its own:

Forward, per level from the coarsest to the finest (one launch each, or
several levels per launch, below):
  a program owns ``tile`` query rows of the level (default one block of
  16) and reads the key rows ``[start - Nr, start + tile + Nr)`` (one
  neighbour block on each side, and its own rows unless it is a coarse
  level's single block, which never sees itself), one piece at a time:
  forms the logits with the level's block structure as a mask (for a
  tile of whole blocks, from each piece's offset to the tile:
  ``_piece_allowed``; level 0's pieces in a loop: ``_over_pieces``), weights
  each key's probability by its real-token count and folds them in with a
  running max; then merges the parent level's normalised output and
  log-normaliser (each coarse row repeated for its two children). The
  finest level writes the output; every level writes its row
  log-normaliser.

Backward (flash-attention style, no logits stored): with ``lse`` the final
log-normaliser of each row, a coarse logit ``s[r, j]`` (row ``r`` stands for
the fine rows ``i`` of its group) has gradient
``c_j exp(s - M_r) (G_r . v_j - E_r)`` where ``M_r = min_i lse_i``,
``G_r = sum_i exp(M_r - lse_i) dO_i`` and ``E_r = sum_i exp(M_r - lse_i)
(dO_i . O_i)``. ``(M, G, E)`` are restricted fine to coarse once; then each
level runs one kernel for dq (per query tile) and one for dk, dv (per key
tile), each adding the parent level's gradient (the backward of the mean or
first-token coarsening) to its own, coarse to fine. At level 0, one kernel
can do both (``_sweep_backward``; the default on Hopper GPUs at blocks of
32 and 64, head_dim 64, not causal): a program walks consecutive key
blocks and forms each pair of blocks once, keeping the query blocks' dq
sums in registers until their last key block has passed; coarse levels
can take it too (``sweep_levels``: by default level 1 at blocks of 16,
head_dim 64 and 128, and levels 1 and 2 at blocks of 64, head_dim 64, not
causal, on the same GPUs). (Other single
kernels were slower: one per tile for all three, reading the tile's own
rows once, was no faster on an H200,
nor, at tiles of one block, one pass over the neighbour pieces computing
all three from each piece's rows, loaded once: 1.91 against 1.68 ms
forward+backward at 65,536 tokens, docs/benchmarks.md.) Nothing is bigger
than O(L) and every exponent is <= 0. A coarse level hands its normalised
output (forward) and its dq, dk, dv (backward) to the next finer level in
the inputs' dtype (``TUNING["handover_dtype"]``).

The pyramid of coarse queries, keys and values, and the restriction of
(M, G, E), are kernels too: one program reduces 64 rows through six levels.
The first restriction also forms level 0's E and M from dO, O and lse, so
that dO is read once.
The pyramid forms each level's sums as one product of a weight matrix with
the program's rows (tensor cores; 0.19 against 0.29 ms for pair sums in
registers at 65,536 tokens on an H200, docs/benchmarks.md).
Without a mask, at a length that needs no padding, every level's counts
are known when tracing (``Uniform``): no count array is made, the kernels
read them as constants (the Mosaic GPU level kernels the backward's
prolongation weights too), and no XLA operation runs between the
kernels, forward or backward (each was a small launch of its own).

Levels per launch (``TUNING["levels_per_launch"]``, default 1): with ``g >
1`` one launch computes ``g`` consecutive levels, each program the rows of
its tile at the finest of them and of their ancestors (``t``, ``t/2``, ...
rows, coarse to fine), handing each level's state to the next in registers
instead of through memory; forward, dq and dk/dv alike. Same values (the
tests run both schedules), but slower on an H100 (1.06 against 0.81 ms
forward at 65,536 tokens with 3 levels per launch: each coarse row is
recomputed by every descendant tile; docs/benchmarks.md), so the default
stays 1 (``scripts/profile_kernels.py --tiles 64 --per_launch 1 3`` to
time it; a level's tile keeps at least 16 rows and one block, so tiles of
16 always run one level per launch).
The coarse tail (``TUNING["tail_rows"]``, ``_tail_first``): the smallest
levels' launches are a fraction of a wave each and cost one program's
latency, so those levels run as one launch per pass, each level without
its parent, and a merge kernel per pass then gives the tail's finest
level what the chain gives it (outputs merged by their log-normalisers,
gradients times the chained coarsening weights). At 1 x 65,536 tokens on
an H200: forward+backward 1.185 against 1.219 ms at blocks of 16, 1.597
against 1.630 at blocks of 64. (The same merge in XLA instead of kernels
was at best 3% faster, and slower at 4,096 tokens: docs/benchmarks.md.)
Nor were forward and backward schedules that computed levels 0 .. a of a
tile of fine rows in one launch, their coarse queries, keys and cotangent
statistics formed in the program from the fine rows (a neighbour block's
worth on each side), the coarser levels by the level kernels: about half
the bytes moved, but each tile rebuilds its neighbours' coarse rows,
which the pyramid builds once (forward 0.68 against 0.54 ms and
forward+backward 2.35 against 1.67 ms at 65,536 tokens on an H200, tiles
of 32 rows; slower at every setting measured, docs/benchmarks.md).
Nor were launches that computed levels 0 .. a of a tile block by block
from the pyramid, forward and backward, handing each block's state to its
children in registers (forward+backward 1.87 against 1.25 ms at 1 x
65,536 tokens on an H100: a program ran its blocks one after another at
lower occupancy; removed after df204ab, docs/benchmarks.md).

Attention dropout (``dropout_rate > 0``): every level kernel gets its
(batch row, head) seed and recomputes, from a weight's level, row and key,
whether ``dropout.py`` drops it: the forward thins the numerator's weights
(not the normaliser's), dq and dk, dv use ``p (D dp - E)`` for the logits'
gradient and the thinned weights for dv (E = dO . O already holds them).
No mask is stored; about 10% more forward+backward time.

Requirements for the kernels (``unsupported_reason``): block_size a power
of two >= 16 and floating inputs of at most 32 bits. The kernels work on
head dims that are powers of two >= 16 (``kernel_head_dim``); narrower or
other head dims are zero-padded to that width on the way in (no logit
changes, the softmax scale stays 1/sqrt(head_dim)) and the output sliced.
Products take 16-bit operands as they come and float32 operands at full
float32 precision (no TF32); accumulation is float32.
``interpret=True`` runs the same kernels in Pallas interpret mode (CPU).

Precision: a level hands the next finer one, and the forward hands the
backward, each row's log-normaliser ``lse = max + log(sum)`` as one
float32 (as flash attention does), where the plain path keeps max and sum
apart. Its rounding, about ``|lse| * 6e-8``, becomes a relative error of
the weights: negligible for the logits of trained models (1e-5 at logits
of 100), 1e-4 at about 1,500, and the weights are lost altogether at
logits beyond about 1e7 (measured in interpret mode: rows of logits near
-2.5e19 are off by 0.12, where ``implementation="xla"`` is exact).
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import sys
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from htransformer.attention import dropout as dropout_lib
from htransformer.attention import hierarchical

# Row max / log-normaliser of a row that sees no key (finite, so that
# exp(a - b) never meets inf - inf).
_NO_KEY = -1e30
# M of a row that takes no gradient (padding): exp(s - M) is 0.
_NO_ROW = 1e30
# Query rows per program (one block at block_size 16: fwd+bwd 1.85 against
# 2.00 ms for tiles of 64 at 65,536 tokens on an H200; by default at least
# block_size, ``default_tile``: fewer rows than a block of 64 are slower).
DEFAULT_TILE = 16
# Launch settings (read when a function is traced; for tuning): Triton
# warps per program (None: one per 16 rows of 64 elements, at most 4), the
# pyramid and restriction kernels' (``pyramid_warps``; None: one per 64
# rows of 64 elements, at most 4), pipelining stages, and how many
# consecutive levels one launch computes (see _level_groups).
# ``coarsen_heads``: heads per program of the pyramid kernel (1: one head's
# [64, D] block; h: a [64, h*D] block, rows of h*D contiguous elements);
# ``coarsen_rows``: its rows per program (at least 2**levels of the pass:
# 64 for six levels; more gives fewer, larger programs);
# ``coarsen_impl``: "dot" (that kernel, each level's sums as one product
# with a weight matrix), "pallas" (the kernel with pair sums in registers),
# "xla" (XLA reductions, level by level), "mosaic" (Mosaic GPU passes of
# two levels, ``mosaic.coarsen``: TMA reads of strided blocks, the levels
# elementwise; Hopper GPUs and newer; levels of fewer than 256 rows go to
# the "dot" kernel) or "auto" (the default: "mosaic" where it compiles,
# else "dot"; on an H200 the forward 4% faster at 1 x 65,536 tokens, 10%
# causal with a mask, level at 64 x 1,024: docs/benchmarks.md).
# ``pyramid_pass``: levels per Mosaic GPU pass, 3 (the default, where the
# length and shared memory allow: 16-bit rows of 64 with one output slot;
# each pass then reads the level it starts from once for three levels,
# about 14% less read at 1 x 65,536 tokens) or 2. On an H200 at blocks of
# 16, 1 x 65,536 tokens, the forward took 0.383 ms against 0.392 with
# passes of two, forward+backward 1.063 against 1.070 (docs/benchmarks.md).
# ``pyramid_stages``: how many steps a pass loads ahead (2, the default;
# each stage holds a step's input blocks in shared memory, so where more
# do not fit with one output slot, the pass takes fewer levels or the
# "dot" kernel; not yet timed).
# ``forward_l0_impl``: the finest level's forward, "triton" (the level
# kernel above), "mosaic" (``mosaic.forward_level``, Hopper GPUs and
# newer: no dropout, 16-bit inputs; elsewhere the Triton kernel) or "auto"
# (the default: "mosaic" on such GPUs at the block sizes and head widths
# of ``MOSAIC_L0_FASTER["forward"]``, causal of
# ``MOSAIC_L0_FASTER_CAUSAL["forward"]``; "triton" elsewhere).
# ``backward_l0_impl``: the finest level's dq and dk, dv, "triton",
# "mosaic" (``mosaic.dq_level`` and ``dkv_level``, where the forward's
# Mosaic GPU kernel would apply), "sweep" (one Triton kernel whose
# programs each walk ``sweep_blocks`` consecutive key blocks and form
# each pair of blocks once: ``_sweep_backward``) or "auto" (the default,
# as the forward's "auto" with ``MOSAIC_L0_FASTER["backward"]``, and
# "sweep" at ``SWEEP_L0_FASTER``). ``sweep_blocks``: key blocks per
# program of the sweep (16, the default: 1.540 ms forward+backward
# against 1.560 for 8 and 1.596 for 4 at blocks of 64; H200, 1 x 65,536
# tokens, docs/benchmarks.md). ``sweep_levels``: levels 1 .. this one
# (those not in the coarse tail, at one level per launch) take the sweep
# too (0: none), or None (the default: ``sweep_levels()``, by
# ``SWEEP_COARSE_LEVELS``: level 1 at blocks of 16 with head_dim 64 and
# 128, levels 1 and 2 at blocks of 64 with head_dim 64; none elsewhere).
# ``sweep_programs``: where a level's sweep would launch fewer programs
# than this, its runs are halved until it does not (down to one key
# block; 0: never). 256, the default: level 2
# at blocks of 64 and 1 x 65,536 tokens, heads 8, then runs 8 key blocks
# per program, 256 programs for the H200's 132 SMs, and took 0.095 ms
# against 0.139 in runs of 16 (128 programs); the levels before it
# launch 256 programs or more there (docs/benchmarks.md).
# ``mosaic_levels``: how many of the finest levels take the Mosaic GPU
# kernels where those two choose them (1, the default: level 0 only; the
# coarser levels' Mosaic GPU kernels, the same kernels with each key
# weighted by its count, are slower than the Triton ones: forward+backward
# 1.238 ms at 1, 1.279 at 4, 1.317 at 10 levels, H200, blocks of 16,
# head_dim 64, 1 x 65,536 tokens; docs/benchmarks.md). Levels too short
# for their tiles (``mosaic.level_unsupported``) keep the Triton kernels.
# ``mosaic_zero_rows``: at level 0 with a mask, where the rows of no real
# token of the arrays whose zero weights the Mosaic GPU level kernels
# multiply (v forward; q, k, dO backward) are zeroed: "kernel" (the
# default: in shared memory, by each program on its tiles, no pass over
# memory) or "xla" (one XLA pass over each array first; forward+backward
# with a mask 1.344 against 1.276 ms for "kernel", causal 1.299 against
# 1.230, head_dim 128 2.713 against 2.514; H200, blocks of 16, 1 x 65,536
# tokens: docs/benchmarks.md).
# The level kernels' dq, dk and dv in one Mosaic GPU kernel (each array
# read once) was slower, 0.442 ms against 0.182 + 0.107 for the two; so
# was spreading their tiles over one wave of programs (each taking every
# N-th tile), dk, dv 0.219 and dq 0.133 ms at N = 396 (H200, blocks of
# 16, 1 x 65,536 tokens: docs/benchmarks.md). Neither is kept.
# ``handover_dtype``: what a coarse level hands to the next finer one (its
# normalised output forward; its dq, dk, dv backward): "input" (the
# inputs' dtype: half the bytes of float32 for 16-bit inputs, one more
# rounding per level; 6% faster forward+backward at 65,536 tokens on an
# H200) or "float32".
# Every call of the kernels checks these (``check_tuning``).
# ``dq_warps`` / ``dkv_warps``: the dq and the dk, dv kernels' warps (None:
# as the level kernels).
# ``grid_order``: which program index varies fastest in a launch (the
# order the GPU starts programs in): "tiles" (a head's consecutive tiles
# side by side) or "heads" (the heads of one tile side by side, so that
# programs started together read whole rows of the [B, L, H, D] arrays;
# on an H200 2% faster forward+backward at 1 x 65,536 tokens, 1.5% slower
# at 64 x 1,024: docs/benchmarks.md).
# ``tail_rows``: the coarse levels of at most this many rows over all
# batch rows and heads run as one tail (``_tail_first``): one launch per
# pass instead of one per level (0: none). At 16,384 (the levels of 2,048
# rows per head and fewer at 1 x 65,536 tokens and 8 heads) the forward
# +backward took 1.185 ms against 1.219 at blocks of 16, 1.597 against
# 1.630 at blocks of 64 (H200, head_dim 64: docs/benchmarks.md).
# ``coarse_tile``: query rows per program of the level kernels from level
# 1 on, the coarse tail's included (0, the default: the finest level's
# tile). At blocks of 16 the coarse levels' dq and dk, dv kernels, on
# tiles of one block, move their bytes at about 47-56% of the copy rate
# where level 0's move them at about 72% (levels 2-4: 0.172 ms of the
# backward's 0.718 at 1 x 65,536 tokens on an H200, by the bytes each
# kernel must read and write); larger tiles give each program more rows
# in flight, but at 32 every coarse level was slower: forward+backward
# 1.144 against 1.070 ms (H200, 1 x 65,536 tokens: docs/benchmarks.md).
TUNING = {"num_warps": None, "pyramid_warps": None, "dq_warps": None,
          "dkv_warps": None, "num_stages": 1,
          "levels_per_launch": 1, "coarsen_heads": 1, "coarsen_rows": 0,
          "coarsen_impl": "auto", "forward_l0_impl": "auto",
          "backward_l0_impl": "auto", "mosaic_levels": 1,
          "mosaic_zero_rows": "kernel",
          "handover_dtype": "input", "grid_order": "tiles",
          "tail_rows": 16384, "sweep_blocks": 16, "sweep_levels": None,
          "sweep_programs": 256, "pyramid_pass": 3, "pyramid_stages": 2,
          "coarse_tile": 0}


def _pow2(x: int) -> bool:
  return x >= 1 and (x & (x - 1)) == 0


# What each TUNING key may hold: one of a few strings, or an int that passes
# a check (the warps keys may also be None).
_TUNING_CHOICES = {
    "coarsen_impl": ("auto", "dot", "pallas", "xla", "mosaic"),
    "forward_l0_impl": ("auto", "triton", "mosaic"),
    "backward_l0_impl": ("auto", "triton", "mosaic", "sweep"),
    "mosaic_zero_rows": ("xla", "kernel"),
    "handover_dtype": ("input", "float32"),
    "grid_order": ("tiles", "heads"),
}
_TUNING_INTS = {
    "num_warps": ("None (one per 16 rows of 64 elements), or a power of "
                  "two up to 32",
                  lambda x: _pow2(x) and x <= 32),
    "pyramid_warps": ("None (one per 64 rows of 64 elements), or a power of "
                      "two up to 32", lambda x: _pow2(x) and x <= 32),
    **{key: ("None (as the level kernels), or a power of two up to 32",
             lambda x: _pow2(x) and x <= 32)
       for key in ("dq_warps", "dkv_warps")},
    "num_stages": ("an int >= 1", lambda x: x >= 1),
    "levels_per_launch": ("an int >= 1", lambda x: x >= 1),
    "mosaic_levels": ("an int >= 1", lambda x: x >= 1),
    "coarsen_heads": ("an int >= 1", lambda x: x >= 1),
    "sweep_blocks": ("a power of two (key blocks per program of the "
                     "backward's sweep)", _pow2),
    "sweep_levels": ("None (by the device and sizes), or an int >= 0 "
                     "(coarse levels whose backward is the sweep)",
                     lambda x: x >= 0),
    "sweep_programs": ("an int >= 0 (fewest programs of a sweep's launch; "
                       "0: any)", lambda x: x >= 0),
    "pyramid_pass": ("3 (the default) or 2 (levels per Mosaic GPU pyramid "
                     "pass)", lambda x: x in (2, 3)),
    "pyramid_stages": ("1 to 4 (steps a Mosaic GPU pyramid pass loads "
                       "ahead)", lambda x: 1 <= x <= 4),
    "coarsen_rows": ("0 (the default), or a power of two",
                     lambda x: x == 0 or _pow2(x)),
    "tail_rows": ("0 (no tail), or a power of two (rows of a level over "
                  "the batch and heads)",
                  lambda x: x == 0 or _pow2(x)),
    "coarse_tile": ("0 (as level 0), or a power of two >= 16 (query rows "
                    "per program from level 1 on)",
                    lambda x: x == 0 or (_pow2(x) and x >= 16)),
}


# The int keys that may also be None (a default that depends on the device
# and sizes).
_TUNING_NONE = ("num_warps", "pyramid_warps", "dq_warps", "dkv_warps",
                "sweep_levels")


def check_tuning(tuning=None) -> None:
  """Raises ValueError naming the first key of ``tuning`` (default
  ``TUNING``) that is unknown or holds a value the kernels cannot use."""
  tuning = TUNING if tuning is None else tuning
  for key, value in tuning.items():
    if key in _TUNING_CHOICES:
      if value not in _TUNING_CHOICES[key]:
        raise ValueError(f"TUNING[{key!r}] must be one of "
                         f"{_TUNING_CHOICES[key]}, got {value!r}.")
    elif key in _TUNING_INTS:
      what, ok = _TUNING_INTS[key]
      if not ((value is None and key in _TUNING_NONE) or (
          isinstance(value, int) and not isinstance(value, bool)
          and ok(value))):
        raise ValueError(f"TUNING[{key!r}] must be {what}, got {value!r}.")
    else:
      raise ValueError(f"unknown TUNING key {key!r}; the keys are "
                       f"{sorted({**_TUNING_CHOICES, **_TUNING_INTS})}.")


def parse_tuning(items) -> dict:
  """TUNING values from ``KEY=VALUE`` strings (a command line's): ints as
  ints, ``None`` as None (also ``auto`` for the int keys that may be
  None), anything else as a string; checked by ``check_tuning``. Raises
  ValueError naming the first bad item."""
  values = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or key not in TUNING:
      raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of "
                       f"{sorted(TUNING)}")
    values[key] = (int(text) if re.fullmatch(r"-?\d+", text) else
                   None if text == "None" or (
                       text == "auto" and key in _TUNING_NONE) else text)
  check_tuning(values)
  return values


def default_tile(block_size: int) -> int:
  """Query rows per program by default: one block, at least
  ``DEFAULT_TILE``."""
  return max(DEFAULT_TILE, block_size)


def kernel_head_dim(d: int) -> int:
  """The head width the kernels compute at: ``d`` rounded up to a power of
  two, at least 16 (inputs are zero-padded to it)."""
  return max(16, 1 << (int(d) - 1).bit_length())


# Pallas's Triton backend, which the kernels are written for (not Mosaic
# GPU); jax 0.11 marks it as deprecated and a later jax may remove it.
# Interpret mode does not need it.
TRITON_MODULE = "jax.experimental.pallas.triton"


def triton_missing() -> str | None:
  """Why this jax cannot compile the kernels for a GPU (None if it can)."""
  try:
    importlib.import_module(TRITON_MODULE)
  except ImportError as e:
    return (f"this jax ({jax.__version__}) has no Pallas Triton backend "
            f"({e}); the fused kernels are written for it (jax 0.10 and "
            "0.11 have it)")
  return None


def mosaic_gpu() -> bool:
  """Whether the default device is a GPU that Mosaic GPU kernels compile
  for (NVIDIA, compute capability 9.0 or newer: bulk tensor copies)."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or not capability:
    return False
  try:
    return tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0)
  except ValueError:  # not an NVIDIA version (e.g. "gfx942")
    return False


def coarsen_impl(interpret: bool = False) -> str:
  """The pyramid's implementation: ``TUNING["coarsen_impl"]``, with "auto"
  resolved for this device (and interpret mode)."""
  impl = TUNING.get("coarsen_impl", "auto")
  if impl == "auto":
    return "mosaic" if not interpret and mosaic_gpu() else "dot"
  return impl


# (block size, head width of the kernels) where the Mosaic GPU level-0
# kernels were measured faster than the Triton ones (H200, 65,536 tokens,
# bfloat16, non-causal: docs/benchmarks.md). The forward
# (``mosaic.forward_level``), the level alone: 0.126 against 0.213 ms at
# blocks of 32, 0.182 against 0.342 at head_dim 128; at blocks of 16 and
# head_dim 64 the two tie on an H200, and on an H100 the Mosaic GPU kernel
# is faster (0.113 against 0.133 ms, the forward 0.443 against 0.457, 1 x
# 65,536 tokens, 2026-12-05); at blocks of 64 the Triton kernel is faster
# without a mask. The backward (``mosaic.dq_level``, ``dkv_level``), in
# the whole attention at blocks of 16: forward+backward 1.220 against
# 1.316 ms at head_dim 64 (1.334 against 1.431 with a mask), 2.387
# against 2.449 at head_dim 128. ``"auto"`` takes them there only.
MOSAIC_L0_FASTER = {"forward": frozenset({(16, 64), (32, 64), (16, 128)}),
                    "backward": frozenset({(16, 64), (16, 128)})}
# The same, causal: the backward at blocks of 16 and head_dim 64 (the whole
# attention's forward+backward 1.193 against 1.216 ms and 1.202 against
# 1.220 in two runs); the forward loses there (0.442 against 0.389 ms).
MOSAIC_L0_FASTER_CAUSAL = {"forward": frozenset(),
                           "backward": frozenset({(16, 64)})}
# (block size, head width) where the level-0 backward in one sweep
# (``_sweep_backward``) was measured faster than the Triton dq and dk, dv
# kernels, non-causal (H200, bfloat16, 1 x 65,536 tokens: forward+backward
# 1.560 against 1.604 ms at blocks of 64 in one process, 1.540 at 16
# blocks per program in another; 1.507 against 1.567 at blocks of 32;
# docs/benchmarks.md). ``"auto"`` takes it there on the GPUs that
# take the Mosaic GPU kernels (where it was timed).
SWEEP_L0_FASTER = frozenset({(32, 64), (64, 64)})
# (block size, head width) -> the coarsest level (1 .. this one) whose
# backward in the sweep was measured faster than its Triton dq and dk, dv
# kernels, non-causal (H200, bfloat16, 1 x 65,536 tokens, heads 8;
# docs/benchmarks.md). Level 1: blocks of 64, 1.546 against 1.568 ms
# forward+backward in one process, its kernels 0.186 against 0.088 +
# 0.130; blocks of 16, 1.199 against 1.233, 0.138 against 0.070 + 0.106;
# blocks of 16 at head_dim 128, 2.332 against 2.396 (two processes), 0.281
# against 0.132 + 0.205. Level 2: at blocks of 64 in runs of 8 key blocks
# (256 programs, ``sweep_programs``) 0.095 against 0.048 + 0.067, 1.505
# against 1.517 ms (in runs of 16, 128 programs, it was slower: 0.139);
# at blocks of 16 slower, 0.103 against 0.037 + 0.057 (level 3: 0.095
# against 0.021 + 0.029). ``sweep_levels()`` takes these on the GPUs that
# take the Mosaic GPU kernels.
SWEEP_COARSE_LEVELS = types.MappingProxyType(
    {(16, 64): 1, (64, 64): 2, (16, 128): 1})


def sweep_levels(interpret: bool = False, block_size: int | None = None,
                 head_dim: int | None = None, causal: bool = False) -> int:
  """The coarse levels (1 .. this one) whose backward is the sweep:
  ``TUNING["sweep_levels"]``, or where that is None, on the GPUs that take
  the Mosaic GPU kernels, ``SWEEP_COARSE_LEVELS``'s for the block size and
  head width (not causal) unless ``TUNING["mosaic_levels"]`` asks for
  Mosaic GPU kernels at level 1; 0 elsewhere."""
  levels = TUNING.get("sweep_levels")
  if levels is not None:
    return levels
  if interpret or causal or not mosaic_gpu() or TUNING.get(
      "mosaic_levels", 1) > 1:
    return 0
  return SWEEP_COARSE_LEVELS.get((block_size, head_dim), 0)


def level0_impl(kind: str, interpret: bool = False,
                block_size: int | None = None, head_dim: int | None = None,
                causal: bool = False) -> str:
  """The finest level's ``kind`` ("forward" or "backward") implementation:
  ``TUNING["forward_l0_impl"]`` or ``["backward_l0_impl"]``, with "auto"
  resolved for this device (and interpret mode) and, where given, the
  block size, the kernels' head width and causality (without them "auto"
  means Mosaic GPU; with them, Mosaic GPU at those of
  ``MOSAIC_L0_FASTER[kind]``, or, causal, ``MOSAIC_L0_FASTER_CAUSAL[kind]``,
  the backward's sweep at those of ``SWEEP_L0_FASTER`` (not causal), the
  Triton kernels elsewhere)."""
  impl = TUNING.get(f"{kind}_l0_impl", "auto")
  if impl != "auto":
    return impl
  if interpret or not mosaic_gpu():
    return "triton"
  if block_size is None or head_dim is None:
    return "mosaic"
  faster = MOSAIC_L0_FASTER_CAUSAL if causal else MOSAIC_L0_FASTER
  if (block_size, head_dim) in faster[kind]:
    return "mosaic"
  if (kind == "backward" and not causal
      and (block_size, head_dim) in SWEEP_L0_FASTER):
    return "sweep"
  return "triton"


def block_size_unsupported(block_size: int) -> str | None:
  """Why the kernels cannot take ``block_size`` (None if they can)."""
  if not (_pow2(block_size) and block_size >= 16):
    return f"block_size must be a power of two >= 16, got {block_size}"
  return None


def cannot_run(implementation: str, reason: str) -> ValueError:
  """The error of the kernels (``implementation``: "pallas" or
  "pallas_interpret") refusing inputs for ``reason``."""
  return ValueError(f"implementation={implementation!r} cannot run these "
                    f"inputs: {reason}. Use implementation='xla'.")


def unsupported_reason(query, value, block_size: int,
                       key=None) -> str | None:
  """Why the kernels cannot run these inputs (None if they can)."""
  d, dv = query.shape[-1], value.shape[-1]
  reason = block_size_unsupported(block_size)
  if reason:
    return reason
  if min(d, dv) < 1:
    return f"head dims must be >= 1, got {d} and {dv}"
  for x in (query, value) if key is None else (query, key, value):
    if jnp.dtype(x.dtype).itemsize > 4:
      return f"inputs must be 16- or 32-bit floats, got {x.dtype}"
  return None


def _iota(n):
  return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _allowed(qi, kj, n, nr, level0, causal):
  """The level's block structure: may coarse row qi see coarse key kj?
  (``n``: the level's rows, or None for row numbers counted from a
  multiple of ``nr`` whose rows are all inside the level.)"""
  # nr is a power of two: shifts and masks are floor division and modulo
  # (also for the negative row numbers before row 0).
  shift = nr.bit_length() - 1
  bq, bk = qi >> shift, kj >> shift
  if level0:
    if causal:
      ok = (bk == bq - 1) | ((bk == bq) & (kj <= qi))
    else:
      ok = (bk >= bq - 1) & (bk <= bq + 1)
  else:
    half = nr // 2
    rq, rk = qi & (nr - 1), kj & (nr - 1)
    # Neighbour blocks minus the quarter a finer level already covers
    # (written without a logical not, which Mosaic GPU does not lower on
    # jax 0.11).
    ok = (bk == bq - 1) & ((rq >= half) | (rk < half))
    if not causal:
      ok = ok | ((bk == bq + 1) & ((rq < half) | (rk >= half)))
  if n is None:
    return ok
  return ok & (kj >= 0) & (kj < n) & (qi >= 0) & (qi < n)


def _piece_allowed(own, other, rel, *, n, nr, level0, causal, own_queries):
  """``_allowed`` of a program's rows (row numbers ``own`` [T]) against a
  piece's (``other`` [S]) as [T, S]; ``own_queries``: the program's rows
  are the queries (else the keys).

  ``rel`` (from ``_neighbours``): None, or (the piece's first row minus the
  program's first row, a multiple of ``nr``; whether the piece is inside
  the level, a traced bool). With it the block structure comes from
  offsets (known when tracing, except in a loop over pieces:
  ``_over_pieces``) and the bounds from one scalar, instead of row
  numbers and four comparisons per logit.
  """
  if rel is not None:
    # (Giving pieces whose pairs all meet, found when tracing, only the
    # bound timed no faster: these comparisons cost nothing measurable;
    # docs/benchmarks.md.)
    offset, inside = rel
    own, other, n = _iota(own.shape[0]), offset + _iota(other.shape[0]), None
  a, b = own[:, None], other[None, :]
  ok = _allowed(*((a, b) if own_queries else (b, a)), n, nr, level0, causal)
  return ok if rel is None else ok & inside


def _neighbours(refs, start, tile, nr, n, after, level0):
  """The rows of ``refs`` a tile [start, start + tile) interacts with:
  the neighbour block before it, its own rows (at level 0, or when the
  tile holds more than one block: a coarse row never sees its own block)
  and, if ``after``, the block after it. A tile smaller than a block
  meets what its whole block meets (``_allowed`` masks by row), in pieces
  of the tile's rows (slower than tiles of a block for blocks of 64:
  docs/benchmarks.md; so were pieces of fewer rows than a block for tiles
  of a block).
  Returns (read, pieces): ``pieces`` lists each piece's (offset from
  ``start``, rows), known when tracing, and ``read(offset, rows)`` gives
  (rows of each ref, their row numbers, ``rel`` of ``_piece_allowed``);
  the offset may be traced (``_over_pieces``). (One read of a
  power-of-two window covering them, with ``_allowed`` masking the rest,
  was 1.7x slower forward+backward on an H200, and issuing all pieces'
  loads before computing on any made the forward 8% slower:
  docs/benchmarks.md.)
  """
  step = 0
  if tile < nr:  # Part of one block: it meets what its whole block meets,
    step = tile  # in pieces of the tile's size.
    start, tile = (start // nr) * nr, nr
  # (offset from start, rows), offsets known when tracing.
  own = [(0, tile)] if level0 or tile > nr else []
  pieces = [(-nr, nr)] + own + ([(tile, nr)] if after else [])
  if step:
    pieces = [(off + j, step) for off, size in pieces
              for j in range(0, size, step)]

  def read(off, size):
    # A piece is either inside [0, n) or wholly outside (all aligned to
    # its size): the clamped read of one outside is masked.
    pos = start + off
    at = jnp.clip(pos, 0, n - size)
    # With a tile of whole blocks (start a multiple of nr) the structure
    # is one of offsets (``_piece_allowed``).
    rel = None if step else (off, (pos >= 0) & (pos < n))
    return [r[pl.ds(at, size)] for r in refs], pos + _iota(size), rel

  return read, pieces


def _over_pieces(neighbours, body, loop):
  """``carry = body(carry, rows, row numbers, rel)`` over the pieces of
  ``_neighbours`` (``carry`` None for the first).

  With ``loop``, three or more pieces of one size at even offsets (level
  0 without causality; level 0 of a tile smaller than a block) run the
  second to the last in a loop, with traced offsets. The forward's level-0
  kernel then takes 128 registers per thread instead of 164 (16 programs
  on an SM instead of 12) and 15% less time on an H200; looped, the dq
  and dk, dv kernels kept too many registers for that (160, 222) and got
  slower (docs/benchmarks.md), so they unroll.
  """
  read, pieces = neighbours
  offs, size = [off for off, _ in pieces], pieces[0][1]
  stride = offs[1] - offs[0] if len(offs) > 1 else 0
  carry = body(None, *read(offs[0], size))
  if (loop and len(pieces) >= 3 and all(z == size for _, z in pieces)
      and offs == [offs[0] + i * stride for i in range(len(offs))]):
    return lax.fori_loop(1, len(pieces), lambda i, c: body(
        c, *read(offs[0] + i * stride, size)), carry)
  for off, rows in pieces[1:]:
    carry = body(carry, *read(off, rows))
  return carry


def _zeroed(level, masked, c, *rows):
  """``rows`` (each [S, D]) with the rows whose count ``c`` [S] is 0 set to
  zero, at level 0 of a call with a mask (``masked``): there q, k, v and
  the cotangent are the caller's, which may hold anything (NaN, inf) where
  tokens are not real, and a zero weight times NaN is not zero. Without a
  mask the only such rows are the padding to a whole block, zeros already
  (and the cotangent there is zero: the output is sliced). A coarse level's
  rows are left as they are: the pyramid and the restriction zero such
  rows before they sum them, so every coarse row is finite, and zero where
  its count is 0.

  The selects cost time: without them (no mask) forward+backward takes
  1.34 ms instead of 1.45 at 65,536 tokens on an H200 (dk, dv level 0 0.233
  against 0.295). One select pass over q, k, v and the cotangent in XLA
  instead costs more (0.23 ms; docs/benchmarks.md)."""
  if level or not masked:
    return rows
  return tuple(jnp.where(c[:, None] > 0, x, jnp.zeros_like(x)) for x in rows)


def _repeat(x, times):
  """Each row ``times`` times: [m, ...] -> [times m, ...] (a coarse row to
  its descendants)."""
  m = x.shape[0]
  y = jnp.broadcast_to(x[:, None], (m, times) + x.shape[1:])
  return y.reshape((times * m,) + x.shape[1:])


def _f32(*shape):
  """A float32 output of ``shape`` (log-normalisers, statistics, the
  tail's partial results)."""
  return jax.ShapeDtypeStruct(shape, jnp.float32)


class Uniform:
  """The real-token counts [B, n] of a level where every row stands for
  ``value`` real tokens: a call without a mask whose length needs no
  padding (``value`` = 2**level). Known when tracing, so no array is made:
  the Triton kernels get a stand-in for its ref (``_ConstRef``, by
  ``_pallas_call``) and use the value as a constant; the Mosaic GPU
  kernels take the value (``_mosaic_counts``). As arrays, the
  counts of every level were one small XLA launch each (about 17 in the
  forward at 1 x 65,536 tokens, 0.013 ms on an H200: docs/benchmarks.md).
  A pytree without leaves, so that it passes through ``custom_vjp``."""

  def __init__(self, value, shape):
    self.value, self.shape = float(value), tuple(shape)
    self.dtype = jnp.dtype(jnp.float32)

  def coarser(self, levels=1):
    """The counts ``levels`` levels up (rows of 2**levels groups)."""
    b, n = self.shape
    return Uniform(self.value * 2**levels, (b, n >> levels))

  def array(self):
    return jnp.full(self.shape, self.value, self.dtype)

  def __eq__(self, other):
    return (isinstance(other, Uniform) and
            (self.value, self.shape) == (other.value, other.shape))

  def __hash__(self):
    return hash((self.value, self.shape))

  def __repr__(self):
    return f"Uniform({self.value}, {self.shape})"


jax.tree_util.register_static(Uniform)


def _array(c):
  """Counts as an array (XLA's paths)."""
  return c.array() if isinstance(c, Uniform) else c


def _coarser_counts(c, levels=1):
  """The counts ``levels`` levels above ``c`` (each row the sum of its
  2**levels children): ``Uniform``'s own, or an array's pair sums."""
  if isinstance(c, Uniform):
    return c.coarser(levels)
  return c.reshape(c.shape[0], -1, 2**levels).sum(axis=-1)


def _mosaic_counts(c):
  """Counts as the Mosaic GPU kernels take them: an array, or a number
  where they are ``Uniform``."""
  return c.value if isinstance(c, Uniform) else c


class _ConstRef:
  """What a kernel reads in place of the ref of ``Uniform`` counts (one
  [rows] block): every read is ``value``."""

  def __init__(self, value, shape):
    self.value, self.shape = value, shape
    self.dtype = jnp.dtype(jnp.float32)

  def __getitem__(self, idx):
    if idx is Ellipsis:
      shape = self.shape
    elif isinstance(idx, pl.Slice) and idx.stride == 1:
      shape = (idx.size,)
    else:
      raise TypeError(f"counts known when tracing are read whole or by "
                      f"pl.ds, got {idx!r}")
    return jnp.full(shape, self.value, self.dtype)


def _pallas_call(kernel, args, in_specs, **kw):
  """``pl.pallas_call(kernel, in_specs=in_specs, **kw)(*args)``, where
  ``Uniform`` counts among ``args`` are not inputs of the launch: the
  kernel gets a ``_ConstRef`` of the block its spec names in their place
  (a spec of (None, rows): a [rows] block)."""
  const = {i: _ConstRef(a.value, tuple(s for s in spec.block_shape
                                        if s is not None))
           for i, (a, spec) in enumerate(zip(args, in_specs))
           if isinstance(a, Uniform)}
  if not const:
    return pl.pallas_call(kernel, in_specs=in_specs, **kw)(*args)
  inputs = len(args) - len(const)

  def with_consts(*refs):
    given = iter(refs[:inputs])
    full = [const[i] if i in const else next(given)
            for i in range(len(args))]
    return kernel(*full, *refs[inputs:])

  return pl.pallas_call(
      with_consts, in_specs=[s for i, s in enumerate(in_specs)
                             if i not in const], **kw)(
          *[a for i, a in enumerate(args) if i not in const])


def _of_pairs(x, which):
  """Row ``which`` (0 or 1) of each pair: [2m, ...] -> [m, ...] (a select
  written as a weighted pair sum, which the kernels lower)."""
  pick = (_iota(2) == which).astype(x.dtype)
  return jnp.sum(_pairs(x) * pick.reshape((1, 2) + (1,) * (x.ndim - 1)),
                 axis=1)


def _first_of_pairs(x):
  """The first row of each pair: [2m, ...] -> [m, ...]."""
  return _of_pairs(x, 0)


def _first_real_of_pairs(x, c):
  """Each pair's first row with a real token (the second where the first
  has none), and the pairs' counts: ([2m, D], [2m]) -> ([m, D], [m]).
  Causal coarse queries: applied level after level, a coarse row gets the
  query of its group's first real token."""
  take_first = (_first_of_pairs(c) > 0)[:, None]
  return (jnp.where(take_first, _of_pairs(x, 0), _of_pairs(x, 1)),
          jnp.sum(_pairs(c), axis=1))


def _pair_sum(x):
  """Sum of each row with its sibling, repeated for both: [2m] -> [2m]."""
  m = x.shape[0] // 2
  return _repeat(x.reshape(m, 2).sum(axis=1), 2)


def _dot(a, b, precision, trans_b=False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


# ----------------------------------------------------- levels per launch


def _tile_at(level, tile):
  """Query rows per program of a launch that starts at ``level``:
  ``tile`` at level 0, ``TUNING["coarse_tile"]`` (where set) from level 1
  on."""
  return tile if level == 0 else (TUNING.get("coarse_tile") or tile)


def _level_groups(n0, levels, tile, nr, per_launch):
  """(first level, number of levels, tile rows at the first) per launch.

  A launch runs ``g`` consecutive levels ``l .. l+g-1`` in one program per
  tile of level ``l``: the tile's rows at level ``l + j`` are the
  ``t >> j`` rows of its ancestors, so each program works coarse to fine on
  its own rows and hands each level's state to the next in registers, with
  no redundant work. Every level's tile must keep >= 16 rows (the smallest
  product) and >= ``nr`` (one block), which bounds ``g``. Finest first.
  """
  out, level = [], 0
  while level < levels:
    t = min(_tile_at(level, tile), n0 >> level)
    g = 1
    while (g < per_launch and level + g < levels
           and (t >> g) >= max(16, nr)):
      g += 1
    out.append((level, g, t))
    level += g
  return out


def _unless_padding(c, compute, fills, at=None):
  """Runs ``compute`` unless the program's rows are all padding (c == 0).

  A tile of padding only (the tail of a short sequence) writes ``fills``
  instead, (ref, value) pairs (the rows ``at`` of each ref, or all of
  it): zero outputs and gradients (exactly what
  ``compute`` gives such rows, whose queries, cotangents and counts are
  zero) and no log-normaliser (padding rows take no gradient, and a coarse
  row of padding has only padding children). Coarser levels of the same
  program cover the same tokens, so they are padding too. The pyramid and
  restriction kernels skip blocks of padding the same way (fills: zeros,
  and M = _NO_ROW). Padding costs no attention and no coarsening.
  """
  live = jnp.max(c) > 0

  @pl.when(live)
  def _():
    compute()

  @pl.when(jnp.logical_not(live))
  def _():
    for ref, value in fills:
      if at is None:
        ref[...] = jnp.full(ref.shape, value, ref.dtype)
      else:  # The program's rows ``at`` of the ref.
        ref[at] = jnp.full((at.size,) + ref.shape[1:], value, ref.dtype)


def _run_levels(refs, rows, *, group, per_level, has_parent, fills, **kw):
  """The body of a kernel over a group of levels (see _level_groups).

  ``refs``: per level (finest first) ``per_level`` refs whose fourth is the
  level's counts, then the parent level's refs (as many as ``fills``) if
  ``has_parent``, then the outputs (one per value in ``fills``); each holds
  all rows of its (batch, head), and a program reads and writes its tile's.
  ``rows`` computes one level's rows from its refs, the coarser level's
  results (a tuple, or None) and (counts of the rows, first row); called
  coarse to fine, it returns the tuple of results that the finest level
  writes. (A loop over several tiles per program, with 1-3 pipelining
  stages, was slower on an H200: docs/benchmarks.md.)
  """
  count = len(group)
  levels = [refs[per_level * j:per_level * (j + 1)] for j in range(count)]
  rest = refs[per_level * count:]
  n_parent = len(fills) if has_parent else 0
  parent_refs, out_refs = rest[:n_parent], rest[n_parent:]
  t0, tc = group[0][1], group[-1][1]  # tile rows: finest, coarsest level
  ti = _tile_id()

  def compute():
    # The parent level's results, each coarse row repeated for its two
    # children (``rows`` takes them at its own rows).
    state = (tuple(_repeat(r[pl.ds(ti * (tc // 2), tc // 2)], 2)
                   for r in parent_refs) if has_parent else None)
    for level_refs, (n, t, level) in reversed(list(zip(levels, group))):
      start = ti * t
      if state is not None and state[0].shape[0] != t:
        state = tuple(_repeat(x, 2) for x in state)
      state = rows(*level_refs, state, level_refs[3][pl.ds(start, t)],
                   start, tile=t, n=n, level=level, **kw)
    for ref, value in zip(out_refs, state):
      ref[pl.ds(ti * t0, t0)] = value.astype(ref.dtype)

  at = pl.ds(ti * t0, t0)
  _unless_padding(levels[0][3][at], compute, list(zip(out_refs, fills)),
                  at=at)


# ---------------------------------------------------------------- forward


def _with_dropout(refs, rate):
  """(refs, drop): with ``rate > 0`` the first ref holds the program's
  dropout seed (16 copies of its (batch row, head) seed)."""
  if not rate:
    return refs, None
  return refs[1:], (refs[0], rate)


def _dropout(drop, level, rows, keys):
  """Attention-dropout multipliers of a level's weights (rows x keys) or
  None (``dropout.py``: the same weights as every other implementation)."""
  if drop is None:
    return None
  seed_ref, rate = drop
  seed = dropout_lib.level_seed(jnp.max(seed_ref[...]), level)
  return dropout_lib.multiplier(seed, rows.astype(jnp.uint32),
                                keys.astype(jnp.uint32), rate)


def _fwd_kernel(*refs, group, has_parent, rate, **kw):
  """Forward of levels ``group`` (finest first: (n, t, level) each)."""
  refs, drop = _with_dropout(refs, rate)
  _run_levels(refs, _fwd_rows, group=group, per_level=4,
              has_parent=has_parent, fills=_PARTS["fwd"][1], drop=drop,
              **kw)


def _fold(q, qi, pieces, *, n, nr, level, causal, scale, precision, drop,
          masked):
  """(max, normaliser, numerator) of the rows ``q`` (row numbers ``qi`` of
  a level of ``n`` rows) over key pieces ``((k, v, counts), key row
  numbers, rel)`` (``_neighbours``; ``rel`` for ``_piece_allowed``), one
  piece at a time with a running max (only one piece's logits live at
  once: fewer registers per program). Each key's weight is its real-token
  count; ``drop`` thins the numerator's weights."""
  def body(carry, kvc, kj, rel):
    k, v, c = kvc
    ok = _piece_allowed(qi, kj, rel, n=n, nr=nr, level0=level == 0,
                        causal=causal, own_queries=True)
    ok = ok & (c[None, :] > 0)
    # A key row that is not real may hold garbage (with a mask): it only
    # reaches its own column of logits, which ``ok`` masks, so it is left
    # as it is. Its value row is zeroed (``_zeroed``): a zero weight times
    # garbage is not zero.
    s = jnp.where(ok, _dot(q, k, precision, trans_b=True) * scale, _NO_KEY)
    m_new = jnp.max(s, axis=1)
    if carry is not None:
      m_new = jnp.maximum(carry[0], m_new)
    p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0) * c[None, :]
    v, = _zeroed(level, masked, c, v)
    keep = _dropout(drop, level, qi[:, None], kj[None, :])
    part = _dot((p if keep is None else p * keep).astype(v.dtype), v,
                precision)
    if carry is None:
      return m_new, jnp.sum(p, axis=1), part
    m, z, y = carry
    a = jnp.exp(m - m_new)
    return m_new, z * a + jnp.sum(p, axis=1), y * a[:, None] + part

  return _over_pieces(pieces, body, loop=True)


def _normalised(m, z, y):
  """(output y / z, log-normaliser m + log z) of running (max, normaliser,
  numerator) rows; a row that saw no key: (0, _NO_KEY)."""
  has = z > 0
  o = y / jnp.where(has, z, 1.0)[:, None]
  return o, jnp.where(has, m + jnp.log(jnp.where(has, z, 1.0)), _NO_KEY)


def _with_parent(m, z, y, po, plse):
  """Running (max, normaliser, numerator) rows with a parent's normalised
  output ``po`` and log-normaliser ``plse`` folded in (``y`` None: none
  yet); a parent row that saw no key (``_NO_KEY``) adds nothing."""
  big = jnp.maximum(m, plse)
  a = jnp.exp(m - big)
  b = jnp.where(plse > 0.5 * _NO_KEY, jnp.exp(plse - big), 0.0)
  part = po * b[:, None]
  return big, z * a + b, part if y is None else y * a[:, None] + part


def _fwd_rows(q_ref, k_ref, v_ref, c_ref, parent, cq, start, *, nr, tile, n,
              level, causal, scale, precision, drop, masked):
  """(normalised output f32, lse) of a level's rows [start, start + tile).

  ``parent``: the parent level's (output, lse) of these rows' parents (one
  row per row here), or None at the coarsest level. ``drop``: attention
  dropout (``_with_dropout``) or None; it thins the numerator only.
  """
  level0 = level == 0
  qi = start + _iota(tile)
  q = q_ref[pl.ds(start, tile)]
  q, = _zeroed(level, masked, cq, q)

  m, z, y = _fold(q, qi, _neighbours((k_ref, v_ref, c_ref), start, tile,
                                      nr, n, not causal, level0),
                  n=n, nr=nr, level=level, causal=causal, scale=scale,
                  precision=precision, drop=drop, masked=masked)

  if parent is not None:
    m, z, y = _with_parent(m, z, y, parent[0].astype(jnp.float32),
                           parent[1])
  o, lse = _normalised(m, z, y)
  if level0:
    o = jnp.where(cq[:, None] > 0, o, 0.0)
  return o, lse


def _rows_spec(n, width):
  """All ``n`` rows of one (batch, head) of a [B, n, H, width] array; grid
  (tile programs, heads, batch). A program reads and writes its own tiles'
  rows (``_run_levels``) and its neighbour rows (``_neighbours``)."""
  return pl.BlockSpec((None, n, None, width),
                      _ids(lambda i, j, k: (k, 0, j, 0)))


def _vec_spec(n):
  """All rows of one (batch, head) of a per-row scalar [B, H, n]."""
  return pl.BlockSpec((None, None, n), _ids(lambda i, j, k: (k, j, 0)))


def _counts_spec(n):
  """All rows of one batch element of the counts [B, n]."""
  return pl.BlockSpec((None, n), _ids(lambda i, j, k: (k, 0)))


def _heads_first() -> bool:
  """Whether launches put the head index first (``TUNING["grid_order"]``,
  read when tracing)."""
  return TUNING["grid_order"] == "heads"


def _grid(tiles, heads, batch):
  """A launch of (tile, head, batch element) programs, the index that
  ``TUNING["grid_order"]`` names first (varying fastest)."""
  return (heads, tiles, batch) if _heads_first() else (tiles, heads, batch)


def _ids(index_map):
  """``index_map`` of (tile, head, batch) ids, for a grid of ``_grid``."""
  if _heads_first():
    return lambda j, i, k: index_map(i, j, k)
  return index_map


def _tile_id():
  """The program's tile index in a grid of ``_grid``."""
  return pl.program_id(1 if _heads_first() else 0)


def _group(pyramid, first, count, t):
  """(rows, tile rows, level) of levels first .. first+count-1, finest
  first."""
  return tuple((pyramid[first + j][0].shape[1], t >> j,
                first + j) for j in range(count))


# Copies of each dropout seed the kernels read (a block of one element is
# avoided; the kernels take their max).
_SEED_COPIES = 16


def _seed_spec():
  """A program's dropout seeds: [B, H, _SEED_COPIES]."""
  return pl.BlockSpec((None, None, _SEED_COPIES),
                      _ids(lambda i, j, k: (k, j, 0)))


def _seed_inputs(seeds):
  """(in_specs, args) that give the kernels the dropout seeds (none if
  ``seeds`` is None)."""
  if seeds is None:
    return [], []
  b, h = seeds.shape
  return [_seed_spec()], [jnp.broadcast_to(seeds[:, :, None],
                                           (b, h, _SEED_COPIES))]


def _group_forward(pyramid, first, count, t, parent, *, nr, causal, scale,
                   out_dtype, precision, interpret, seeds=None, rate=0.0,
                   masked=False):
  """Levels first .. first+count-1 in one launch; parent (o, lse) or None.

  Returns level ``first``'s o [B, n, H, Dv] (normalised, out_dtype) and
  lse [B, H, n] f32.
  """
  q, _, v, _ = pyramid[first]
  b, n, h, d = q.shape
  dv = v.shape[-1]
  group = _group(pyramid, first, count, t)
  ns = [m for m, _, _ in group]
  in_specs, args = _seed_inputs(seeds)
  for j, m in enumerate(ns):
    in_specs += _level_specs(m, d, dv)
    args += list(pyramid[first + j])
  if parent is not None:
    in_specs += [_rows_spec(ns[-1] // 2, dv), _vec_spec(ns[-1] // 2)]
    args += list(parent)
  kernel = functools.partial(
      _fwd_kernel, group=group, nr=nr, causal=causal,
      has_parent=parent is not None, scale=scale, precision=precision,
      rate=rate, masked=masked)
  return _pallas_call(
      kernel, args, in_specs,
      grid=_grid(n // t, h, b),
      out_specs=[_rows_spec(n, dv), _vec_spec(n)],
      out_shape=[jax.ShapeDtypeStruct((b, n, h, dv), out_dtype),
                 _f32(b, h, n)],
      interpret=interpret,
      compiler_params=_compiler_params(interpret, t, max(d, dv)),
      name=f"hattn_fwd_l{first}" + (
          f"_{count}" if count > 1 else ""))


def _compiler_params(interpret, rows, width=64, kind=None):
  """Triton settings of a kernel whose programs each own ``rows`` rows of
  ``width`` elements (the wider of the head dims); ``kind``: None (a
  forward level kernel), or "pyramid" (the coarsening or restriction
  kernel), "dq" or "dkv", whose warps ``TUNING[kind + "_warps"]`` may set."""
  if interpret:
    return None
  # The Triton backend, also when lowering for a GPU from another host.
  plgpu = importlib.import_module(TRITON_MODULE)
  # A warp per 16 x 64 elements, at most 4: tiles of 16 rows on one warp
  # and of 64 on 4 were the fastest of 1, 2 and 4 warps (8 is slower than
  # 4) at head_dim 64, and 16 rows on 2 warps at head_dim 128 (1.03 / 3.36
  # ms forward / forward+backward at 65,536 tokens against 1.76 / 4.26 on
  # one and 1.26 / 4.97 on 4), on an H200 (scripts/profile_kernels.py,
  # docs/benchmarks.md). The dq and dk, dv kernels on more warps than that
  # rule (fewer registers per thread: 134 instead of 255 for dk, dv level
  # 0 on 2 warps) were no faster at head_dim 64 (2 warps: 1.36 against
  # 1.35 ms; dk, dv level 0 with a mask 0.352 against 0.299) and slower at
  # 128 (4 warps: 2.78 against 2.56 ms; same card, docs/benchmarks.md).
  # The pyramid and restriction kernels (``pyramid_warps`` None) take a
  # warp per 64 rows of 64 elements, 1 at head_dim 64 and 2 at 128: on 2
  # warps they were faster than on 4 and 8 at 65,536 tokens and head_dim 64
  # (0.177 + 0.081 ms against 0.191 + 0.104 and 0.241 + 0.132), the
  # restriction on 1 faster still (0.075 against 0.082 ms, twice; the
  # pyramid's products tie), and on 2 at head_dim 128 faster than on 1
  # (restriction 0.155 against 0.170 ms; same card and script).
  pyramid = kind == "pyramid"
  warps = ((kind and TUNING.get(kind + "_warps"))
           or (not pyramid and TUNING["num_warps"])
           or max(1, min(4, rows * max(width, 64)
                         // (4096 if pyramid else 1024))))
  return plgpu.CompilerParams(num_warps=warps,
                              num_stages=TUNING["num_stages"])


# --------------------------------------------------------------- backward


def _prolong_weight(c, mode):
  """Weight of each child in its parent's coarsening (backward of it), by
  the pyramid's ``mode`` (``_query_mode``)."""
  if mode == "first":  # The parent is the first child.
    return (_iota(c.shape[0]) % 2 == 0).astype(jnp.float32)
  if mode == "first_real":  # The first child with a real token.
    first_real = (_repeat(_first_of_pairs(c), 2) > 0).astype(jnp.float32)
    return jnp.where(_iota(c.shape[0]) % 2 == 0, first_real,
                     1.0 - first_real)
  total = _pair_sum(c)
  return jnp.where(total > 0, c / jnp.where(total > 0, total, 1.0), 0.0)


def _with_parent_grads(grads, c, share, parent, level):
  """A level's gradient rows ``grads`` (float32 [rows, width] each) plus
  the parent level's ``parent`` (as many, one row per row here; or None),
  weighted by each row's share of its parent (``_prolong_weight`` of the
  counts ``c`` by the coarsening mode ``share``); at level 0 zero on rows
  of no real token."""
  if parent is not None:
    w = _prolong_weight(c, share)[:, None]
    grads = tuple(x + w * p.astype(jnp.float32)
                  for x, p in zip(grads, parent))
  if level == 0:
    grads = tuple(jnp.where(c[:, None] > 0, x, 0.0) for x in grads)
  return grads


def _dq_kernel(*refs, group, has_parent, rate, **kw):
  refs, drop = _with_dropout(refs, rate)
  _run_levels(refs, _dq_rows, group=group, per_level=7,
              has_parent=has_parent, fills=_PARTS["dq"][1], drop=drop,
              **kw)


def _dq_fold(q, g, e, mrow, qi, pieces, *, n, nr, level, causal, scale,
             precision, drop, masked, scaled=True):
  """dq (f32, times the softmax scale unless not ``scaled``) of query rows
  ``q`` (row numbers ``qi``; G, E, M of the module doc: ``g``, ``e``,
  ``mrow``) over key pieces ``((k, v, counts), key row numbers, rel)`` (as
  in ``_fold``). A logit's gradient is ``p (D dp - E)`` (D: the dropout
  multipliers, 1 without)."""
  def body(dq, kvc, kj, rel):
    k, v, c = kvc
    ok = _piece_allowed(qi, kj, rel, n=n, nr=nr, level0=level == 0,
                        causal=causal, own_queries=True)
    # (The weight ``c`` below already zeroes keys that are not real, but
    # without this select (and dk, dv's) dq level 0 with a mask took 0.238
    # ms instead of 0.185 at 65,536 tokens on an H200, and no less
    # without a mask.)
    ok = ok & (c[None, :] > 0)
    k, v = _zeroed(level, masked, c, k, v)
    s = _dot(q, k, precision, trans_b=True) * scale
    p = jnp.where(ok, jnp.exp(jnp.minimum(s - mrow[:, None], 0.0)),
                  0.0) * c[None, :]
    dp = _dot(g, v, precision, trans_b=True)
    keep = _dropout(drop, level, qi[:, None], kj[None, :])
    ds = p * ((dp if keep is None else keep * dp) - e[:, None])
    part = _dot(ds.astype(k.dtype), k, precision)
    return part if dq is None else dq + part

  dq = _over_pieces(pieces, body, loop=False)
  return dq * scale if scaled else dq


def _key_pair(k, v, ck, kj, queries, rel, *, n, level, nr, causal, scale,
              precision, drop):
  """A level's key rows ``k``, ``v`` (counts ``ck``, row numbers ``kj``)
  against query rows ``queries`` = ((q, G, E, M), row numbers) at ``rel``
  (``_piece_allowed``), [keys, queries] each: the weights dv takes
  (thinned by dropout) and the logits' gradient ds (unscaled)."""
  (q, g, e, mrow), qi = queries
  ok = _piece_allowed(kj, qi, rel, n=n, nr=nr, level0=level == 0,
                      causal=causal, own_queries=False)
  ok = ok & (ck[:, None] > 0)
  st = _dot(k, q, precision, trans_b=True) * scale
  p = jnp.where(ok, jnp.exp(jnp.minimum(st - mrow[None, :], 0.0)),
                0.0) * ck[:, None]
  keep = _dropout(drop, level, qi[None, :], kj[:, None])
  dp = _dot(v, g, precision, trans_b=True)
  ds = p * ((dp if keep is None else keep * dp) - e[None, :])
  return (p if keep is None else p * keep), ds


def _dkv_fold(k, v, ck, kj, pieces, *, n, nr, level, causal, scale,
              precision, drop, masked):
  """(dk, dv) (f32) of key rows ``k``, ``v`` (counts ``ck``, row numbers
  ``kj``; zero where not real, ``_zeroed``) over the query pieces that see
  them, ``((q, G, E, M), query row numbers, rel)`` (as in ``_fold``), and
  the pieces' counts last where ``_zeroed`` needs them (level 0 with a
  mask) to zero q and G the same way."""
  def body(carry, rows, qi, rel):
    q, g, e, mrow, *counts = rows
    if counts:
      q, g = _zeroed(level, masked, counts[0], q, g)
    p, ds = _key_pair(k, v, ck, kj, ((q, g, e, mrow), qi), rel, n=n,
                      level=level, nr=nr, causal=causal, scale=scale,
                      precision=precision, drop=drop)
    part_v = _dot(p.astype(g.dtype), g, precision)
    part_k = _dot(ds.astype(q.dtype), q, precision)
    if carry is None:
      return part_k, part_v
    return carry[0] + part_k, carry[1] + part_v

  dk, dv = _over_pieces(pieces, body, loop=False)
  return dk * scale, dv


def _dq_rows(q_ref, k_ref, v_ref, c_ref, g_ref, e_ref, m_ref, parent, cq,
             start, *, nr, tile, n, level, causal, scale, precision, drop,
             masked):
  """(dq,) f32 of a level's rows, plus the parent's (dq,) prolonged.

  With attention dropout (multipliers D on the numerator's weights), a
  logit's gradient is ``p (D dp - E)``: E = dO . O already holds the
  dropped weights."""
  level0 = level == 0
  qi = start + _iota(tile)
  q, g, e, mrow = (r[pl.ds(start, tile)] for r in (q_ref, g_ref, e_ref, m_ref))
  q, g = _zeroed(level, masked, cq, q, g)
  dq = _dq_fold(q, g, e, mrow, qi, _neighbours(
      (k_ref, v_ref, c_ref), start, tile, nr, n, not causal, level0),
                 n=n, nr=nr, level=level, causal=causal, scale=scale,
                 precision=precision, drop=drop, masked=masked)
  return _with_parent_grads((dq,), cq, _query_mode(causal, masked), parent,
                            level)


def _dkv_kernel(*refs, group, has_parent, rate, **kw):
  refs, drop = _with_dropout(refs, rate)
  _run_levels(refs, _dkv_rows, group=group, per_level=7,
              has_parent=has_parent, fills=_PARTS["dkv"][1], drop=drop,
              **kw)


def _dkv_rows(q_ref, k_ref, v_ref, c_ref, g_ref, e_ref, m_ref, parent, ck,
              start, *, nr, tile, n, level, causal, scale, precision, drop,
              masked):
  """(dk, dv) f32 of a level's key rows, plus the parent's prolonged
  (dropout as in ``_dq_rows``)."""
  level0 = level == 0
  kj = start + _iota(tile)
  k, v = k_ref[pl.ds(start, tile)], v_ref[pl.ds(start, tile)]
  k, v = _zeroed(level, masked, ck, k, v)
  # Queries that see these keys: the same rows and a neighbour block on
  # each side (the structure is symmetric in its reach).
  counts = (c_ref,) if level0 and masked else ()
  pieces = _neighbours((q_ref, g_ref, e_ref, m_ref) + counts, start, tile,
                       nr, n, True, level0)
  dk, dv = _dkv_fold(k, v, ck, kj, pieces, n=n, nr=nr, level=level,
                     causal=causal, scale=scale, precision=precision,
                     drop=drop, masked=masked)
  return _with_parent_grads((dk, dv), ck, "mean", parent, level)


# What each kind of level kernel computes: its rows function, and what
# its outputs get on tiles of padding only (``_unless_padding``).
_PARTS = {"fwd": (_fwd_rows, (0.0, _NO_KEY)), "dq": (_dq_rows, (0.0,)),
          "dkv": (_dkv_rows, (0.0, 0.0))}


def _level_specs(m, d, dv, stats=False):
  """A level kernel's specs of one level's inputs (all ``m`` rows of a
  batch element and head): q, k, v, counts and, with ``stats``, the
  backward's G, E, M."""
  specs = [_rows_spec(m, d), _rows_spec(m, d), _rows_spec(m, dv),
           _counts_spec(m)]
  if stats:
    specs += [_rows_spec(m, dv), _vec_spec(m), _vec_spec(m)]
  return specs


def _group_backward(pyramid, stats, first, count, t, parent, *, nr, causal,
                    scale, out_dtypes, precision, interpret, seeds=None,
                    rate=0.0, masked=False):
  """dq, dk, dv of level ``first`` (levels first .. first+count-1 in one
  launch each for dq and for dk/dv, plus the parent's, prolonged)."""
  q, _, v, _ = pyramid[first]
  b, n, h, d = q.shape
  dv_dim = v.shape[-1]
  group = _group(pyramid, first, count, t)
  ns = [m for m, _, _ in group]
  common = dict(group=group, nr=nr, causal=causal,
                has_parent=parent is not None, scale=scale,
                precision=precision, rate=rate, masked=masked)
  grid = _grid(n // t, h, b)
  suffix = f"l{first}" + (f"_{count}" if count > 1 else "")
  # Per level: q, k, v, counts, G, E, M (the kernels' per_level = 7).
  level_args = [x for j in range(count)
                for x in (*pyramid[first + j], *stats[first + j])]

  # The same specs (all rows of a batch element and head) for both kernels.
  seed_specs, seed_args = _seed_inputs(seeds)
  level_args = seed_args + level_args
  in_specs = list(seed_specs)
  for m in ns:
    in_specs += _level_specs(m, d, dv_dim, stats=True)
  args, parent_specs = list(level_args), []
  if parent is not None:
    args.append(parent[0])
    parent_specs = [_rows_spec(ns[-1] // 2, d)]
  dq = _pallas_call(
      functools.partial(_dq_kernel, **common), args,
      in_specs + parent_specs, grid=grid,
      out_specs=_rows_spec(n, d),
      out_shape=jax.ShapeDtypeStruct((b, n, h, d), out_dtypes[0]),
      interpret=interpret,
      compiler_params=_compiler_params(interpret, t, max(d, dv_dim), "dq"),
      name=f"hattn_dq_{suffix}")

  args, parent_specs = list(level_args), []
  if parent is not None:
    args += [parent[1], parent[2]]
    parent_specs = [_rows_spec(ns[-1] // 2, d),
                    _rows_spec(ns[-1] // 2, dv_dim)]
  dk, dv = _pallas_call(
      functools.partial(_dkv_kernel, **common), args,
      in_specs + parent_specs, grid=grid,
      out_specs=[_rows_spec(n, d), _rows_spec(n, dv_dim)],
      out_shape=[jax.ShapeDtypeStruct((b, n, h, d), out_dtypes[1]),
                 jax.ShapeDtypeStruct((b, n, h, dv_dim), out_dtypes[2])],
      interpret=interpret,
      compiler_params=_compiler_params(interpret, t, max(d, dv_dim), "dkv"),
      name=f"hattn_dkv_{suffix}")
  return dq, dk, dv


# ------------------------------------------- a level's backward in one sweep


def _dot_t(a, b, precision):
  """``a.T @ b`` in float32 (dq from a ds of [keys, queries])."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         precision=precision,
                         preferred_element_type=jnp.float32)


def _sweep_offsets(level, causal):
  """The query blocks a level's key block meets, as offsets from it: its
  own (level 0 only), the one after it and, not causal, the one before.
  Ascending: for the query block at the first, this key block is its last
  (the sweep then writes its dq)."""
  own = (0,) if level == 0 else ()
  return ((-1,) if not causal else ()) + own + (1,)


# A query block's dq sum the sweep starts at this key block.
_NEW = object()


def _sweep_kernel(*refs, n, nr, level, run, causal, scale, precision, rate,
                  masked, has_parent, query_mode):
  """dq, dk, dv of ``level`` for the key blocks ``[j0, j0 + run)`` of one
  (batch row, head) and the query blocks of the same rows, in one pass
  over the key blocks (``_sweep_backward``)."""
  refs, drop = _with_dropout(refs, rate)
  q_ref, k_ref, v_ref, c_ref, g_ref, e_ref, m_ref = refs[:7]
  # The parent level's dq, dk, dv (or None each).
  pdq, pdk, pdv = refs[7:10] if has_parent else (None,) * 3
  dq_ref, dk_ref, dv_ref = refs[-3:]
  j0 = _tile_id() * run
  offs = _sweep_offsets(level, causal)
  # Open dq sums: query blocks j + o, o in [lo, hi), whose first key block
  # came before key block j and whose last comes at or after it.
  lo, hi = offs[0], offs[-1]

  def queries(j, o):
    """Query block ``j + o`` (possibly outside the level, then clamped and
    masked: ``_neighbours``): ((q, G, E, M), row numbers) and its ``rel``
    to key block ``j``."""
    read = _neighbours((q_ref, g_ref, e_ref, m_ref, c_ref), j * nr, nr, nr,
                       n, True, True)[0]
    (q, g, e, mrow, cq), qi, rel = read(o * nr, nr)
    q, g = _zeroed(level, masked, cq, q, g)
    return ((q, g, e, mrow), qi), rel

  def finish(ref, parent, share, start, x):
    """A block's gradient, plus its parent's prolonged, written at rows
    ``start``. (The counts are read again: keeping the key block's in
    registers until its dk and dv are written spilled more, 552 against
    488 bytes at blocks of 64 by ``scripts/kernel_registers.py``.)"""
    c = c_ref[pl.ds(start, nr)]
    if parent is not None:
      parent = (_repeat(parent[pl.ds(start // 2, nr // 2)], 2),)
    x, = _with_parent_grads((x,), c, share, parent, level)
    ref[pl.ds(start, nr)] = x.astype(ref.dtype)

  def finish_dq(i, dq):
    finish(dq_ref, pdq, query_mode, i * nr, dq * scale)

  def step(j, carry):
    """Key block ``j``: its dk, dv written; ``carry`` the open dq sums
    (None: a query block before this program's), returned for key block
    ``j + 1``."""
    start = j * nr
    k, v, ck = (r[pl.ds(start, nr)] for r in (k_ref, v_ref, c_ref))
    k, v = _zeroed(level, masked, ck, k, v)
    kj = start + _iota(nr)
    dk = dv = None
    sums = dict(zip(range(lo, hi), carry))
    add = lambda acc, part: part if acc is None else acc + part
    for o in offs:
      rows, rel = queries(j, o)
      p, ds = _key_pair(
          k, v, ck, kj, rows, rel, n=n, level=level, nr=nr,
          causal=causal, scale=scale, precision=precision, drop=drop)
      (q, g, _, _), _ = rows
      # dv and dk written as soon as their last part is in (fewer
      # registers live for the rest of the step).
      dv = add(dv, _dot(p.astype(g.dtype), g, precision))
      if o == hi:
        finish(dv_ref, pdv, "mean", start, dv)
      dk = add(dk, _dot(ds.astype(q.dtype), q, precision))
      if o == hi:
        finish(dk_ref, pdk, "mean", start, dk * scale)
      add_dq(j, o, ds, k, sums)
    return tuple(sums[o + 1] for o in range(lo, hi))

  def add_dq(j, o, ds, k, sums):
    """Adds the pair's part to query block ``j + o``'s dq sum (in
    ``sums``), or writes the sum where this is its last key block."""
    prior = sums.get(o, _NEW)
    if prior is None:
      return  # The previous program's query block.
    part_q = _dot_t(ds.astype(k.dtype), k, precision)
    dq = part_q if prior is _NEW else prior + part_q
    if o != lo:
      sums[o] = dq
    elif lo > 0:  # Causal, coarse: the last key block's is the next
      # program's query block.
      pl.when(j + lo < j0 + run)(lambda: finish_dq(j + lo, dq))
    else:  # Its last key block: done.
      finish_dq(j + lo, dq)

  def halo(i, piece):
    """dq (unscaled) of query block ``i`` from the key block at ``piece``
    (0: the block before it, -1: the block after it), another program's."""
    start = i * nr
    (q, g, e, mrow), _ = queries(i, 0)[0]
    read, pieces = _neighbours((k_ref, v_ref, c_ref), start, nr, nr, n,
                               not causal, level == 0)
    return _dq_fold(q, g, e, mrow, start + _iota(nr), (read, [pieces[piece]]),
                    n=n, nr=nr, level=level, causal=causal, scale=scale,
                    precision=precision, drop=drop, masked=masked,
                    scaled=False)

  # This program's query blocks that meet the key block before j0 (hi <=
  # 1: only j0): open, or (causal, coarse) done with it alone.
  if lo > 0:
    finish_dq(j0, halo(j0, 0))
  carry = tuple(None if o < 0 else halo(j0, 0) for o in range(lo, hi))
  carry = step(j0, carry)
  carry = lax.fori_loop(j0 + 1, j0 + run, step, carry)
  # The query blocks still open are this program's last (offset -1 from
  # the key block after the run): add the next program's key block.
  for o, dq in zip(range(lo, hi), carry):
    if o < 0:
      last = j0 + run + o
      finish_dq(last, dq + halo(last, -1))


def _sweep_run(blocks, batch_heads):
  """Key blocks per program of a sweep over ``blocks`` key blocks of each
  of ``batch_heads`` (batch row, head) pairs: ``TUNING["sweep_blocks"]``
  (at most ``blocks``), halved while the launch would have fewer than
  ``TUNING["sweep_programs"]`` programs, down to 1."""
  run = min(blocks, TUNING.get("sweep_blocks", 16))
  while run > 1 and blocks // run * batch_heads < TUNING.get(
      "sweep_programs", 0):
    run //= 2
  return run


def _sweep_backward(arrays, stats, parent, *, level, nr, causal, scale,
                    out_dtypes, precision, interpret, seeds=None, rate=0.0,
                    masked=False):
  """A level's dq, dk, dv in one launch (level 0: ``TUNING
  ["backward_l0_impl"] = "sweep"``; coarser levels: ``["sweep_levels"]``):
  each program walks ``_sweep_run`` consecutive key blocks of one (batch
  row, head) and, for each, the query blocks it meets
  (``_sweep_offsets``: at level 0 itself and a neighbour on each side),
  forming every pair's logits once: the pair's ds gives dk and dv of the
  key block and a part of the query block's dq, which the program keeps
  in registers until the query block's last key block has passed. Five
  products per pair instead of the two kernels' seven, and q, k, v and
  dO's statistics read by one program. Only the pairs of the first query
  block with the key block before it (and, not causal, of the last with
  the key block after it) belong to neighbouring programs: those are
  formed again for dq alone."""
  q, k, v, c = arrays
  b, n, h, d = q.shape
  dv_dim = v.shape[-1]
  blocks = n // nr
  run = _sweep_run(blocks, b * h)
  in_specs, args = _seed_inputs(seeds)
  in_specs += _level_specs(n, d, dv_dim, stats=True)
  args += [*arrays, *stats]
  if parent is not None:
    in_specs += [_rows_spec(n // 2, d), _rows_spec(n // 2, d),
                 _rows_spec(n // 2, dv_dim)]
    args += list(parent)
  kernel = functools.partial(
      _sweep_kernel, n=n, nr=nr, level=level, run=run, causal=causal,
      scale=scale, precision=precision, rate=rate, masked=masked,
      has_parent=parent is not None, query_mode=_query_mode(causal, masked))
  return _pallas_call(
      kernel, args, in_specs, grid=_grid(blocks // run, h, b),
      out_specs=[_rows_spec(n, d), _rows_spec(n, d), _rows_spec(n, dv_dim)],
      out_shape=[jax.ShapeDtypeStruct((b, n, h, w), t)
                 for w, t in zip((d, d, dv_dim), out_dtypes)],
      interpret=interpret,
      compiler_params=_compiler_params(interpret, nr, max(d, dv_dim),
                                       "dkv"),
      name=f"hattn_dqkv_l{level}")


# ------------------------------------------------- the coarse tail at once


def _tail_first(n, levels, causal, masked, batch_heads):
  """The first level of the coarse tail (``TUNING["tail_rows"]``), or
  ``levels`` where there is none.

  The tail is the levels of at most ``tail_rows`` rows over all
  ``batch_heads`` (batch rows times heads; from level 1 on, at least two
  levels). They run together: one launch for their forward
  and one for their dq, dk and dv, each level on its own (no parent),
  then one merge kernel per pass gives the tail's finest level what the
  level-by-level chain gives it (``_merge_fwd_kernel``,
  ``_merge_bwd_kernel``). The smallest levels' launches are a fraction of
  a wave each and cost one program's latency; the tail pays it twice
  per pass instead of once per level. Causal with a mask there is no
  tail: queries are coarsened by their first real token, a chain of
  selections the merge does not write as one weight.
  """
  rows = TUNING.get("tail_rows") or 0
  if not rows or (causal and masked):
    return levels
  first = 1
  while first < levels and batch_heads * (n >> first) > rows:
    first += 1
  return first if levels - first >= 2 else levels


def _tail_levels(pyramid, first, tile):
  """(rows, tile rows, level) of the tail's levels, finest first."""
  return tuple((pyramid[j][0].shape[1],
                min(_tile_at(j, tile), pyramid[j][0].shape[1]), j)
               for j in range(first, len(pyramid)))


def _tail_kernel(*refs, levels, parts, per_level, rate, **kw):
  """Programs of several levels and parts in one launch.

  The tile ids count the tiles of each part (``parts``: "fwd", or "dq"
  and "dkv") at each level (``levels``: (n, t, level), finest first) in
  turn; each program runs its level's rows function without a parent.
  ``refs``: per level ``per_level`` inputs, then each part's outputs at
  each level (f32: the merge rounds once)."""
  refs, drop = _with_dropout(refs, rate)
  count = len(levels)
  ins = [refs[per_level * j:per_level * (j + 1)] for j in range(count)]
  outs = list(refs[per_level * count:])
  ti = _tile_id()
  first_tile = 0
  for part in parts:
    rows_fn, fills = _PARTS[part]
    for j, (n, t, level) in enumerate(levels):
      level_outs, outs = outs[:len(fills)], outs[len(fills):]

      @pl.when((ti >= first_tile) & (ti < first_tile + n // t))
      def _(rows_fn=rows_fn, fills=fills, level_refs=ins[j],
            level_outs=level_outs, first_tile=first_tile, n=n, t=t,
            level=level):
        start = (ti - first_tile) * t
        at = pl.ds(start, t)

        def compute():
          res = rows_fn(*level_refs, None, level_refs[3][at], start, tile=t,
                        n=n, level=level, drop=drop, **kw)
          for ref, x in zip(level_outs, res):
            ref[at] = x.astype(ref.dtype)

        _unless_padding(level_refs[3][at], compute,
                        list(zip(level_outs, fills)), at=at)

      first_tile += n // t


def _tail_launch(parts, levels, level_args, level_specs, outs, *, b, h,
                 width, kind, name, seeds, rate, interpret, **kw):
  """One launch of ``_tail_kernel``; ``outs``: (spec, shape) of each
  output, in the kernel's order."""
  seed_specs, seed_args = _seed_inputs(seeds)
  tiles = len(parts) * sum(n // t for n, t, _ in levels)
  return _pallas_call(
      functools.partial(_tail_kernel, levels=levels, parts=parts,
                        per_level=len(level_specs[0]), rate=rate, **kw),
      [*seed_args, *level_args],
      seed_specs + [s for specs in level_specs for s in specs],
      grid=_grid(tiles, h, b),
      out_specs=[spec for spec, _ in outs],
      out_shape=[shape for _, shape in outs], interpret=interpret,
      compiler_params=_compiler_params(
          interpret, max(t for _, t, _ in levels), width, kind),
      name=name)


def _ancestors(ref, start, tm, shift):
  """Rows ``[start, start + tm)`` of a level from the level ``shift``
  coarser (``ref``): each coarse row repeated for its 2**shift
  descendants."""
  rows = max(1, tm >> shift)
  x = ref[pl.ds(start >> shift, rows)]
  return x if rows == tm else _repeat(x, tm // rows)


# Rows per program of the tail's merge kernels at head width 64 (fewer
# when wider), on 4 warps (the level kernels' rule): on one warp the
# backward's three [64, 64] float32 sums spilled (0.123 ms at 65,536
# tokens on an H200, against 0.026 for the whole tail's dq, dk and dv).
_MERGE_ROWS = 64


def _merge_fwd_kernel(*refs, count, tm):
  """The tail's finest level's (o, lse): every tail level's own (o, lse)
  at the rows' ancestors, merged by their log-normalisers (what the chain
  of parents gives, without its roundings between levels)."""
  ins, (o_ref, lse_ref) = refs[:2 * count], refs[2 * count:]
  start = _tile_id() * tm
  m = jnp.full((tm,), _NO_KEY, jnp.float32)
  z, y = jnp.zeros((tm,), jnp.float32), None
  for j in reversed(range(count)):  # Coarsest first, as the chain.
    o = _ancestors(ins[2 * j], start, tm, j).astype(jnp.float32)
    m, z, y = _with_parent(m, z, y, o, _ancestors(ins[2 * j + 1], start,
                                                   tm, j))
  o, lse = _normalised(m, z, y)
  at = pl.ds(start, tm)
  o_ref[at] = o.astype(o_ref.dtype)
  lse_ref[at] = lse


def _merge_bwd_kernel(*refs, count, tm, query_mode):
  """The tail's finest level's dq, dk, dv: its own plus every coarser tail
  level's own at the rows' ancestors, each times the product of the
  coarsening weights down to the row (``_prolong_weight`` chained): the
  rows' count over the ancestor's for means, for the first child at every
  step 1 where the row is its ancestor's first."""
  ins, outs = refs[:4 * count], refs[4 * count:]
  start = _tile_id() * tm
  at = pl.ds(start, tm)
  c = ins[0][at]
  total = [ins[1 + i][at].astype(jnp.float32) for i in range(3)]
  for j in range(1, count):
    cj = _ancestors(ins[4 * j], start, tm, j)
    w_mean = jnp.where(cj > 0, c / jnp.where(cj > 0, cj, 1.0), 0.0)
    if query_mode == "mean":
      w_q = w_mean
    else:  # "first"
      w_q = (((start + _iota(tm)) & ((1 << j) - 1)) == 0).astype(jnp.float32)
    for i, w in enumerate((w_q, w_mean, w_mean)):
      x = _ancestors(ins[4 * j + 1 + i], start, tm, j).astype(jnp.float32)
      total[i] = total[i] + w[:, None] * x
  for ref, x in zip(outs, total):
    ref[at] = x.astype(ref.dtype)


def _merge_launch(kernel, levels, in_specs, outs, args, *, b, h, width,
                  interpret, name, **kw):
  """One launch of a merge kernel over the tail's finest level's rows;
  ``outs``: (spec, shape) of each output."""
  n = levels[0][0]
  # 64 rows of 64 elements, 32 of 128 (4 warps either way).
  tm = min(_MERGE_ROWS, n, max(1, _MERGE_ROWS * 64 // width))
  return _pallas_call(
      functools.partial(kernel, count=len(levels), tm=tm, **kw), args,
      in_specs, grid=_grid(n // tm, h, b),
      out_specs=[spec for spec, _ in outs],
      out_shape=[shape for _, shape in outs], interpret=interpret,
      compiler_params=_compiler_params(interpret, tm, width),
      name=name)


def _tail_forward(pyramid, first, tile, *, out_dtype, seeds, rate,
                  interpret, **kw):
  """(o, lse) of level ``first`` from the tail ``first ..``: the forward
  of every tail level in one launch, then the merge."""
  q, _, v, _ = pyramid[first]
  b, _, h, d = q.shape
  dv = v.shape[-1]
  levels = _tail_levels(pyramid, first, tile)
  own = _tail_launch(
      ("fwd",), levels, [x for j in range(first, len(pyramid))
                         for x in pyramid[j]],
      [_level_specs(n, d, dv) for n, _, _ in levels],
      [x for n, _, _ in levels
       for x in ((_rows_spec(n, dv), _f32(b, n, h, dv)),
                 (_vec_spec(n), _f32(b, h, n)))],
      b=b, h=h, width=max(d, dv), kind=None, name=f"hattn_fwd_tail_l{first}",
      seeds=seeds, rate=rate, interpret=interpret, **kw)
  n = levels[0][0]
  return _merge_launch(
      _merge_fwd_kernel, levels,
      [s for m, _, _ in levels for s in (_rows_spec(m, dv), _vec_spec(m))],
      [(_rows_spec(n, dv), jax.ShapeDtypeStruct((b, n, h, dv), out_dtype)),
       (_vec_spec(n), _f32(b, h, n))], own, b=b, h=h, width=dv,
      interpret=interpret, name=f"hattn_fwd_merge_l{first}")


def _tail_backward(pyramid, stats, first, tile, *, out_dtypes, seeds, rate,
                   interpret, query_mode, **kw):
  """dq, dk, dv of level ``first`` from the tail ``first ..``: every tail
  level's own in one launch, then the merge."""
  q, _, v, _ = pyramid[first]
  b, _, h, d = q.shape
  dv = v.shape[-1]
  levels = _tail_levels(pyramid, first, tile)
  count = len(levels)
  outs = ([(_rows_spec(n, d), _f32(b, n, h, d)) for n, _, _ in levels]
          + [x for n, _, _ in levels
             for x in ((_rows_spec(n, d), _f32(b, n, h, d)),
                       (_rows_spec(n, dv), _f32(b, n, h, dv)))])
  own = _tail_launch(
      ("dq", "dkv"), levels, [x for j in range(first, len(pyramid))
                              for x in (*pyramid[j], *stats[j])],
      [_level_specs(n, d, dv, stats=True) for n, _, _ in levels], outs,
      b=b, h=h, width=max(d, dv), kind="dkv",
      name=f"hattn_bwd_tail_l{first}", seeds=seeds, rate=rate,
      interpret=interpret, **kw)
  dqs, dks, dvs = own[:count], own[count::2], own[count + 1::2]
  n = levels[0][0]
  return _merge_launch(
      _merge_bwd_kernel, levels,
      [s for m, _, _ in levels for s in (_counts_spec(m), _rows_spec(m, d),
                                         _rows_spec(m, d), _rows_spec(m, dv))],
      [(_rows_spec(n, w), jax.ShapeDtypeStruct((b, n, h, w), dt))
       for w, dt in zip((d, d, dv), out_dtypes)],
      [x for j in range(count) for x in (pyramid[first + j][3], dqs[j],
                                         dks[j], dvs[j])],
      b=b, h=h, width=max(d, dv), interpret=interpret,
      name=f"hattn_bwd_merge_l{first}", query_mode=query_mode)


# ------------------------------------------------------- pyramid and VJP


# Levels a coarsening program reduces in one pass (its rows: 2**this).
_CHUNK_LEVELS = 6


def _chunks(levels):
  """(base level, number of levels) of the coarsening passes."""
  out, base = [], 0
  while base < levels - 1:
    count = min(_CHUNK_LEVELS, levels - 1 - base)
    out.append((base, count))
    base += count
  return out


def _pairs(x):
  """[2m, ...] -> [m, 2, ...]."""
  return x.reshape((x.shape[0] // 2, 2) + x.shape[1:])


def _iota2(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _coarse_weights(c, level, rows, mode):
  """(W [rows, R] float32, the groups' counts [rows] or None) of the
  product ``W @ x`` that forms the first ``rows`` coarse rows at ``level``
  (groups of ``2**level``) of R rows with counts ``c`` [R], as
  ``_query_mode`` names them: a row's count for the sums of the mean
  ("mean"), 1 at the group's first row ("first"; no counts) or at its
  first row with a real token ("first_real"; none in a group without
  one). Integers, exact in any input dtype."""
  r = c.shape[0]
  coarse, fine = _iota2((rows, r), 0), _iota2((rows, r), 1)
  if mode == "first":
    return (fine == coarse << level).astype(jnp.float32), None
  group = jnp.where((fine >> level) == coarse, c[None, :], 0.0)
  counts = jnp.sum(group, axis=1)
  if mode == "first_real":
    first = jnp.min(jnp.where(group > 0, fine, r), axis=1)
    return (fine == first[:, None]).astype(jnp.float32), counts
  return group, counts


def _coarsen_kernel(*refs, count, modes, precision=None):
  """Levels base+1 .. base+count of several [rows, D] arrays at once.

  Each level's float32 sums of real tokens (and their counts, for the mean)
  come from the level below by pair sums. With ``precision`` (TUNING
  ``coarsen_impl="dot"``) a level of ``r >= 16`` rows (the smallest
  product) is instead one product ``W @ x`` of the tile's ``R`` rows, with
  ``W[r, i]`` the weight of row ``i`` in coarse row ``r`` (its count if
  ``i >> j == r``, for the mean; 1 at the first ``i`` with ``i >> j == r``
  and a real token, for the causal queries):
  on the tensor cores and without regrouping the rows in registers. Same
  sums up to the order of float32 additions: the weights are integers,
  exact in the inputs' dtype (the caller checks).
  """
  c_ref, in_refs = refs[0], refs[1:1 + len(modes)]
  out_refs = refs[1 + len(modes):]
  c = c_ref[...]
  rows = c.shape[0]

  def compute():
    for t, (x_ref, mode) in enumerate(zip(in_refs, modes)):
      x = x_ref[...]
      x = jnp.where(c[:, None] > 0, x, jnp.zeros_like(x))
      s, cs = None, None  # sums and counts of the level last computed
      for j in range(1, count + 1):
        r = rows >> j
        if precision is not None and r >= 16:
          w, counts = _coarse_weights(c, j, r, mode)
          if counts is not None:
            cs = counts
          s = _dot(w.astype(x.dtype), x, precision)
        else:
          if s is None:  # The sums of the tile's own rows.
            s, cs = x.astype(jnp.float32), c
            if mode == "mean":
              s = s * c[:, None]
          if mode == "first":
            s = _first_of_pairs(s)
          elif mode == "first_real":
            s, cs = _first_real_of_pairs(s, cs)
          else:
            s = jnp.sum(_pairs(s), axis=1)
            cs = jnp.sum(_pairs(cs), axis=1)
        out = s if mode != "mean" else s / jnp.maximum(cs, 1.0)[:, None]
        o_ref = out_refs[t * count + j - 1]
        o_ref[...] = out.astype(o_ref.dtype)

  # Rows of padding only coarsen to zeros (what compute gives them); their
  # q, k and v are not read.
  _unless_padding(c, compute, [(o, 0.0) for o in out_refs])


def _coarsen_heads(h: int) -> int:
  """Heads per pyramid program: the largest power of two that divides h
  and is at most TUNING's (block widths must be powers of two)."""
  want = max(1, int(TUNING.get("coarsen_heads") or 1))
  g = 1
  while 2 * g <= want and h % (2 * g) == 0:
    g *= 2
  return g


def _coarsen_rows(n: int, count: int) -> int:
  """Rows per pyramid program: TUNING's (a power of two) where it divides
  the level's n, else 2**count (which always does)."""
  want = int(TUNING.get("coarsen_rows") or 0)
  rows = 2**count
  while 2 * rows <= min(want, n) and n % (2 * rows) == 0:
    rows *= 2
  return rows


def _coarsen_xla(arrays, modes, c, count):
  """``_coarsen`` as XLA reductions: float32 sums carried level to level."""
  b = c.shape[0]
  pairs = lambda x: x.reshape((b, x.shape[1] // 2, 2) + x.shape[2:])
  out = []
  for x, mode in zip(arrays, modes):
    real = c[:, :, None, None] > 0
    s = jnp.where(real, x, jnp.zeros_like(x)).astype(jnp.float32)
    if mode == "mean":
      s = s * c[:, :, None, None]
    cs, levels = c, []
    for _ in range(count):
      if mode == "first":
        s = s[:, ::2]
        levels.append(s.astype(x.dtype))
      elif mode == "first_real":  # each pair's first row with a real token
        take_first = (pairs(cs)[:, :, 0] > 0)[:, :, None, None]
        s = jnp.where(take_first, pairs(s)[:, :, 0], pairs(s)[:, :, 1])
        cs = pairs(cs).sum(axis=2)
        levels.append(s.astype(x.dtype))
      else:
        s, cs = pairs(s).sum(axis=2), pairs(cs).sum(axis=2)
        levels.append((s / jnp.maximum(cs, 1.0)[:, :, None, None])
                      .astype(x.dtype))
    out.append(levels)
  return out


# The largest count whose integers up to it a dtype holds exactly.
_EXACT_INTS = {jnp.dtype(jnp.bfloat16): 256, jnp.dtype(jnp.float16): 2048}


def _coarsen(arrays, modes, c, count, interpret, base=0, impl=None):
  """Next ``count`` levels of each [B, n, H, D] array (counts c [B, n]) of
  level ``base``.

  Each array is viewed as [B, n, H*D] (free: rows are contiguous), and a
  program reduces a [2**count, hp*D] block, hp heads side by side (the
  reduction is per column, the counts per row). ``impl``: TUNING's
  ``coarsen_impl`` unless given.
  """
  impl = impl or coarsen_impl(interpret)
  if impl == "xla":
    return _coarsen_xla(arrays, modes, _array(c), count)
  if impl == "mosaic":
    return _coarsen_mosaic(arrays, modes, c, count, interpret, base)
  b, n, h = arrays[0].shape[:3]
  hp = _coarsen_heads(h)
  rows = _coarsen_rows(n, count)
  dtype = jnp.dtype(arrays[0].dtype)
  precision = None  # "pallas", or counts the dtype does not hold exactly
  # (a level-``base`` row counts up to 2**base tokens): pair sums only.
  if impl == "dot" and 2**base <= _EXACT_INTS.get(dtype, 2**24):
    precision = (lax.Precision.HIGHEST if dtype == jnp.float32
                 else lax.Precision.DEFAULT)
  kernel = functools.partial(_coarsen_kernel, count=count,
                             modes=tuple(modes), precision=precision)
  grid = _grid(n // rows, h // hp, b)
  in_specs = [pl.BlockSpec((None, rows), _ids(lambda i, j, k: (k, i)))]
  out_specs, out_shape, flat = [], [], []
  for x in arrays:
    width = hp * x.shape[-1]
    flat.append(x.reshape(b, n, h * x.shape[-1]))
    in_specs.append(pl.BlockSpec((None, rows, width),
                                 _ids(lambda i, j, k: (k, i, j))))
    for level in range(1, count + 1):
      out_specs.append(pl.BlockSpec((None, rows >> level, width),
                                    _ids(lambda i, j, k: (k, i, j))))
      out_shape.append(jax.ShapeDtypeStruct(
          (b, n >> level, h * x.shape[-1]), x.dtype))
  outs = _pallas_call(
      kernel, [c, *flat], in_specs, grid=grid, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=_compiler_params(
          interpret, rows, hp * max(x.shape[-1] for x in arrays),
          kind="pyramid"),
      name="hattn_coarsen")
  shaped = [o.reshape(o.shape[0], o.shape[1], h, -1) for o in outs]
  return [shaped[t * count:(t + 1) * count] for t in range(len(arrays))]


# Levels per Mosaic GPU pass where ``TUNING["pyramid_pass"]``'s do not fit,
# and its rows per block: a pass reads blocks of [64, D] rows 2**levels
# apart (``mosaic.coarsen``).
_MOSAIC_PASS, _MOSAIC_ROWS = 2, 64


def _mosaic_pass(arrays, modes, left, counts=True):
  """(levels, output slots per width) of the next Mosaic GPU pyramid pass
  over ``arrays`` with ``left`` levels to make: ``TUNING["pyramid_pass"]``
  levels where the length and shared memory allow them, else two, each
  width (q and k may differ from v) with two output slots where they fit
  beside ``TUNING["pyramid_stages"]`` steps of input blocks (and their
  counts, unless ``counts`` is False: ``Uniform`` counts, which the pass
  takes as a number: 16-bit rows of 128 then take two slots), else one;
  None where no such pass fits (the "dot" kernel's turn)."""
  from htransformer.attention import mosaic  # Only where it is chosen.
  n = arrays[0].shape[1]
  widths = [[i for i, x in enumerate(arrays) if x.shape[-1] == w]
            for w in sorted({x.shape[-1] for x in arrays})]
  most = TUNING.get("pyramid_pass", _MOSAIC_PASS)
  stages = TUNING.get("pyramid_stages", 2)
  for step in dict.fromkeys((min(most, left), min(_MOSAIC_PASS, left))):
    slots = [next((s for s in (2, 1) if mosaic.coarsen_smem(
        [arrays[i] for i in ids], [modes[i] for i in ids], step,
        rows=_MOSAIC_ROWS, stages=stages, out_slots=s, counts=counts)
                   <= mosaic.SMEM_BYTES), 0) for ids in widths]
    if not n % (_MOSAIC_ROWS << step) and all(slots):
      return step, list(zip(widths, slots))
  return None


def _mosaic_passes(arrays, modes, count, counts=True):
  """The Mosaic GPU passes ``_coarsen_mosaic`` makes of the next ``count``
  levels of ``arrays`` (their shapes and dtypes are enough): a list of
  ``_mosaic_pass``'s (levels, [(array indices, output slots)]), one per
  pass, each from the last's coarsest level, and how many levels are left
  to the "dot" kernel after them (no pass fits those)."""
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
  passes, done = [], 0
  while done < count:
    chosen = _mosaic_pass(shapes, modes, count - done, counts)
    if chosen is None:
      break
    passes.append(chosen)
    done += chosen[0]
    shapes = [jax.ShapeDtypeStruct(
        (x.shape[0], x.shape[1] >> chosen[0]) + x.shape[2:], x.dtype)
              for x in shapes]
  return passes, count - done


def _coarsen_mosaic(arrays, modes, c, count, interpret, base):
  """``_coarsen`` in Mosaic GPU passes (``_mosaic_passes``: two levels, or
  ``TUNING["pyramid_pass"]``), each from the last; what no pass fits
  (fewer than 4 x 64 rows, or blocks too large for shared memory: float32
  rows of 128) by the "dot" kernel."""
  from htransformer.attention import mosaic  # Only where it is chosen.
  levels = [[] for _ in arrays]
  passes, rest = _mosaic_passes(arrays, modes, count,
                                counts=not isinstance(c, Uniform))
  for step, launches in passes:
    new = [None] * len(arrays)
    for ids, out_slots in launches:  # One launch per width.
      out = mosaic.coarsen([arrays[i] for i in ids], [modes[i] for i in ids],
                           _mosaic_counts(c), step, rows=_MOSAIC_ROWS,
                           out_slots=out_slots,
                           stages=TUNING.get("pyramid_stages", 2),
                           interpret=interpret)
      for i, more in zip(ids, out):
        new[i] = more
    for done, more in zip(levels, new):
      done += more
    arrays = [more[-1] for more in new]
    c = _coarser_counts(c, step)
    base += step
  if rest:
    more = _coarsen(arrays, modes, c, rest, interpret, base, impl="dot")
    levels = [done + m for done, m in zip(levels, more)]
  return levels


def pyramid_plan(shape, dtype, block_size, *, value_dim=None, causal=False,
                 uniform=True, interpret=False) -> list[str]:
  """How the forward's pyramid of q, k and v ([B, n, H, D] after the
  kernels' padding of n and D; v of ``value_dim``, else D) is built under
  the current ``TUNING``, one entry per launch group: "mosaic L (slots
  S)" for a Mosaic GPU pass of L levels (S: its output slots, per width),
  else the implementation and its levels, e.g. "dot 2". ``uniform``: the
  counts are a number (no mask, no padding). What ``scripts/
  profile_kernels.py`` reports with each setting: whether a pass of
  ``pyramid_pass`` levels, or ``pyramid_stages`` steps, fits is decided
  by shared memory, and where neither fits the pyramid takes other
  kernels."""
  b, n, h, d = shape
  levels = int(round(math.log2(n // block_size)))
  impl = coarsen_impl(interpret)
  modes = [_query_mode(causal, not uniform), "mean", "mean"]
  plan = []
  for base, count in _chunks(levels):
    if impl != "mosaic":
      plan.append(f"{impl} {count}")
      continue
    rows = n >> base
    arrays = [jax.ShapeDtypeStruct((b, rows, h, width), dtype)
              for width in (d, d, value_dim or d)]
    passes, rest = _mosaic_passes(arrays, modes, count, counts=not uniform)
    plan += [f"mosaic {step} (slots {'/'.join(str(s) for _, s in launches)})"
             for step, launches in passes]
    if rest:
      plan.append(f"dot {rest}")
  return plan


def _level_counts(c0, levels):
  """Real-token counts [B, n >> l] of levels l = 0 .. levels-1."""
  counts = [c0]
  for _ in range(1, levels):
    counts.append(_coarser_counts(counts[-1]))
  return counts


def _query_mode(causal, masked):
  """How the pyramid coarsens queries: by the mean of the real ones;
  causal, by the group's first query ("first"), or, where a mask may leave
  holes, by the first real one ("first_real": a select per pair, which
  costs the causal forward about 4% at 65,536 tokens; without a mask the
  only padding is at the end, where the two agree)."""
  if not causal:
    return "mean"
  return "first_real" if masked else "first"


def _pyramid(q, k, v, c0, levels, causal, interpret, masked=True):
  """Per-level (q, k, v, counts), level 0 first."""
  counts = _level_counts(c0, levels)
  qs, ks, vs = [q], [k], [v]
  for base, count in _chunks(levels):
    nq, nk, nv = _coarsen([qs[base], ks[base], vs[base]],
                          [_query_mode(causal, masked), "mean", "mean"],
                          counts[base], count, interpret, base)
    qs += nq
    ks += nk
    vs += nv
  return list(zip(qs, ks, vs, counts))


def _restrict_kernel(g_ref, e_ref, m_ref, c_ref, *out_refs, count,
                     from_output):
  """(G, E, M) of levels base+1 .. base+count; see the module doc.
  ``from_output``: e_ref and m_ref hold the output O and its lse, and the
  first two outputs get the base level's E = dO . O and M (level 0: dO
  read once, not by XLA too)."""
  c = c_ref[...]
  head = out_refs[:2] if from_output else ()  # E, M of the base level
  out_refs = out_refs[len(head):]

  def compute():
    live = c > 0
    g = g_ref[...]
    g = jnp.where(live[:, None], g, jnp.zeros_like(g)).astype(jnp.float32)
    if from_output:
      e = jnp.where(live, jnp.sum(g * e_ref[...].astype(jnp.float32), -1),
                    0.0)
      m = jnp.where(live, m_ref[...], _NO_ROW)
      head[0][...] = e
      head[1][...] = m
    else:
      e, m = e_ref[...], m_ref[...]
    for j in range(count):
      m2 = _pairs(m)
      m = jnp.min(m2, axis=1)
      w = jnp.where(m2 < 0.5 * _NO_ROW, jnp.exp(m[:, None] - m2), 0.0)
      g = jnp.sum(_pairs(g) * w[:, :, None], axis=1)
      e = jnp.sum(_pairs(e) * w, axis=1)
      g_out, e_out, m_out = out_refs[3 * j:3 * j + 3]
      g_out[...] = g.astype(g_out.dtype)
      e_out[...] = e
      m_out[...] = m

  # Rows of padding only restrict to no gradient (G = E = 0, M = _NO_ROW),
  # what compute gives them.
  _unless_padding(c, compute, list(zip(head, (0.0, _NO_ROW))) + [
      (ref, fill) for j in range(count)
      for ref, fill in zip(out_refs[3 * j:3 * j + 3], (0.0, 0.0, _NO_ROW))])


def _restrict(g, e, mrow, c, count, interpret, from_output=False):
  """The next ``count`` levels of (G, E, M): g [B, n, H, Dv], e, m [B, H, n].
  ``from_output``: e is the output O [B, n, H, Dv] and mrow its lse; the
  list starts with the base level's (g, E, M), E and M computed from them."""
  b, n, h, dv = g.shape
  rows = 2**count
  grid = _grid(n // rows, h, b)
  rows_spec = lambda r: pl.BlockSpec((None, r, None, dv),
                                     _ids(lambda i, j, k: (k, i, j, 0)))
  vec_spec = lambda r: pl.BlockSpec((None, None, r),
                                    _ids(lambda i, j, k: (k, j, i)))
  in_specs = [rows_spec(rows), rows_spec(rows) if from_output else
              vec_spec(rows), vec_spec(rows),
              pl.BlockSpec((None, rows), _ids(lambda i, j, k: (k, i)))]
  out_specs, out_shape = [], []
  for level in range(0 if from_output else 1, count + 1):
    r, m = rows >> level, n >> level
    if level:  # G (the base level's is g)
      out_specs.append(rows_spec(r))
      out_shape.append(jax.ShapeDtypeStruct((b, m, h, dv), g.dtype))
    out_specs += [vec_spec(r)] * 2  # E, M
    out_shape += [_f32(b, h, m)] * 2
  outs = _pallas_call(
      functools.partial(_restrict_kernel, count=count,
                        from_output=from_output), [g, e, mrow, c], in_specs,
      grid=grid, out_specs=out_specs, out_shape=out_shape,
      interpret=interpret,
      compiler_params=_compiler_params(interpret, rows, dv, kind="pyramid"),
      name="hattn_restrict")
  head = [(g, *outs[:2])] if from_output else []
  outs = outs[2:] if from_output else outs
  return head + [tuple(outs[3 * j:3 * j + 3]) for j in range(count)]


@functools.partial(jax.custom_vjp,
                   nondiff_argnums=(5, 6, 7, 8, 9, 10, 11, 12, 13))
def _attention(q, k, v, c0, seeds, nr, causal, tile, interpret, precision,
               per_launch, scale, rate, masked):
  return _forward(q, k, v, c0, seeds, nr, causal, tile, interpret,
                  precision, per_launch, scale, rate, masked)[0]


def _handover_dtype(input_dtype):
  """dtype of what a coarse level hands to the next finer level."""
  if TUNING.get("handover_dtype", "input") == "input":
    return input_dtype
  return jnp.float32


def _forward(q, k, v, c0, seeds, nr, causal, tile, interpret, precision,
             per_launch, scale, rate, masked):
  """(output, residuals for the backward: pyramid, output, lse, seeds)."""
  n = q.shape[1]
  levels = int(round(math.log2(n // nr)))
  pyramid = _pyramid(q, k, v, c0, levels, causal, interpret, masked)
  handover = _handover_dtype(q.dtype)
  parent = None
  tail = _tail_first(n, levels, causal, masked, q.shape[0] * q.shape[2])
  if tail < levels:
    parent = _tail_forward(
        pyramid, tail, tile, out_dtype=handover, seeds=seeds, rate=rate,
        interpret=interpret, nr=nr, causal=causal, scale=scale,
        precision=precision, masked=masked)
  for first, count, t in reversed(
      _level_groups(n, tail, tile, nr, per_launch)):
    done = None
    if count == 1 and not rate:
      done = _forward_level_mosaic(pyramid[first], first, parent, nr, scale,
                                   causal, masked, interpret)
    parent = done or _group_forward(
        pyramid, first, count, t, parent, nr=nr, causal=causal, scale=scale,
        out_dtype=q.dtype if first == 0 else handover,
        precision=precision, interpret=interpret, seeds=seeds, rate=rate,
        masked=masked)
  o, lse = parent
  return o, (pyramid, o, lse, seeds)


def _mosaic_level(level, parent, kind, interpret, nr, d, causal):
  """Whether the Mosaic GPU kernels of ``kind`` ("forward" or "backward")
  are this level's: where ``level0_impl`` says so, the level is one of the
  ``TUNING["mosaic_levels"]`` finest and has a parent."""
  return (parent is not None and level < TUNING.get("mosaic_levels", 1)
          and level0_impl(kind, interpret, nr, d, causal) == "mosaic")


def _forward_level_mosaic(arrays, level, parent, nr, scale, causal, masked,
                          interpret):
  """The forward of ``level`` (its (q, k, v, counts)) without dropout by
  ``mosaic.forward_level`` where ``_mosaic_level`` says so and it takes
  these inputs: (o, lse), else None (the Triton kernel's turn).

  At level 0 with a mask, v's rows of no real token are zeroed first (one
  XLA pass over v, or in the kernel: ``TUNING["mosaic_zero_rows"]``): the
  kernel selects away the logits of such rows, whatever q and k hold
  there, but a zero weight times a NaN of v is NaN (``_zeroed``)."""
  q, k, v, c = arrays
  if not _mosaic_level(level, parent, "forward", interpret, nr, q.shape[-1],
                       causal):
    return None
  from htransformer.attention import mosaic  # Only where it is chosen.
  if mosaic.level_unsupported(q, v, [k, parent[0]], nr,
                              [mosaic.forward_level_stages]):
    return None
  zero_rows = _mosaic_zero_rows(masked, level)
  if zero_rows == "xla":
    v = jnp.where(_array(c)[:, :, None, None] > 0, v, jnp.zeros_like(v))
  c = _mosaic_counts(c)
  return mosaic.forward_level(
      q, k, v, c, *parent, nr=nr, scale=scale, causal=causal, level=level,
      interpret=interpret, zero_rows=zero_rows == "kernel",
      stages=mosaic.forward_level_stages(nr, q.shape[-1], q.dtype))


def _mosaic_zero_rows(masked, level):
  """Where the Mosaic GPU kernels of ``level`` get rows of no real token
  zeroed: None (no mask, or a coarse level, whose such rows are zeros
  already), "xla" or "kernel" (``TUNING["mosaic_zero_rows"]``)."""
  if not masked or level:
    return None
  return TUNING.get("mosaic_zero_rows", "kernel")


def _attention_fwd(q, k, v, c0, seeds, nr, causal, tile, interpret,
                   precision, per_launch, scale, rate, masked):
  o, res = _forward(q, k, v, c0, seeds, nr, causal, tile, interpret,
                    precision, per_launch, scale, rate, masked)
  return o, res


def _row_stats(d_o, o, lse, c0):
  """Level 0's E = dO . O and M = lse [B, H, n] in XLA (0 and _NO_ROW on
  padding)."""
  vrow = (_array(c0) > 0)[:, None, :]  # [B, 1, n] against [B, H, n]
  e = jnp.sum(d_o.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  return (jnp.where(vrow, jnp.transpose(e, (0, 2, 1)), 0.0),
          jnp.where(vrow, lse, _NO_ROW))


def _attention_bwd(nr, causal, tile, interpret, precision, per_launch, scale,
                   rate, masked, res, d_o):
  pyramid, o, lse, seeds = res
  q, k, v, c0 = pyramid[0]
  levels = len(pyramid)
  g = d_o.astype(q.dtype)
  # Rows of padding take no gradient (M = _NO_ROW; G zeroed by the level-0
  # kernels, ``_zeroed``, and by the restriction).
  # The first restriction also computes level 0's E and M (one read of dO).
  chunks = _chunks(levels)
  if chunks:
    stats = _restrict(g, o, lse, c0, chunks[0][1], interpret,
                      from_output=True)
  else:  # One level: nothing to restrict.
    stats = [(g, *_row_stats(d_o, o, lse, c0))]
  for base, count in chunks[1:]:
    stats += _restrict(*stats[base], pyramid[base][3], count, interpret)

  handover = _handover_dtype(q.dtype)
  parent = None
  tail = _tail_first(q.shape[1], levels, causal, masked,
                     q.shape[0] * q.shape[2])
  if tail < levels:
    parent = _tail_backward(
        pyramid, stats, tail, tile, out_dtypes=(handover,) * 3, seeds=seeds,
        rate=rate, interpret=interpret,
        query_mode=_query_mode(causal, masked), nr=nr, causal=causal,
        scale=scale, precision=precision, masked=masked)
  for first, count, t in reversed(
      _level_groups(q.shape[1], tail, tile, nr, per_launch)):
    dtypes = ((q.dtype, k.dtype, v.dtype) if first == 0 else
              (handover,) * 3)
    done = None
    if count == 1 and _sweep_level(first, interpret, nr, q.shape[-1],
                                   causal):
      done = _sweep_backward(
          pyramid[first], stats[first], parent, level=first, nr=nr,
          causal=causal, scale=scale, out_dtypes=dtypes,
          precision=precision, interpret=interpret, seeds=seeds, rate=rate,
          masked=masked)
    elif count == 1 and not rate:
      done = _backward_level_mosaic(pyramid[first], stats[first], first,
                                    parent, nr, scale, causal, masked,
                                    interpret)
    parent = done or _group_backward(
        pyramid, stats, first, count, t, parent, nr=nr, causal=causal,
        scale=scale, out_dtypes=dtypes, precision=precision,
        interpret=interpret, seeds=seeds, rate=rate, masked=masked)
  dq, dk, dv = parent
  return dq, dk, dv, None if isinstance(c0, Uniform) else jnp.zeros_like(
      c0), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _sweep_level(level, interpret, nr, d, causal):
  """Whether ``level``'s backward is the sweep (``_sweep_backward``): at
  level 0 where ``level0_impl`` says so, at levels 1 .. ``sweep_levels``."""
  if level == 0:
    return level0_impl("backward", interpret, nr, d, causal) == "sweep"
  return level <= sweep_levels(interpret, nr, d, causal)


def _backward_level_mosaic(arrays, stats, level, parent, nr, scale, causal,
                           masked, interpret):
  """The backward of ``level`` (its (q, k, v, counts) and (G, E, M))
  without dropout by ``mosaic.dq_level`` and ``mosaic.dkv_level`` where
  ``_mosaic_level`` says so and they take these inputs: (dq, dk, dv), else
  None (the Triton kernels' turn).

  At level 0 with a mask, q, k and the cotangent are zeroed on rows of no
  real token first (one XLA pass each, or in the kernels:
  ``TUNING["mosaic_zero_rows"]``): the kernels select such rows' logits
  away, but their products would multiply zero weights by NaN there."""
  q, k, v, c = arrays
  if not _mosaic_level(level, parent, "backward", interpret, nr,
                       q.shape[-1], causal):
    return None
  from htransformer.attention import mosaic  # Only where it is chosen.
  g, e, m = stats
  d = q.shape[-1]
  if mosaic.level_unsupported(q, v, [k, v, g, *parent], nr,
                              [mosaic.dq_level_stages,
                               mosaic.dkv_level_stages]):
    return None
  zero_rows = _mosaic_zero_rows(masked, level)
  if zero_rows == "xla":
    real = _array(c)[:, :, None, None] > 0
    q, k, g = (jnp.where(real, x, jnp.zeros_like(x)) for x in (q, k, g))

  def share(mode):
    """Each row's share of its parent: queries by their coarsening mode,
    keys by the mean; known when tracing where the counts are (every row
    real: a pair's first row, or half of each)."""
    if isinstance(c, Uniform):
      return 0.5 if mode == "mean" else "first"
    return jax.vmap(lambda x: _prolong_weight(x, mode))(c)

  counts = _mosaic_counts(c)
  common = dict(nr=nr, scale=scale, causal=causal, level=level,
                zero_rows=zero_rows == "kernel", interpret=interpret)
  dq = mosaic.dq_level(q, k, v, counts, g, e, m, parent[0],
                       share(_query_mode(causal, masked)),
                       stages=mosaic.dq_level_stages(nr, d, q.dtype),
                       **common)
  dk, dv = mosaic.dkv_level(q, k, v, counts, g, e, m, parent[1], parent[2],
                            share("mean"),
                            stages=mosaic.dkv_level_stages(nr, d, q.dtype),
                            **common)
  return dq, dk, dv


def hierarchical_attention_pallas(query, key, value, valid, *, block_size,
                                  causal, interpret=False,
                                  tile=None, dropout_rate=0.0,
                                  dropout_seeds=None):
  """Core on validated inputs (see ``hierarchical.hierarchical_attention_xla``).

  One jitted function per setting (``_jitted``): a model's layers of one
  shape share one trace and one lowering of the kernels (an 8-layer
  stack's gradient at 32 x 2,048 tokens traces and lowers for a GPU in
  2.3 s instead of 19.5 on a 2-core CPU host: ``scripts/trace_time.py``),
  and a call outside ``jit`` compiles once per shape rather than once per
  operation.

  Args:
    query, key: [B, L, H, D]; value: [B, L, H, Dv].
    valid: bool [B, L] (True for real tokens) or None (all real).
    block_size: power of two >= 16.
    causal: causal attention.
    interpret: run the kernels in Pallas interpret mode (any backend).
    tile: query rows per program at the finest level (a power of two >=
      16, the smallest product; less than a block or several blocks;
      default ``default_tile(block_size)``).
    dropout_rate: attention dropout rate (0: none).
    dropout_seeds: uint32 [B, H] (``dropout.head_seeds``) when
      ``dropout_rate > 0``.

  Returns:
    [B, L, H, Dv] in the query dtype, zero where ``valid`` is False.
  """
  check_tuning()
  run = _jitted(_module_state(), block_size=block_size, causal=bool(causal),
                interpret=bool(interpret), tile=tile,
                dropout_rate=float(dropout_rate))
  return run(query, key, value, valid, dropout_seeds)


def _frozen(value):
  """``value`` as a hashable key: dicts, mapping proxies, lists and tuples
  item by item; anything else as it is (functions and objects by
  identity)."""
  if isinstance(value, (dict, types.MappingProxyType)):
    return (type(value).__name__,
            tuple((k, _frozen(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return (type(value).__name__, tuple(_frozen(v) for v in value))
  return value


def _module_state():
  """What tracing the kernels reads from this module, ``mosaic`` (where
  imported), ``hierarchical`` and ``dropout``: every global (``TUNING``,
  the tables of faster settings, the functions, by identity), frozen.
  Part of ``_jitted``'s key, so that a changed setting, or a function
  replaced (as tests do), traces anew. The key holds what it names, so no
  later object can take a freed one's identity.

  Where Mosaic GPU kernels are among the defaults, ``mosaic`` is imported
  here rather than in the first trace, which would change the key after
  it (one more trace; elsewhere that happens once, where ``TUNING`` asks
  for them)."""
  if mosaic_gpu():
    from htransformer.attention import mosaic  # noqa: F401
  modules = [sys.modules[__name__], hierarchical, dropout_lib,
             sys.modules.get("htransformer.attention.mosaic")]
  return tuple(
      tuple((name, _frozen(value)) for name, value in vars(module).items()
            if not name.startswith("__"))
      for module in modules if module is not None)


@functools.lru_cache(maxsize=32)
def _jitted(state, **settings):
  """The jitted ``_pallas_attention`` for ``settings`` under the module
  ``state`` (``_module_state``: the key only)."""
  del state
  return jax.jit(functools.partial(_pallas_attention, **settings))


def _pallas_attention(query, key, value, valid, dropout_seeds, *,
                      block_size, causal, interpret, tile, dropout_rate):
  """``hierarchical_attention_pallas``'s body (traced by ``_jitted``)."""
  reason = unsupported_reason(query, value, block_size, key)
  if reason:
    raise cannot_run("pallas_interpret" if interpret else "pallas", reason)
  if tile is None:
    tile = default_tile(block_size)
  if not (_pow2(tile) and tile >= 16):
    raise ValueError(f"tile must be a power of two >= 16, got {tile}.")
  batch, length = query.shape[:2]
  out_dtype = query.dtype
  dtype = jnp.promote_types(jnp.promote_types(query.dtype, key.dtype),
                            value.dtype)
  query, key, value = (x.astype(dtype) for x in (query, key, value))
  lp = hierarchical.padded_length(length, block_size)
  masked = valid is not None
  if masked or lp != length:
    if valid is None:
      valid = jnp.ones((batch, length), jnp.bool_)
    c0 = jnp.pad(valid.astype(jnp.float32), ((0, 0), (0, lp - length)))
  else:  # Every count known: none is an array (``Uniform``).
    c0 = Uniform(1.0, (batch, lp))
  d, dv = query.shape[-1], value.shape[-1]
  scale = 1.0 / math.sqrt(d)
  wq, wv = kernel_head_dim(d), kernel_head_dim(dv)
  pad = lambda x, w: jnp.pad(
      x, ((0, 0), (0, lp - length), (0, 0), (0, w - x.shape[-1])))
  if lp != length or wq != d or wv != dv:
    query, key, value = pad(query, wq), pad(key, wq), pad(value, wv)
  precision = (lax.Precision.HIGHEST if dtype == jnp.float32 else
               lax.Precision.DEFAULT)
  per_launch = int(TUNING.get("levels_per_launch") or 1)
  rate = float(dropout_rate)
  seeds = dropout_seeds if rate else None
  if rate and seeds is None:
    raise ValueError("dropout_rate > 0 needs dropout_seeds.")
  out = _attention(query, key, value, c0, seeds, block_size, bool(causal),
                   tile, bool(interpret), precision,
                   per_launch, scale, rate, masked)
  return out[:, :length, :, :dv].astype(out_dtype)
