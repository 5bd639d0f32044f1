r"""Where the fused hierarchical attention's time goes, on a GPU.

Times (median of back-to-back calls) the stages of
``implementation="pallas"`` at 65,536 tokens (bf16, heads 8, head_dim 64 or
``--head_dim``):
the coarse pyramid alone, the forward, forward+backward, for several tiles,
warp counts and levels per launch (``kernels.TUNING``), next to the card's
copy bandwidth and cuDNN, all in one process:

  python scripts/profile_kernels.py [--lengths 4096 65536] [--tiles 16 32 64]
      [--warps 0 1 4] [--pyramid_warps 0 1 4] [--per_launch 1 3]
      [--stages 1 2] [--head_dim 128]
      [--block_size 64]
      [--causal] [--coarsen_heads 1 2 4 8] [--coarsen_rows 64 128 256]
      [--coarsen_impl auto pallas dot xla mosaic]
      [--forward_l0_impl auto triton mosaic]
      [--backward_l0_impl auto triton mosaic sweep] [--sweep_blocks 8 16]
      [--sweep_levels 0 1 2] [--sweep_programs 0 256 512] [--pyramid_pass 2 3]
      [--pyramid_stages 2 3]
      [--mosaic_levels 1 2 3]
      [--mosaic_zero_rows xla kernel]
      [--handover_dtype input float32] [--tail_rows 0 16384]
      [--masked] [--by_kernel] [--only_settings]

``--coarsen_heads`` and ``--coarsen_rows`` time the pyramid (coarse q, k, v
of every level) with that many heads and rows per program (``TUNING``),
every combination, ``--coarsen_impl dot`` the pyramid kernel with products
instead of pair sums, ``--coarsen_impl xla`` the pyramid as XLA reductions
and ``--coarsen_impl mosaic`` as Mosaic GPU passes (``auto``, the default:
the kernels' choice). The forward and forward+backward are timed for every
combination of tile, warps, warps of the pyramid and restriction kernels
(``--pyramid_warps``), levels per launch, pipelining stages, pyramid
implementation, level-0 forward and backward (``--forward_l0_impl``,
``--backward_l0_impl``: the Triton kernels, Mosaic GPU's, the Triton
sweep (``--sweep_blocks`` key blocks per program; ``--sweep_levels``:
the coarse levels that take it too; ``--sweep_programs``: the fewest
programs of a sweep's launch, its runs shortened to reach it) or, by
default, the kernels' choice;
``--mosaic_levels``: how many of the finest levels
take the Mosaic GPU kernels where those choose them;
``--mosaic_zero_rows``: with ``--masked``, the padding zeroed for them in
XLA or in the kernels), ``--handover_dtype``
(what coarse levels hand to finer ones), ``--tail_rows`` (the coarse
levels run as one tail), ``--pyramid_pass`` (levels per Mosaic GPU
pyramid pass) and ``--pyramid_stages`` (the steps such a pass loads
ahead: ``kernels.TUNING``); the pyramid's heads and rows per
program are the first values. Each setting's row names how it builds
the forward's pyramid (``"pyramid"``: ``kernels.pyramid_plan``, e.g.
``["mosaic 3 (slots 1)", ..., "dot 2"]``): shared memory decides
whether a pass of ``--pyramid_pass`` levels, or ``--pyramid_stages``
steps, fits (at head_dim 64, three steps fit passes of two levels only;
at 128, no pass, so the pyramid goes to the "dot" kernel).
``--only_settings`` leaves out the copy ceiling, cuDNN and pyramid rows
(they do not change from one comparison of TUNING values to the next).
``--by_kernel`` also traces the forward and the forward+backward of each
setting and prints the device time of each
kernel kind (``hattn_coarsen``, ``hattn_fwd_l0``, ``hattn_dq_l3``, ...,
XLA fusions) per call: where the milliseconds go. Run it with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` so that the kernels show.

``--jobs N`` runs the settings in N worker processes that compile side by
side and then time one at a time (the others idle), each setting's row
printed as it is timed and ``--out`` holding them in the serial order.
JAX's persistent compilation cache keeps only XLA's part of a compile,
not the kernels' tracing and lowering in Python (the forward alone at
blocks of 16 and 65,536 tokens: about 8 s on one core): on an H200 host,
one setting's forward and forward+backward took 45-90 s to compile, and
one-setting timing runs after a ``--compile_only`` warm-up still took
58-87 s each (docs/benchmarks.md).

``--compile_only`` compiles every setting and times nothing: with JAX's
persistent compilation cache on, several such processes side by side
(each its own settings) fill the cache for XLA's part of a timing run,
which then finds it compiled (the same flags and inputs):

  export JAX_COMPILATION_CACHE_DIR=/tmp/jcc \
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
      XLA_FLAGS=--xla_gpu_enable_command_buffer=
  XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/profile_kernels.py \
      --compile_only SETTINGS &   # one per group of settings, then wait
  python scripts/profile_kernels.py SETTINGS

``--mosaic_forward`` only times the finest level's forward, the Triton
kernel against the Mosaic GPU one (``mosaic.forward_level``), on the same
inputs, and prints their largest differences; ``--mosaic_dq`` and
``--mosaic_dkv`` the same for its dq and its dk, dv (``mosaic.dq_level``,
``mosaic.dkv_level``).
``--ncu_target`` only runs the forward+backward at the first length twice
(default settings: the kernels' tile unless ``--tiles`` names one; nothing
timed), for Nsight Compute to read the
hardware counters of chosen kernels (occupancy, registers, achieved
bandwidth, stall reasons):

  XLA_FLAGS=--xla_gpu_enable_command_buffer= XLA_PYTHON_CLIENT_PREALLOCATE=false \
  ncu --clock-control none -k regex:'hattn_(fwd_l0|dq_l0|dkv_l0|coarsen)' \
      -c 4 --set detailed python scripts/profile_kernels.py \
      --lengths 65536 --ncu_target
"""

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402

from htransformer import profiling  # noqa: E402
from htransformer.attention import full_attention  # noqa: E402
from htransformer.attention import hierarchical  # noqa: E402
from htransformer.attention import kernels  # noqa: E402


def bench(fn, *args, min_s=0.05, repeats=7):
  """Median ms per call of back-to-back calls of jitted ``fn``."""
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  calls = profiling.calls_per_run(lambda: f(*args), min_s, most=500)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls * 1e3)
  return float(np.median(times))


def copy_bandwidth_gbps(kind="xla"):
  """GB/s read + written doubling 1 GiB (``profiling.copy_kernel``)."""
  fn, x, nbytes = profiling.copy_kernel(kind)
  return nbytes / (bench(fn, x) * 1e-3) / 1e9


def fwd_bwd_fn(causal, tile, cotangent, block_size=16, interpret=False):
  """(forward, forward+backward) of the kernels (current TUNING), each a
  function of (q, k, v, valid): ``valid`` the mask or None, an argument
  (not a constant the compiler could fold away with the selects it
  costs)."""
  def attn(q, k, v, valid=None):
    return kernels.hierarchical_attention_pallas(
        q, k, v, valid, block_size=block_size, causal=causal, tile=tile,
        interpret=interpret)

  def fwd_bwd(q, k, v, valid=None):
    loss = lambda *a: jnp.sum(attn(*a, valid).astype(jnp.float32) *
                              cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return attn, fwd_bwd


def random_inputs(rng, shape):
  """q, k, v and an output cotangent: standard normal, bfloat16."""
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32),
                           jnp.bfloat16) for _ in range(4))


def run_for_ncu(args, tile):
  length = args.lengths[0]
  shape = (max(1, args.tokens // length), length, 8, args.head_dim)
  q, k, v, ct = random_inputs(np.random.default_rng(0), shape)
  f = jax.jit(fwd_bwd_fn(args.causal, tile, ct, args.block_size)[1])
  for _ in range(2):
    jax.block_until_ready(f(q, k, v))
  print(json.dumps({"ncu_target": list(shape), "tile": tile,
                    "tuning": kernels.TUNING}), flush=True)


def _device_ms(fn, args):
  """Device time of ``jax.jit(fn)(*args)`` per call (20 profiled calls
  after one to compile)."""
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  return profiling.device_profile(lambda: jax.block_until_ready(f(*args)),
                                  steps=20).get("device_ms_per_step")


def _forward_case(rng, shape, c, nr, tile, scale, interpret):
  """The level-0 forward's inputs (a random parent level), the Triton
  kernel, the Mosaic GPU one (given ``stages``) and their differences."""
  from htransformer.attention import mosaic
  batch, length = shape[:2]
  q, k, v, po = random_inputs(rng, shape)
  plse = jnp.asarray(3 * rng.standard_normal((batch, 8, length // 2)),
                     jnp.float32)

  def triton(q, k, v, c, po, plse):
    return kernels._group_forward(
        [(q, k, v, c)], 0, 1, tile, (po, plse), nr=nr, causal=False,
        scale=scale, out_dtype=q.dtype, precision=lax.Precision.DEFAULT,
        interpret=interpret, masked=True)

  def diffs(got, want):
    (o, lse), real = got, want[1] > 0.5 * kernels._NO_KEY
    return {"_max_diff_o": float(jnp.max(jnp.abs(
        o.astype(jnp.float32) - want[0].astype(jnp.float32)))),
            "_max_diff_lse": float(jnp.max(jnp.where(
                real, jnp.abs(lse - want[1]), 0.0)))}

  return ((q, k, v, c, po[:, ::2], plse), triton,
          lambda *a, stages: mosaic.forward_level(
              *a, nr=nr, scale=scale, stages=stages, interpret=interpret),
          diffs)


def _backward_case(rng, shape, c, nr, tile, scale, interpret, kind):
  """The level-0 backward's inputs (random E and M, a random parent level,
  k zero where the mask's padded end is, as the attention hands it over),
  the Triton kernel, the Mosaic GPU one and their differences: dq
  (``kind`` "dq") or dk, dv ("dkv")."""
  from htransformer.attention import mosaic
  batch, length = shape[:2]
  q, k, v, g = random_inputs(rng, shape)
  pdq, pdk, pdv = (x[:, ::2] for x in random_inputs(rng, shape)[:3])
  k = jnp.where(c[:, :, None, None] > 0, k, 0)
  real = (c > 0)[:, None, :]
  e = jnp.where(real, jnp.asarray(rng.standard_normal(
      (batch, 8, length)), jnp.float32), 0.0)
  m = jnp.where(real, 2.0 + jnp.asarray(rng.standard_normal(
      (batch, 8, length)), jnp.float32), kernels._NO_ROW)
  total = jnp.repeat(c.reshape(batch, -1, 2).sum(-1), 2, axis=-1)
  w = jnp.where(total > 0, c / jnp.where(total > 0, total, 1.0), 0.0)
  parents = (pdq,) if kind == "dq" else (pdk, pdv)

  def triton(q, k, v, c, g, e, m, *parents):
    # The kernel whose outputs are not used is not run.
    out = kernels._group_backward(
        [(q, k, v, c)], [(g, e, m)], 0, 1, tile,
        (pdq, pdk, pdv) if kind == "dq" else (pdq, *parents), nr=nr,
        causal=False, scale=scale, out_dtypes=(q.dtype,) * 3,
        precision=lax.Precision.DEFAULT, interpret=interpret, masked=True)
    return out[0] if kind == "dq" else out[1:]

  def diffs(got, want):
    got, want = ((got,), (want,)) if kind == "dq" else (got, want)
    return {"_max_diff": max(float(jnp.max(jnp.abs(
        x.astype(jnp.float32) - y.astype(jnp.float32))))
                             for x, y in zip(got, want)),
            "_max_abs": max(float(jnp.max(jnp.abs(y.astype(jnp.float32))))
                            for y in want)}

  fn = mosaic.dq_level if kind == "dq" else mosaic.dkv_level
  return ((q, k, v, c, g, e, m, *parents), triton,
          lambda *a, stages: fn(*a, w, nr=nr, scale=scale, stages=stages,
                                interpret=interpret), diffs)


# The level-0 comparisons: the Mosaic GPU kernel against the Triton one.
_LEVEL0_CASES = {"fwd": _forward_case,
                 "dq": functools.partial(_backward_case, kind="dq"),
                 "dkv": functools.partial(_backward_case, kind="dkv")}


def level0_rows(args, kind):
  """The finest level's forward ("fwd"), dq ("dq") or dk, dv ("dkv"): the
  Triton kernel (tiles of ``args.tiles[0]`` rows, else the default)
  against the Mosaic GPU one (``mosaic.forward_level``, ``dq_level``,
  ``dkv_level``; each of ``args.stages`` pipelining stages), device time
  on the same inputs (a mask with a padded end), and their largest
  differences."""
  nr = args.block_size
  tile = (args.tiles or [kernels.default_tile(nr)])[0]
  scale = 1.0 / np.sqrt(args.head_dim)
  # Interpret mode (a CPU check): the differences only.
  device_ms = (lambda fn, inputs: None) if args.interpret else _device_ms
  rows = []
  for length in args.lengths:
    batch = max(1, args.tokens // length)
    c = jnp.ones((batch, length), jnp.float32).at[:, length - 37:].set(0.0)
    inputs, triton, mosaic_fn, diffs = _LEVEL0_CASES[kind](
        np.random.default_rng(0), (batch, length, 8, args.head_dim), c, nr,
        tile, scale, args.interpret)
    row = {"length": length, "batch": batch, "head_dim": args.head_dim,
           "block_size": nr, "tile": tile,
           f"triton_{kind}_l0_device_ms": device_ms(triton, inputs)}
    want = jax.jit(triton)(*inputs)
    for stages in args.stages:
      name = f"mosaic_{kind}_l0_stages{stages}"
      mos = functools.partial(mosaic_fn, stages=stages)
      try:
        row[name + "_device_ms"] = device_ms(mos, inputs)
        got = jax.jit(mos)(*inputs)
      except Exception as e:  # noqa: BLE001 (reported: a new kernel)
        row[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        continue
      row.update({name + key: value for key, value in diffs(got,
                                                            want).items()})
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


# The TUNING keys the forward and forward+backward are timed over (every
# combination, with the tiles), each with its argument; the printed row
# names each by its key (``_ROW_NAMES`` where it differs).
_SWEPT = {"num_warps": "warps", "pyramid_warps": "pyramid_warps",
          "levels_per_launch": "per_launch", "num_stages": "stages",
          "coarsen_impl": "coarsen_impl",
          "forward_l0_impl": "forward_l0_impl",
          "backward_l0_impl": "backward_l0_impl",
          "mosaic_levels": "mosaic_levels",
          "mosaic_zero_rows": "mosaic_zero_rows",
          "handover_dtype": "handover_dtype", "grid_order": "grid_order",
          "tail_rows": "tail_rows", "sweep_blocks": "sweep_blocks",
          "sweep_levels": "sweep_levels", "sweep_programs": "sweep_programs",
          "pyramid_pass": "pyramid_pass", "pyramid_stages": "pyramid_stages",
          "coarse_tile": "coarse_tile"}
_ROW_NAMES = {"num_warps": "warps"}


def zero_means():
  """What a swept argument's 0 stands for: its key's default (the
  warps keys; for the others 0 is a value or not one)."""
  return {"num_warps": None,
          "pyramid_warps": kernels.TUNING["pyramid_warps"]}


def _int_or_auto(text):
  """An int, or None for "auto" (the kernels choose)."""
  return None if text == "auto" else int(text)


def make_parser():
  parser = argparse.ArgumentParser(
      description="Where the fused attention's time goes, on a GPU (on "
      "other devices only --interpret, a check of the script, runs). See "
      "the module docstring for the settings.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 65536],
                      help="sequence lengths (batch x length = --tokens)")
  parser.add_argument("--tiles", type=int, nargs="+",
                      help="query rows per program (default 16 32 64; "
                      "--ncu_target: the kernels' default for --block_size)")
  parser.add_argument("--warps", type=int, nargs="+", default=[0],
                      help="warps per program (0: the default, one per "
                      "16 rows of 64 elements of a tile, at most 4)")
  parser.add_argument("--pyramid_warps", type=int, nargs="+", default=[0],
                      help="warps per program of the pyramid and restriction "
                      "kernels (0: the kernels' default, TUNING)")
  parser.add_argument("--dq_warps", type=int, default=0,
                      help="warps of the dq kernels (0: TUNING's)")
  parser.add_argument("--dkv_warps", type=int, default=0,
                      help="warps of the dk, dv kernels (0: TUNING's)")
  parser.add_argument("--per_launch", type=int, nargs="+", default=[1],
                      help="levels per launch (TUNING['levels_per_launch'])")
  parser.add_argument("--stages", type=int, nargs="+", default=[1],
                      help="Triton pipelining stages (TUNING['num_stages']); "
                      "with --mosaic_forward, --mosaic_dq or --mosaic_dkv, "
                      "the Mosaic GPU kernel's")
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--block_size", type=int, default=16)
  parser.add_argument("--coarsen_heads", type=int, nargs="+", default=[1],
                      help="heads per pyramid program (TUNING)")
  parser.add_argument("--coarsen_rows", type=int, nargs="+", default=[0],
                      help="rows per pyramid program (TUNING; 0: 64)")
  parser.add_argument("--coarsen_impl", nargs="+", default=["auto"],
                      choices=["auto", "pallas", "dot", "xla", "mosaic"],
                      help="pyramid implementation (TUNING)")
  parser.add_argument("--forward_l0_impl", nargs="+", default=["auto"],
                      choices=["auto", "triton", "mosaic"],
                      help="level-0 forward implementation (TUNING)")
  parser.add_argument("--backward_l0_impl", nargs="+", default=["auto"],
                      choices=["auto", "triton", "mosaic", "sweep"],
                      help="level-0 backward implementation (TUNING)")
  parser.add_argument("--mosaic_levels", type=int, nargs="+", default=[1],
                      help="finest levels on the Mosaic GPU level kernels "
                      "where the two above choose them (TUNING)")
  parser.add_argument("--mosaic_zero_rows", nargs="+", default=["kernel"],
                      choices=["xla", "kernel"],
                      help="where the Mosaic GPU level-0 kernels get the "
                      "padding zeroed, with --masked (TUNING)")
  parser.add_argument("--handover_dtype", nargs="+", default=["input"],
                      choices=["float32", "input"],
                      help="level-to-level hand-over dtype (TUNING)")
  for key, what, kind in (
      ("tail_rows", "levels of at most this many rows over the batch and "
       "heads in one launch per pass (0: none)", int),
      ("sweep_blocks", "key blocks per program of the backward's sweep "
       "(--backward_l0_impl sweep, --sweep_levels)", int),
      ("sweep_levels", "coarse levels 1 .. this one take the backward's "
       "sweep (0: none; auto, the default: kernels.sweep_levels)",
       _int_or_auto),
      ("sweep_programs", "a sweep's runs are halved until its launch has "
       "this many programs (0: off)", int),
      ("pyramid_pass", "levels per Mosaic GPU pyramid pass (2, or 3 where "
       "they fit)", int),
      ("pyramid_stages", "steps a Mosaic GPU pyramid pass loads ahead", int),
      ("coarse_tile", "query rows per program from level 1 on (0: as "
       "level 0)", int)):
    parser.add_argument(f"--{key}", type=kind, nargs="+",
                        default=[kernels.TUNING[key]],
                        help=f"TUNING[{key!r}]: {what}")
  parser.add_argument("--grid_order", nargs="+", default=["tiles"],
                      choices=["tiles", "heads"],
                      help="kernels.TUNING['grid_order'] values to time")
  parser.add_argument("--masked", action="store_true",
                      help="pass a mask (every token real): the path of "
                      "callers with padding masks")
  parser.add_argument("--by_kernel", action="store_true",
                      help="device time per kernel kind (profiler trace)")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--out", default="")
  parser.add_argument("--ncu_target", action="store_true",
                      help="only run fwd+bwd twice, for Nsight Compute")
  parser.add_argument("--mosaic_forward", action="store_true",
                      help="only time the finest level's forward: the "
                      "Triton kernel against mosaic.forward_level "
                      "(--stages: its pipelining stages)")
  parser.add_argument("--mosaic_dq", action="store_true",
                      help="the same for the finest level's dq "
                      "(mosaic.dq_level)")
  parser.add_argument("--mosaic_dkv", action="store_true",
                      help="the same for the finest level's dk, dv "
                      "(mosaic.dkv_level)")
  parser.add_argument("--only_settings", action="store_true",
                      help="time the settings alone: no copy ceiling, "
                      "cuDNN or pyramid rows (for comparing TUNING values, "
                      "where those rows repeat from run to run)")
  parser.add_argument("--compile_only", action="store_true",
                      help="only compile every setting's forward and "
                      "forward+backward (to fill JAX's persistent "
                      "compilation cache before a timing run)")
  parser.add_argument("--jobs", type=int, default=1,
                      help="worker processes that compile the settings "
                      "side by side, then time them one at a time (the "
                      "lowering of the kernels, which JAX's persistent "
                      "cache does not keep, is most of a setting's cost)")
  parser.add_argument("--_worker", help=argparse.SUPPRESS)
  parser.add_argument("--interpret", action="store_true",
                      help="every kernel in interpret mode: a check of the "
                      "script on a CPU, no meaningful times (each measured "
                      "once; no copy ceiling or cuDNN row). With "
                      "--mosaic_forward, --mosaic_dq or --mosaic_dkv: both "
                      "kernels of the comparison")
  return parser


def settings(args, default):
  """(tile, the swept TUNING values) of every combination to time, each
  set in ``kernels.TUNING`` as it is yielded; ``default``: ``zero_means()``
  before any was set."""
  for tile, *values in itertools.product(
      args.tiles, *(getattr(args, arg) for arg in _SWEPT.values())):
    tuning = {key: default[key] if key in default and not x else x
              for key, x in zip(_SWEPT, values)}
    kernels.TUNING.update(tuning, dq_warps=args.dq_warps or None,
                          dkv_warps=args.dkv_warps or None)
    yield tile, tuning


def compile_settings(args, default):
  """``--compile_only``: compiles the forward and forward+backward of
  every setting (no run, no timing), one JSON line each with the seconds
  it took; with JAX's persistent compilation cache on
  (``JAX_COMPILATION_CACHE_DIR``), a later timing run of the same
  settings finds them compiled. Several such processes side by side fill
  the cache faster than one (they allocate no arrays beyond the inputs)."""
  rng = np.random.default_rng(0)  # The timing run's inputs.
  for length in args.lengths:
    batch = max(1, args.tokens // length)
    shape = (batch, length, 8, args.head_dim)
    q, k, v, ct = random_inputs(rng, shape)
    valid = jnp.ones((batch, length), jnp.bool_) if args.masked else None
    for tile, tuning in settings(args, default):
      row = {"length": length, "tile": tile, **tuning}
      for name, fn in zip(("fwd", "fwd_bwd"), fwd_bwd_fn(
          args.causal, tile, ct, args.block_size, args.interpret)):
        start = time.perf_counter()
        jax.jit(fn).lower(q, k, v, valid).compile()
        row[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
      print(json.dumps(row), flush=True)


def _named(tuning):
  """A setting's TUNING values as its row names them."""
  return {_ROW_NAMES.get(key, key): "auto" if x is None else x
          for key, x in tuning.items()}


def pyramid_of(args, inputs):
  """How the setting in ``kernels.TUNING`` builds the pyramid of ``inputs``
  (q, ...): ``kernels.pyramid_plan``, with the kernels' padding."""
  b, length, h, d = inputs[0].shape
  n = hierarchical.padded_length(length, args.block_size)
  return kernels.pyramid_plan(
      (b, n, h, kernels.kernel_head_dim(d)), inputs[0].dtype,
      args.block_size, causal=args.causal,
      uniform=not args.masked and n == length, interpret=args.interpret)


def setting_row(args, length, tile, tuning, fns, inputs, timed,
                pyramid=None):
  """One setting's row: its TUNING values, how it builds the pyramid
  (``pyramid``, else ``pyramid_of`` under the current TUNING), the wall
  time per call of the forward and forward+backward (``fns``, on
  ``inputs`` (q, k, v, valid)), and with ``--by_kernel`` the device time
  of each kernel kind."""
  attn, fwd_bwd = fns
  row = {"length": length, "tile": tile, "masked": args.masked,
         **_named(tuning),
         "pyramid": pyramid or pyramid_of(args, inputs),
         "dq_warps": args.dq_warps or "auto",
         "dkv_warps": args.dkv_warps or "auto",
         "coarsen_heads": args.coarsen_heads[0],
         "coarsen_rows": args.coarsen_rows[0] or 64,
         "fwd_ms": timed(attn, *inputs),
         "fwd_bwd_ms": timed(fwd_bwd, *inputs)}
  if args.by_kernel:
    for name, fn in (("fwd", attn), ("fwd_bwd", fwd_bwd)):
      f = jax.jit(fn)
      prof = profiling.device_profile(
          lambda: jax.block_until_ready(f(*inputs)), steps=5, top=60)
      # Kernel time, the idle time between launches, launches: per call.
      for key in ("device_ms", "gap_ms", "kernels"):
        row[f"{name}_{key}"] = prof.get(f"{key}_per_step")
      row[f"{name}_by_kernel"] = prof.get("top_kernels")
  return row


def run_workers(args):
  """``--jobs N``: the settings' rows from N worker processes (this
  script with ``--_worker``), which compile their settings side by side
  and then, once all have compiled, time them one process at a time (a
  lock): N settings cost about one setting's compile plus N timings. The
  rows in the order of a serial run."""
  with tempfile.TemporaryDirectory() as sync:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    workers = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
         "--_worker", profiling.Turns.argument(sync, i, args.jobs)],
        env=env) for i in range(args.jobs)]
    profiling.Turns.wait_for(workers, sync)
    failed = [i for i, w in enumerate(workers) if w.returncode]
    rows = []
    for name in sorted(os.listdir(sync)):
      if name.startswith("rows."):
        with open(os.path.join(sync, name)) as f:
          rows += [json.loads(line) for line in f]
  if failed:
    print(f"profile_kernels.py: workers {failed} of --jobs {args.jobs} "
          "failed (their output is above)", file=sys.stderr)
  return [row for _, row in sorted((row.pop("_index"), row) for row in rows)]


def worker(args, default, timed):
  """One ``--jobs`` worker (``--_worker``: ``profiling.Turns.argument``,
  worker I of N): compiles (and runs once) the forward and
  forward+backward of every N-th setting from the I-th,
  marks itself ready, then times each setting in its turn
  (``profiling.Turns``: once all workers are ready, one at a time),
  printing its row and writing it for the parent. A setting that fails
  to compile gets a row saying so."""
  turns = profiling.Turns.of_worker(args._worker)
  index, jobs = turns.index, turns.jobs
  rng = np.random.default_rng(0)  # The serial run's inputs, by length.
  mine = []
  position = 0
  try:
    for length in args.lengths:
      batch = max(1, args.tokens // length)
      inputs = random_inputs(rng, (batch, length, 8, args.head_dim))
      valid = jnp.ones((batch, length), jnp.bool_) if args.masked else None
      for tile, tuning in settings(args, default):
        position += 1
        if (position - 1) % jobs != index:
          continue
        # Compiled here, found compiled (jit caches by function) when
        # timed.
        fns = fwd_bwd_fn(args.causal, tile, inputs[3], args.block_size,
                         args.interpret)
        try:
          for fn in fns:
            jax.block_until_ready(jax.jit(fn)(*inputs[:3], valid))
        except Exception as e:  # noqa: BLE001 (reported in its row)
          fns = f"failed: {type(e).__name__}: {str(e)[:300]}"
        mine.append((position - 1, length, tile, tuning, fns,
                     (*inputs[:3], valid), pyramid_of(args, inputs)))
  finally:
    turns.ready()
  for position, length, tile, tuning, fns, inputs, pyramid in mine:
    with turns.turn():
      if isinstance(fns, str):
        row = {"length": length, "tile": tile, **_named(tuning),
               "pyramid": pyramid, "failed": fns}
      else:
        row = setting_row(args, length, tile, tuning, fns, inputs, timed,
                          pyramid)
      print(json.dumps(row), flush=True)
      with open(os.path.join(turns.sync, f"rows.{index}"), "a") as f:
        f.write(json.dumps({**row, "_index": position}) + "\n")


def main():
  parser = make_parser()
  args = parser.parse_args()
  if args.jobs < 1:
    parser.error(f"--jobs must be at least 1, got {args.jobs}")
  if any(n < 16 for n in args.lengths):
    parser.error(f"--lengths must be at least 16, got {args.lengths}")
  if not args.interpret and jax.default_backend() != "gpu":
    parser.error(f"times the fused kernels on a GPU; this process runs on "
                 f"{jax.default_backend()!r}. Use --interpret for a check "
                 "of the script on any device.")
  kinds = [kind for kind, on in (("fwd", args.mosaic_forward),
                                 ("dq", args.mosaic_dq),
                                 ("dkv", args.mosaic_dkv)) if on]
  if kinds:
    rows = [row for kind in kinds for row in level0_rows(args, kind)]
    if args.out:
      with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return
  if args.ncu_target:
    tiles = args.tiles or [kernels.default_tile(args.block_size)]
    run_for_ncu(args, tiles[0])
    return
  args.tiles = args.tiles or [16, 32, 64]
  default = zero_means()
  if args.compile_only:
    compile_settings(args, default)
    return
  # --interpret, a check of this script: one call each.
  timed = (functools.partial(bench, min_s=0.0, repeats=1) if args.interpret
           else bench)
  if args._worker:
    worker(args, default, timed)
    return
  if args.jobs > 1:  # Before any device is used: the workers' memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  rows = [{"device": jax.devices()[0].device_kind}]
  references = not (args.interpret or args.only_settings)
  if references:
    rows[0].update(
        copy_gbps=round(copy_bandwidth_gbps(), 1),
        **({"copy_gbps_pallas": round(copy_bandwidth_gbps("pallas"), 1)}
           if jax.default_backend() == "gpu" else {}),
        # Mosaic GPU compiles for Hopper GPUs and newer.
        **({"copy_gbps_mosaic": round(copy_bandwidth_gbps("mosaic"), 1)}
           if kernels.mosaic_gpu() else {}))
  print(json.dumps(rows[0]), flush=True)
  rng = np.random.default_rng(0)
  for length in args.lengths:
    batch = max(1, args.tokens // length)
    shape = (batch, length, 8, args.head_dim)
    q, k, v, ct = random_inputs(rng, shape)
    c0 = jnp.ones((batch, length), jnp.float32)
    valid = jnp.ones((batch, length), jnp.bool_) if args.masked else None
    levels = int(np.log2(length // args.block_size))
    row = {"length": length, "batch": batch, "head_dim": args.head_dim,
           "block_size": args.block_size}
    if references:
      row["cudnn_fwd_ms"] = bench(lambda q, k, v: full_attention(
          q, k, v, causal=args.causal, implementation="cudnn"), q, k, v)
    # The XLA pyramid has no heads or rows per program.
    pyramids = [] if args.only_settings else [
        (impl, heads, crows) for impl in args.coarsen_impl
        for heads, crows in ([(0, 0)] if impl == "xla" else
                             itertools.product(args.coarsen_heads,
                                               args.coarsen_rows))]
    for impl, heads, crows in pyramids:
      kernels.TUNING.update(coarsen_impl=impl, coarsen_heads=heads or 1,
                            coarsen_rows=crows)
      name = ("pyramid_ms_xla" if impl == "xla" else
              f"pyramid_ms_{impl}_heads{heads}_rows{crows or 64}")
      # A new function per setting: jit caches by function, and TUNING is
      # read only when tracing.
      pyramid = lambda q, k, v: kernels._pyramid(
          q, k, v, c0, levels, args.causal, args.interpret, args.masked)
      row[name] = timed(pyramid, q, k, v)
      device = name.replace("_ms", "_device_ms")
      if args.by_kernel:  # The wall time above includes the host's work
        f = jax.jit(pyramid)  # for ~40 outputs; the device's alone:
        row[device] = profiling.device_profile(
            lambda: jax.block_until_ready(f(q, k, v)),
            steps=5).get("device_ms_per_step")
      # One line per setting as it is measured: a run cut short by a time
      # limit still reports the settings it reached.
      print(json.dumps({"length": length, name: row[name],
                        device: row.get(device)}), flush=True)
    kernels.TUNING.update(coarsen_impl=args.coarsen_impl[0],
                          coarsen_heads=args.coarsen_heads[0],
                          coarsen_rows=args.coarsen_rows[0])
    print(json.dumps(row), flush=True)
    rows.append(row)
    if args.jobs > 1:
      continue  # The settings' rows come from the workers, below.
    for tile, tuning in settings(args, default):
      fns = fwd_bwd_fn(args.causal, tile, ct, args.block_size,
                       args.interpret)
      row = setting_row(args, length, tile, tuning, fns, (q, k, v, valid),
                        timed)
      print(json.dumps(row), flush=True)
      rows.append(row)
  if args.jobs > 1:
    del q, k, v, ct, valid  # The workers' memory.
    rows += run_workers(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
