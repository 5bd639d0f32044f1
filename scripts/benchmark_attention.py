#!/usr/bin/env python
"""Benchmarks hierarchical attention against full (cuDNN and XLA) attention.

For each method and sequence length this measures the forward and the
forward+backward wall time (median of ``--repeats`` runs after compiling and
warming up) and the peak device memory, at a fixed number of tokens per
batch (``batch = max(1, tokens // length)``), prints a markdown table, and
writes where asked:

  * the raw results as JSON (``--out_json``), from which
    ``scripts/plot_benchmark.py`` draws a log-log plot;
  * a markdown section in ``--out_md`` (a section with the same heading is
    replaced, other sections are kept; the repository's record is
    ``docs/benchmarks.md`` with ``docs/benchmark_attention.json`` for the
    plain-XLA methods and ``docs/benchmark_kernels.json`` for the fused
    kernels).

Methods that need a GPU (``full_cudnn``, ``*_pallas``) are skipped, and
said so, on other devices.

Peak memory comes in two flavours:

  * measured: ``peak_bytes_in_use`` of the device allocator. It is a
    high-water mark for the whole process, so it is only reported when each
    (method, length) runs in a process of its own (``--isolate``, the default
    on GPU). It includes the inputs.
  * compiled estimate: the compiler's ``memory_analysis()`` of the jitted
    function (arguments + outputs + temporaries), available everywhere.

Methods: ``full_cudnn``, ``full_xla``, ``hierarchical_<block_size>`` (the
plain-XLA path, ``implementation="xla"``) and
``hierarchical_<block_size>_pallas`` (the fused kernels, the default for
bfloat16 inputs on a GPU).

Usage, from the repository root:

  python scripts/benchmark_attention.py                # the plain paths
  python scripts/benchmark_attention.py --causal
  # the fused kernels against cuDNN ("Where things stand" in
  # docs/benchmarks.md), recorded there:
  python scripts/benchmark_attention.py --lengths 1024 65536 --repeats 5 \
      --no-isolate --methods hierarchical_16_pallas full_cudnn --head_dim 64 \
      --out_json docs/benchmark_kernels.json --out_md docs/benchmarks.md
  python scripts/benchmark_attention.py --smoke        # tiny, on a CPU

Most of a measurement's time is compiling. ``--jobs N`` measures N
(method, length) pairs at a time, each in a process of its own: they
compile side by side on the host's cores, then take turns on the device
(``profiling.Turns``), one timing at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# JAX reserves 75% of GPU memory by default; let the benchmark use most of
# the card so that "fits" means fits on the card. Set the variable to
# override. Must happen before JAX initialises its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

# The imports below need the path and the environment set above.
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from htransformer import profiling
from htransformer.attention import full_attention, hierarchical_attention
from htransformer.attention import kernels

DEFAULT_METHODS = ("hierarchical_16", "hierarchical_64", "full_cudnn",
                   "full_xla")
DEFAULT_LENGTHS = tuple(1024 * 4**k for k in range(6))  # 1K ... 1M
DTYPES = ("bfloat16", "float16", "float32")

# Settings of --smoke: a check of the script that runs in a minute or two on
# a CPU (mostly compiling), plain-XLA methods only.
SMOKE = dict(lengths=(256, 512), tokens=1024, heads=2, repeats=3,
             methods=("hierarchical_16", "hierarchical_64", "full_xla"))

# Targets for (hierarchical_16 fwd+bwd time) / (cuDNN fwd+bwd time).
RATIO_TARGETS = {4096: 1.2, 16384: 0.35, 65536: 0.10}

# Prefix of the line on which a --single run prints its JSON result.
RESULT_MARKER = "BENCHMARK_RESULT "

GIB = 2**30
PHASES = ("fwd", "fwd_bwd")


# ---------------------------------------------------------------------------
# Methods.


def check_method(name: str) -> str:
  if name in ("full_cudnn", "full_xla"):
    return name
  m = re.fullmatch(r"hierarchical_(\d+)(_pallas)?", name)
  if m:
    block = int(m.group(1))
    if m.group(2) and (block < 16 or block & (block - 1)):
      raise argparse.ArgumentTypeError(
          f"{name}: the fused kernels take block sizes that are powers of "
          "two >= 16")
    if block >= 2 and block % 2 == 0:
      return name
    raise argparse.ArgumentTypeError(
        f"{name}: the block size must be an even integer >= 2")
  raise argparse.ArgumentTypeError(
      f"unknown method {name!r}: use full_cudnn, full_xla, "
      "hierarchical_<block_size> (plain XLA) or "
      "hierarchical_<block_size>_pallas (fused kernels)")


# Methods that need a GPU, and why.
GPU_ONLY = {"full_cudnn": "cuDNN", "_pallas": "the fused kernels"}


def needs_gpu(method: str) -> str | None:
  return next((why for key, why in GPU_ONLY.items()
               if method == key or (key.startswith("_")
                                    and method.endswith(key))), None)


def _hier_parts(name: str) -> tuple[int, str]:
  """(block_size, implementation) of a hierarchical method name."""
  parts = name.split("_")
  return int(parts[1]), ("pallas" if parts[-1] == "pallas" else "xla")


def method_label(name: str) -> str:
  if name.startswith("hierarchical_"):
    block_size, impl = _hier_parts(name)
    return f"hier-{block_size}" + (" pallas" if impl == "pallas" else "")
  return {"full_cudnn": "cuDNN", "full_xla": "XLA dense"}[name]


def method_sort_key(name: str) -> tuple[int, int]:
  """Hierarchical by block size, then cuDNN, then dense XLA."""
  if name.startswith("hierarchical_"):
    block_size, impl = _hier_parts(name)
    return (0 if impl == "pallas" else 1, block_size)
  return (2, 0) if name == "full_cudnn" else (3, 0)


def make_attention(name: str, causal: bool, dropout_rate: float = 0.0):
  """Returns ``attention(q, k, v) -> out`` for a method name (with attention
  dropout at ``dropout_rate``, a fixed key; cuDNN has none)."""
  drop = {}
  if dropout_rate:
    drop = dict(dropout_rate=dropout_rate, dropout_rng=jax.random.key(0))
  if name.startswith("hierarchical_"):
    block_size, impl = _hier_parts(name)
    return lambda q, k, v: hierarchical_attention(
        q, k, v, block_size=block_size, causal=causal, implementation=impl,
        **drop)
  implementation = name.split("_")[1]  # "cudnn" or "xla"
  if name == "full_cudnn":
    drop = {}
  return lambda q, k, v: full_attention(
      q, k, v, causal=causal, implementation=implementation, **drop)


# ---------------------------------------------------------------------------
# Measuring one (method, length), in this process.


def batch_for(length: int, tokens: int) -> int:
  return max(1, tokens // length)


def random_normal(rng, shape, dtype):
  # Drawn on the host, so that no RNG temporaries count towards the peak.
  return jax.device_put(rng.standard_normal(shape, np.float32).astype(dtype))


def compiled_peak_bytes(compiled) -> int | None:
  """The compiler's estimate of peak memory of one call (incl. arguments)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return None
  if stats is None:
    return None
  peak = getattr(stats, "peak_memory_in_bytes", 0)
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
           stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return max(peak, total)


def device_bytes(key: str) -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats or key not in stats else int(stats[key])


def error_status(exc: Exception) -> str:
  message = str(exc)
  if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower():
    return "OOM"
  return "error"


# Each timed run lasts at least this long: short calls are issued
# back to back (``calls`` of them) and the run's time is divided by their
# number, so that the host's dispatch latency does not count.
MIN_RUN_S = 0.02


def compile_phase(fn, args) -> dict:
  """``fn`` compiled for ``args``: {"compiled", "compile_s",
  "compiled_peak_gib"}."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  peak = compiled_peak_bytes(compiled)
  return {"compiled": compiled,
          "compile_s": round(time.perf_counter() - start, 3),
          "compiled_peak_gib": None if peak is None else peak / GIB}


def time_phase(compiled, args, warmup: int, repeats: int) -> dict:
  """Warms ``compiled`` up and times ``repeats`` runs of it."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  calls = profiling.calls_per_run(lambda: compiled(*args), MIN_RUN_S)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):  # one stream: the last to finish is the last
      out = compiled(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / calls)
    del out
  return {
      "status": "ok",
      "median_ms": float(np.median(times)),
      "times_ms": [round(t, 4) for t in times],
      "calls_per_run": calls,
  }


def run_phase(fn, args, warmup: int, repeats: int) -> dict:
  """Compiles ``fn``, warms it up and times ``repeats`` runs of it."""
  prepared = compile_phase(fn, args)
  compiled = prepared.pop("compiled")
  return {**time_phase(compiled, args, warmup, repeats), **prepared}


def _failure(exc: Exception) -> dict:
  first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
  return {"status": error_status(exc), "error": first_line[:300]}


def measure(method: str, length: int, cfg: argparse.Namespace,
            isolated: bool, turns: profiling.Turns | None = None) -> dict:
  """Times forward and forward+backward of one method at one length.

  With ``isolated`` (a process of its own) the allocator's high-water mark is
  also read after each phase; the forward runs first, so the fwd+bwd peak is
  the larger of the two, which is the backward's in practice. With
  ``turns`` (a ``--jobs`` worker) both phases are compiled first, and timed
  in this worker's turn.
  """
  batch = batch_for(length, cfg.tokens)
  shape = (batch, length, cfg.heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.dtype)
  attention = make_attention(method, cfg.causal, cfg.dropout_rate)

  def fwd_bwd(q, k, v, cotangent):
    def loss(q, k, v):
      out = attention(q, k, v).astype(jnp.float32)
      return jnp.sum(out * cotangent.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  baseline = device_bytes("bytes_in_use") if isolated else None

  def compiled(fn, args) -> dict:
    try:
      return compile_phase(fn, args)
    except Exception as exc:  # noqa: BLE001 (reported in the results)
      return _failure(exc)

  def timed(prepared, args) -> dict:
    if "status" in prepared:  # it did not compile
      return prepared
    try:
      entry = {**time_phase(prepared.pop("compiled"), args, cfg.warmup,
                            cfg.repeats), **prepared}
    except Exception as exc:  # noqa: BLE001 (reported in the results)
      return _failure(exc)
    peak = device_bytes("peak_bytes_in_use") if isolated else None
    if peak is not None and baseline is not None:
      entry["measured_peak_gib"] = (peak - baseline) / GIB
    return entry

  # A fresh draw per (method, length), reproducible from --seed.
  rng = np.random.default_rng([cfg.seed, length, zlib.crc32(method.encode())])
  q, k, v, cotangent = (random_normal(rng, shape, dtype) for _ in range(4))
  phases = {"fwd": (attention, (q, k, v)),
            "fwd_bwd": (fwd_bwd, (q, k, v, cotangent))}
  result = {"method": method, "length": length, "batch": batch}
  if turns is None:  # each phase compiled, then timed
    for phase, (fn, args) in phases.items():
      result[phase] = timed(compiled(fn, args), args)
      if result[phase]["status"] != "ok":
        break
  else:
    prepared = {}
    try:
      for phase, (fn, args) in phases.items():
        prepared[phase] = compiled(fn, args)
        if "status" in prepared[phase]:
          break
    finally:
      turns.ready()
    with turns.turn():
      for phase, entry in prepared.items():
        result[phase] = timed(entry, phases[phase][1])
        if result[phase]["status"] != "ok":
          break
  if "fwd_bwd" not in result:  # would fail the same way
    result["fwd_bwd"] = {"status": result["fwd"]["status"],
                         "error": "not run: the forward failed"}
  failed = [result[p]["status"] for p in PHASES if result[p]["status"] != "ok"]
  result["status"] = failed[0] if failed else "ok"
  return result


# ---------------------------------------------------------------------------
# Running measurements, in this process or one process each.


def copy_bandwidth_gbps(kind: str = "xla") -> float | None:
  """Device copy bandwidth (bytes read + written per second, GB/s) of
  ``profiling.copy_kernel(kind)``, GPU only."""
  if jax.devices()[0].platform != "gpu":
    return None
  fn, x, nbytes = profiling.copy_kernel(kind)
  entry = run_phase(jax.jit(fn), (x,), warmup=2, repeats=5)
  return round(nbytes / (entry["median_ms"] * 1e-3) / 1e9, 1)


def environment_info(measure_copy: bool = False) -> dict:
  device = jax.devices()[0]
  # The Mosaic GPU copy compiles on Hopper GPUs and newer only.
  copies = {kind: copy_bandwidth_gbps(kind) if measure_copy and (
      kind != "mosaic" or kernels.mosaic_gpu()) else None
            for kind in ("xla", "pallas", "mosaic")}
  measured = [x for x in copies.values() if x is not None]
  return {
      # The card's copy bandwidth: the fastest of the copies.
      "copy_gbps": max(measured) if measured else None,
      "copy_gbps_xla": copies["xla"],
      "copy_gbps_pallas": copies["pallas"],
      "copy_gbps_mosaic": copies["mosaic"],
      # What builds the fused kernels' pyramid on this device.
      "coarsen_impl": kernels.coarsen_impl(),
      # And the finest level's forward and backward ("mosaic": Mosaic GPU
      # at the block sizes and head widths of kernels.MOSAIC_L0_FASTER; an
      # "auto" backward takes the sweep at kernels.SWEEP_L0_FASTER).
      "forward_l0_impl": kernels.level0_impl("forward"),
      "backward_l0_impl": kernels.level0_impl("backward"),
      "device_kind": device.device_kind,
      "platform": device.platform,
      "device_count": jax.device_count(),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "python_version": platform.python_version(),
      "xla_python_client_mem_fraction":
          os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
  }


def config_flags(cfg: argparse.Namespace) -> list[str]:
  """The flags that make a --single/--probe child measure what we would."""
  flags = ["--tokens", str(cfg.tokens), "--heads", str(cfg.heads),
           "--head_dim", str(cfg.head_dim), "--dtype", cfg.dtype,
           "--repeats", str(cfg.repeats), "--warmup", str(cfg.warmup),
           "--seed", str(cfg.seed)]
  if cfg.tuning:
    flags += ["--tuning", *cfg.tuning]
  if cfg.dropout_rate:
    flags += ["--dropout_rate", str(cfg.dropout_rate)]
  return flags + (["--causal"] if cfg.causal else [])


def _child_command(extra_flags: list[str], cfg) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), *extra_flags,
          *config_flags(cfg)]


def _child_result(returncode: int, stdout: str, stderr: str) -> dict:
  """A child's JSON result line, or what its failure says."""
  for line in stdout.splitlines():
    if line.startswith(RESULT_MARKER):
      return json.loads(line[len(RESULT_MARKER):])
  tail = (stderr.strip().splitlines() or ["(no output)"])[-20:]
  print("  child process failed (exit code %d):\n    %s"
        % (returncode, "\n    ".join(tail)), file=sys.stderr)
  status = "OOM" if "RESOURCE_EXHAUSTED" in stderr else "error"
  return {"status": status,
          "error": f"exit code {returncode}: {tail[-1][:300]}"}


def run_child(extra_flags: list[str], cfg: argparse.Namespace) -> dict:
  """Runs this script with ``extra_flags``; returns its JSON result line."""
  try:
    proc = subprocess.run(_child_command(extra_flags, cfg),
                          capture_output=True, text=True,
                          timeout=cfg.timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"status": "timeout",
            "error": f"no result within --timeout_s={cfg.timeout_s}"}
  return _child_result(proc.returncode, proc.stdout, proc.stderr)


def _full_result(method: str, length: int, result: dict, cfg) -> dict:
  """A child's result; where it died before reporting, one that says so."""
  if "method" not in result:
    result = {"method": method, "length": length,
              "batch": batch_for(length, cfg.tokens), **result,
              **{p: {"status": result["status"]} for p in PHASES}}
  return result


def measure_isolated(method: str, length: int, cfg) -> dict:
  result = run_child(["--single", method, str(length)], cfg)
  return _full_result(method, length, result, cfg)


def measure_in_turns(todo: list[tuple[str, int]], cfg) -> list[dict]:
  """``--jobs N``: the (method, length) pairs of ``todo``, each in a
  process of its own as with ``--isolate``, N at a time: the N compile
  side by side, then time one at a time (``profiling.Turns``), so that a
  batch costs about one compile and N timings. The results in ``todo``'s
  order. The workers allocate device memory as they need it
  (``XLA_PYTHON_CLIENT_PREALLOCATE=false``): N processes that each took
  ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the card up front would not fit.
  """
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  with tempfile.TemporaryDirectory() as sync:
    logs = [(open(os.path.join(sync, f"out.{i}"), "w+"),
             open(os.path.join(sync, f"err.{i}"), "w+"))
            for i in range(len(todo))]
    procs = [subprocess.Popen(
        _child_command(["--single", method, str(length), "--_turns",
                        profiling.Turns.argument(sync, i, len(todo))], cfg),
        stdout=out, stderr=err, text=True, env=env)
             for i, ((method, length), (out, err)) in enumerate(
                 zip(todo, logs))]
    killed = profiling.Turns.wait_for(procs, sync, cfg.timeout_s)
    results = []
    for (method, length), proc, (out, err) in zip(todo, procs, logs):
      out.seek(0)
      err.seek(0)
      result = (_child_result(proc.returncode, out.read(), err.read())
                if not (killed and proc.returncode == -9) else
                {"status": "timeout",
                 "error": f"no result within --timeout_s={cfg.timeout_s}"})
      out.close()
      err.close()
      results.append(_full_result(method, length, result, cfg))
  return results


def skip_reason(method: str, length: int, cfg) -> str | None:
  if needs_gpu(method) and getattr(cfg, "platform", "gpu") != "gpu":
    return "needs_gpu"
  if method == "full_xla" and length > cfg.skip_xla_dense_above:
    return "dense_logits"
  if method.startswith("full_") and length > cfg.full_max_length:
    return "quadratic"
  return None


def add_estimates(results: list[dict]) -> None:
  """Estimates skipped quadratic runs from the longest measured length.

  Full attention costs ``batch * length**2`` (times heads * head_dim), so a
  measured time scales by that ratio.
  """
  for res in results:
    if res.get("skip") != "quadratic":
      continue
    measured = [r for r in results
                if r["method"] == res["method"] and r["status"] == "ok"]
    if not measured:
      continue
    ref = max(measured, key=lambda r: r["length"])
    cost = lambda r: r["batch"] * r["length"]**2
    scale = cost(res) / cost(ref)
    res["estimated_from_length"] = ref["length"]
    for phase in PHASES:
      res[phase]["estimated_ms"] = ref[phase]["median_ms"] * scale


def skipped_result(method, length, reason, cfg) -> dict:
  return {"method": method, "length": length,
          "batch": batch_for(length, cfg.tokens), "status": "skipped",
          "skip": reason, **{p: {"status": "skipped"} for p in PHASES}}


def load_previous(path: str, config: dict, env: dict) -> dict | None:
  """The report in ``path`` (for --merge), checked to measure the same."""
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    previous = json.load(f)
  # Settings that change the measurement; older reports lack the last two
  # (then they were measured without dropout and with the default tuning).
  unset = {"dropout_rate": 0.0, "tuning": None}
  for key in ("tokens", "heads", "head_dim", "dtype", "causal",
              "dropout_rate", "tuning"):
    before = previous["config"].get(key, unset.get(key))
    now = config.get(key, unset.get(key))
    if before != now:
      sys.exit(f"--merge: {path} has {key}={before!r}, this run {now!r}; "
               "pick another --out_json.")
  if previous["environment"]["device_kind"] != env["device_kind"]:
    sys.exit(f"--merge: {path} was measured on "
             f"{previous['environment']['device_kind']}, not "
             f"{env['device_kind']}.")
  return previous


def build_report(config: dict, env: dict, results: list[dict],
                 previous: dict | None) -> dict:
  """This run's report, plus the results of ``previous`` it did not redo."""
  config, env = dict(config), dict(env)
  if previous is not None:
    done = {(r["method"], r["length"]) for r in results}
    results = results + [r for r in previous["results"]
                         if (r["method"], r["length"]) not in done]
    config["lengths"] = sorted(set(config["lengths"]) |
                               set(previous["config"]["lengths"]))
    config["methods"] = sorted(
        set(config["methods"]) | set(previous["config"]["methods"]),
        key=method_sort_key)
    env["commands"] = previous["environment"]["commands"] + env["commands"]
  order = {m: i for i, m in enumerate(config["methods"])}
  results = sorted(results, key=lambda r: (r["length"], order[r["method"]]))
  add_estimates(results)
  return {"config": config, "environment": env, "results": results}


# ---------------------------------------------------------------------------
# Reporting.


def format_length(length: int) -> str:
  if length >= 2**20 and length % 2**20 == 0:
    return f"{length // 2**20}M"
  if length >= 1024 and length % 1024 == 0:
    return f"{length // 1024}K"
  return str(length)


def format_ms(ms: float) -> str:
  if ms >= 100:
    return f"{ms:.0f}"
  return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def skip_note(res: dict, phase: str) -> str:
  if res["skip"] == "needs_gpu":
    return f"skipped (needs a GPU: {needs_gpu(res['method'])})"
  if res["skip"] == "quadratic":
    estimate = res[phase].get("estimated_ms")
    if estimate is None:
      return "skipped (quadratic)"
    return f"skipped (quadratic, est. {format_ms(estimate)} ms)"
  return "skipped (dense L² logits)"


def time_cell(res: dict | None, phase: str) -> str:
  if res is None:
    return ""
  if res["status"] == "skipped":
    return skip_note(res, phase)
  entry = res[phase]
  return format_ms(entry["median_ms"]) if entry["status"] == "ok" else (
      entry["status"])


def peak_gib(res: dict) -> tuple[float | None, bool]:
  """(GiB, measured?) of the fwd+bwd run, measured where possible."""
  entry = res["fwd_bwd"]
  if entry.get("measured_peak_gib") is not None:
    return entry["measured_peak_gib"], True
  return entry.get("compiled_peak_gib"), False


def peak_cell(res: dict | None) -> str:
  if res is None or res["status"] == "skipped":
    return "" if res is None else "—"
  if res["fwd_bwd"]["status"] != "ok":
    return res["fwd_bwd"]["status"]
  gib, measured = peak_gib(res)
  if gib is None:
    return "n/a"
  return f"{gib:.2f}" if measured else f"{gib:.2f}*"


def section_heading(cfg: dict) -> str:
  fused = any(m.endswith("_pallas") for m in cfg["methods"])
  return (f"## Attention{' (fused kernels)' if fused else ''}: hierarchical "
          f"vs full ({cfg['dtype']}, heads "
          f"{cfg['heads']}, head_dim {cfg['head_dim']}, {cfg['tokens']:,} "
          f"tokens per batch, {'causal' if cfg['causal'] else 'non-causal'}"
          + (f", attention dropout {cfg['dropout_rate']} (not cuDNN)"
             if cfg.get("dropout_rate") else "") + ")")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] * len(header)) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def ratio_lines(report: dict, lookup: dict) -> list[str]:
  """Hierarchical fwd+bwd time over the full-attention reference."""
  cfg = report["config"]
  methods = cfg["methods"]
  reference = next((m for m in ("full_cudnn", "full_xla") if any(
      lookup.get((m, length), {}).get("status") == "ok"
      for length in cfg["lengths"])), None)
  hierarchical = [m for m in methods if m.startswith("hierarchical_")]
  if reference is None or not hierarchical:
    return []
  with_targets = reference == "full_cudnn" and "hierarchical_16" in methods
  header = ["length"] + [
      f"{method_label(m)} / {method_label(reference)}" for m in hierarchical]
  if with_targets:
    header += ["target (hier-16)", "met"]
  rows = []
  for length in cfg["lengths"]:
    ref = lookup.get((reference, length))
    ref_ms, approx = None, ""
    if ref and ref["fwd_bwd"].get("median_ms") is not None:
      ref_ms = ref["fwd_bwd"]["median_ms"]
    elif ref and ref["fwd_bwd"].get("estimated_ms") is not None:
      ref_ms, approx = ref["fwd_bwd"]["estimated_ms"], "~"
    row, ratios = [format_length(length)], {}
    for method in hierarchical:
      res = lookup.get((method, length))
      ms = res["fwd_bwd"].get("median_ms") if res else None
      if ms is None or ref_ms is None:
        row.append("")
        continue
      ratios[method] = ms / ref_ms
      row.append(f"{approx}{ratios[method]:.3f}")
    if with_targets:
      target = RATIO_TARGETS.get(length)
      ratio = ratios.get("hierarchical_16")
      row.append("" if target is None else f"≤ {target}")
      row.append("" if target is None or ratio is None else
                 ("yes" if ratio <= target else "no"))
    rows.append(row)
  lines = ["", f"Forward+backward time of hierarchical attention over "
           f"{method_label(reference)} full attention (lower is better; "
           "~ marks a ratio to an estimated time):", ""]
  return lines + markdown_table(header, rows)


# Targets of the fused kernels at 65,536 tokens per batch (bfloat16, heads
# 8): blocks of 16 at head_dim 64; blocks of 64, or head_dim 128, get twice
# the time. A longer sequence at batch 1 holds length / 65,536 times the
# tokens and gets that many times the time. Within FLOOR_TARGET times the
# memory-traffic floor everywhere.
KERNEL_TARGET_MS = {"fwd": 0.3, "fwd_bwd": 0.8}
TARGET_FACTOR = {(16, 64): 1, (64, 64): 2, (16, 128): 2}
FLOOR_TARGET = 3.0


def kernel_target_ms(cfg: dict, method: str, length: int,
                     phase: str) -> float | None:
  """The target time of ``method`` (a fused kernel) at ``length``, or None
  where no target was set (other block sizes, head dims, dtypes, heads or
  tokens per batch)."""
  if not method.endswith("_pallas"):
    return None
  factor = TARGET_FACTOR.get((_hier_parts(method)[0], cfg["head_dim"]))
  if (factor is None or cfg["dtype"] != "bfloat16" or cfg["heads"] != 8
      or cfg["tokens"] != 65536):
    return None
  scale = max(1.0, batch_for(length, cfg["tokens"]) * length /
              cfg["tokens"])
  return KERNEL_TARGET_MS[phase] * factor * scale


def floor_bytes(cfg: dict, length: int, phase: str) -> int:
  """Memory-traffic floor: read q, k, v and write out once (forward); the
  backward also reads q, k, v, out, d_out and writes dq, dk, dv."""
  tokens = batch_for(length, cfg["tokens"]) * length * cfg["heads"]
  unit = tokens * cfg["head_dim"] * np.dtype(cfg["dtype"]).itemsize
  return unit * (4 if phase == "fwd" else 12)


def kernel_lines(report: dict, lookup: dict) -> list[str]:
  """Fused kernels: time against the memory floor and the targets."""
  cfg, env = report["config"], report["environment"]
  kernels = [m for m in cfg["methods"] if m.endswith("_pallas")]
  copy = env.get("copy_gbps")
  if not kernels:
    return []
  header = ["length", "method"]
  for phase in ("fwd", "fwd+bwd"):
    header += [f"{phase} ms", "floor ms", "x floor", "achieved GB/s",
               "target ms", "met"]
  rows = []
  for length in cfg["lengths"]:
    for method in kernels:
      res = lookup.get((method, length))
      if not res or res["status"] != "ok":
        continue
      row = [format_length(length), method_label(method)]
      for phase in PHASES:
        ms = res[phase]["median_ms"]
        nbytes = floor_bytes(cfg, length, phase)
        floor_ms = nbytes / (copy * 1e9) * 1e3 if copy else None
        target = kernel_target_ms(cfg, method, length, phase)
        row += [format_ms(ms),
                "" if floor_ms is None else f"{floor_ms:.3f}",
                "" if floor_ms is None else f"{ms / floor_ms:.1f}",
                f"{nbytes / (ms * 1e-3) / 1e9:.0f}",
                "" if target is None else f"{target:g}",
                "" if target is None else ("yes" if ms <= target else "no")]
      rows.append(row)
  note = env.get("copy_note", "measured in the same run")
  copy_text = (f"{copy:,.0f} GB/s (a 1 GiB bfloat16 array doubled, the "
               "fastest of XLA, a Pallas kernel and, on Hopper, a Mosaic "
               f"GPU kernel, bytes read + written, {note})" if copy
               else "not measured")
  lines = ["", "Fused kernels against the memory-traffic floor: the bytes "
           "that any implementation must move (forward: read q, k, v and "
           "write the output; forward+backward: also read q, k, v, the "
           "output and its cotangent and write dq, dk, dv), at the card's "
           f"copy bandwidth of {copy_text}. Achieved = floor bytes / time. "
           "x floor: time / floor (target: at most "
           f"{FLOOR_TARGET:g}). Targets at 65,536 tokens, bfloat16, heads 8: "
           "forward 0.3 ms and forward+backward 0.8 ms at blocks of 16 and "
           "head_dim 64, twice those at blocks of 64 or head_dim 128, "
           "scaled by the tokens at longer lengths; none elsewhere.", ""]
  return lines + markdown_table(header, rows)


def render_markdown(report: dict) -> tuple[str, str]:
  """Returns (heading, body) of the markdown section for ``report``."""
  cfg, env = report["config"], report["environment"]
  lookup = {(r["method"], r["length"]): r for r in report["results"]}
  methods = cfg["methods"]
  commands = "; ".join(f"`{c}`" for c in env["commands"])
  lines = [f"Card: {env['device_kind']} · date: {env['date']} · jax "
           f"{env['jax_version']} · command: {commands}", ""]
  header = ["length", "batch"]
  for m in methods:
    label = method_label(m)
    header += [f"{label} fwd ms", f"{label} fwd+bwd ms", f"{label} peak GiB"]
  rows = []
  for length in cfg["lengths"]:
    row = [format_length(length), str(batch_for(length, cfg["tokens"]))]
    for m in methods:
      res = lookup.get((m, length))
      row += [time_cell(res, "fwd"), time_cell(res, "fwd_bwd"),
              peak_cell(res)]
    rows.append(row)
  lines += markdown_table(header, rows)
  lines += [
      "",
      f"Times: median of {cfg['repeats']} runs after compiling and "
      f"{cfg['warmup']} warm-up runs (a run issues calls back to back for "
      "at least 20 ms and counts the time per call); fwd+bwd is `jax.value_and_grad` of "
      "`sum(out * cotangent)` with respect to q, k and v. Peak: the fwd+bwd "
      "run's device memory high-water mark (`peak_bytes_in_use`) in a "
      "process of its own, inputs included; * marks the compiler's estimate "
      "(`memory_analysis()`: arguments + outputs + temporaries) where no "
      "measurement was made. Skipped: full attention above "
      f"{format_length(cfg['full_max_length'])} (quadratic time, estimated "
      "by batch·L² scaling from the longest measured length), dense XLA "
      f"above {format_length(cfg['skip_xla_dense_above'])} (it materialises "
      "the L² logits).",
  ]
  lines += ratio_lines(report, lookup)
  lines += kernel_lines(report, lookup)
  return section_heading(cfg), "\n".join(lines) + "\n"


def update_markdown(path: str, heading: str, body: str) -> None:
  """Replaces the section titled ``heading`` in ``path`` or appends it."""
  text = "# Benchmarks\n"
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  lines = text.splitlines()
  section = [heading, ""] + body.rstrip("\n").splitlines()
  if heading in lines:
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith(("# ", "## "))), len(lines))
    tail = lines[end:]
    lines = lines[:start] + section + ([""] + tail if tail else [])
  else:
    while lines and not lines[-1].strip():
      lines.pop()
    lines += [""] + section
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_json(path: str, report: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
    f.write("\n")
  os.replace(path + ".tmp", path)


def progress_line(res: dict) -> str:
  parts = [f"{res['method']:<16} L={format_length(res['length']):>5} "
           f"B={res['batch']:<4}"]
  if res["status"] == "skipped":
    return parts[0] + " " + skip_note(res, "fwd_bwd")
  for phase, name in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
    unit = " ms" if res[phase]["status"] == "ok" else ""
    parts.append(f"{name} {time_cell(res, phase):>8}{unit}")
  if res["fwd_bwd"]["status"] == "ok":
    gib, measured = peak_gib(res)
    if gib is not None:
      parts.append(f"peak {gib:.2f} GiB" + ("" if measured else " (compiled)"))
  errors = dict.fromkeys(res[p]["error"] for p in PHASES if "error" in res[p])
  return "  ".join(parts + [f"[{e}]" for e in errors])


# ---------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      help=f"sequence lengths (default {DEFAULT_LENGTHS})")
  parser.add_argument("--methods", type=check_method, nargs="+",
                      help=f"methods (default {DEFAULT_METHODS}): full_cudnn "
                      "(GPU), full_xla, hierarchical_<block_size> (plain "
                      "XLA) or hierarchical_<block_size>_pallas (fused "
                      "kernels, GPU); GPU methods are skipped elsewhere")
  parser.add_argument("--dropout_rate", type=float, default=0.0,
                      help="attention dropout of the hierarchical and XLA "
                      "methods (cuDNN's has none and runs without)")
  parser.add_argument("--causal", action="store_true",
                      help="causal attention (default non-causal)")
  parser.add_argument("--repeats", type=int, help="timed runs (default 10)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed runs after compiling (default 2)")
  parser.add_argument("--tokens", type=int,
                      help="tokens per batch: batch = max(1, tokens // length)"
                      " (default 65536)")
  parser.add_argument("--heads", type=int, help="heads (default 8)")
  parser.add_argument("--head_dim", type=int, default=64,
                      help="head dim (default 64)")
  parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                      help="input dtype (default bfloat16)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the random inputs (default 0)")
  parser.add_argument("--out_json", help="file for the raw results "
                      "(default: none; the repository's records are "
                      "docs/benchmark_attention.json, plain XLA, and "
                      "docs/benchmark_kernels.json, fused kernels)")
  parser.add_argument("--out_md", help="markdown file whose section to write "
                      "(default: none, the table is printed; the "
                      "repository's record is docs/benchmarks.md)")
  parser.add_argument("--merge", action="store_true",
                      help="keep the results in --out_json that this run does"
                      " not redo (to split a benchmark over several runs)")
  parser.add_argument("--skip_xla_dense_above", type=int, default=16384,
                      help="skip full_xla above this length (it materialises"
                      " the L^2 logits; default 16384)")
  parser.add_argument("--full_max_length", type=int, default=65536,
                      help="skip full attention above this length; its time "
                      "is estimated by L^2 scaling (default 65536)")
  parser.add_argument("--isolate", action=argparse.BooleanOptionalAction,
                      help="run each (method, length) in its own process, for "
                      "a true peak memory per measurement (default: on GPU)")
  parser.add_argument("--timeout_s", type=float, default=1200,
                      help="time limit in seconds of one isolated (method, "
                      "length) (default 1200)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes and plain-XLA methods only, to check "
                      "the script on a CPU: " + ", ".join(
                          f"{k}={v}" for k, v in SMOKE.items()))
  parser.add_argument("--tuning", nargs="+", default=[], metavar="KEY=VALUE",
                      help="launch settings of the fused kernels to use "
                      "instead of the defaults (keys of htransformer/"
                      "attention/kernels.py TUNING, e.g. num_warps=4)")
  parser.add_argument("--jobs", type=int, default=1,
                      help="measure this many (method, length) pairs at a "
                      "time, each in a process of its own (as --isolate): "
                      "they compile side by side, then time one at a time "
                      "(default 1)")
  parser.add_argument("--single", nargs=2, metavar=("METHOD", "LENGTH"),
                      help=argparse.SUPPRESS)  # internal: one measurement
  parser.add_argument("--_turns", help=argparse.SUPPRESS)  # a --jobs worker
  parser.add_argument("--probe", action="store_true",
                      help=argparse.SUPPRESS)  # internal: environment only
  args = parser.parse_args(argv)

  defaults = dict(lengths=DEFAULT_LENGTHS, methods=DEFAULT_METHODS,
                  tokens=65536, heads=8, repeats=10)
  if args.smoke:
    defaults.update(SMOKE)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, list(value) if isinstance(value, tuple) else value)
  for name, least in (("lengths", 1), ("repeats", 1), ("warmup", 0),
                      ("tokens", 1), ("heads", 1), ("head_dim", 1),
                      ("jobs", 1)):
    values = getattr(args, name)
    for v in values if isinstance(values, list) else [values]:
      if v < least:
        parser.error(f"--{name} must be at least {least}, got {v}")
  if not 0 <= args.dropout_rate < 1:
    parser.error(f"--dropout_rate must be in [0, 1), got {args.dropout_rate}")
  if args.timeout_s <= 0:
    parser.error(f"--timeout_s must be positive, got {args.timeout_s}")
  if args.jobs > 1 and args.isolate is False:
    parser.error("--jobs runs each measurement in a process of its own: "
                 "drop --no-isolate")
  args.lengths = sorted(set(args.lengths))
  args.methods = list(dict.fromkeys(args.methods))
  try:
    args.tuning_values = apply_tuning(args.tuning)
  except ValueError as e:
    parser.error(str(e))
  # (A child measures one method, whichever, with the parent's flags.)
  top = not (args.single or args.probe)
  if top and args.tuning and not any(
      m.endswith("_pallas") for m in args.methods):
    parser.error("--tuning sets the fused kernels' launch settings: add a "
                 "hierarchical_<block_size>_pallas method to --methods")
  return args


def apply_tuning(items: list[str]) -> dict:
  """Sets ``kernels.TUNING`` from KEY=VALUE strings; returns what it set."""
  from htransformer.attention import kernels  # pylint: disable=g-import-not-at-top
  try:
    values = kernels.parse_tuning(items)
  except ValueError as e:
    raise ValueError(f"--tuning {e}") from None
  kernels.TUNING.update(values)
  return values


def main() -> None:
  args = parse_args()
  if args.probe:
    print(RESULT_MARKER + json.dumps(environment_info(measure_copy=True)),
          flush=True)
    return
  if args.single:
    method, length = check_method(args.single[0]), int(args.single[1])
    turns = args._turns and profiling.Turns.of_worker(args._turns)
    result = measure(method, length, args, isolated=True, turns=turns)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return

  # With isolation the parent process must leave the accelerator alone, so
  # it learns about the device from a child.
  if args.isolate is False:
    env = environment_info(measure_copy=True)
  else:
    env = run_child(["--probe"], args)
    if "device_kind" not in env:
      sys.exit(f"could not start JAX in a child process: {env}")
  isolate = (env["platform"] == "gpu") if args.isolate is None else (
      args.isolate)
  isolate = isolate or args.jobs > 1
  env["date"] = datetime.datetime.now().astimezone().isoformat(
      timespec="seconds")
  env["commands"] = ["python " + shlex.join(sys.argv)]
  config = {key: getattr(args, key) for key in (
      "tokens", "heads", "head_dim", "dtype", "causal", "repeats", "warmup",
      "seed", "lengths", "methods", "skip_xla_dense_above",
      "full_max_length", "dropout_rate")}
  config["isolate"] = isolate
  if args.tuning_values:
    config["tuning"] = args.tuning_values
  previous = (load_previous(args.out_json, config, env) if args.merge
              else None)

  args.platform = env["platform"]  # methods that need a GPU skip elsewhere
  print(f"device: {env['device_kind']} ({env['platform']}) · jax "
        f"{env['jax_version']} · python {env['python_version']} · "
        f"{env['date']}")
  print(f"command: {env['commands'][0]}")
  print(f"batch x length = {args.tokens:,} tokens, heads {args.heads}, "
        f"head_dim {args.head_dim}, {args.dtype}, "
        f"{'causal' if args.causal else 'non-causal'}, isolate={isolate}",
        flush=True)

  results = []
  order = [(method, length) for length in args.lengths
           for method in args.methods]
  while order:
    method, length = order[0]
    reason = skip_reason(method, length, args)
    if reason:
      done = [skipped_result(method, length, reason, args)]
    elif args.jobs > 1:  # the next pairs up to a skipped one, in turns
      batch = []
      while (order[len(batch):] and len(batch) < args.jobs
             and not skip_reason(*order[len(batch)], args)):
        batch.append(order[len(batch)])
      done = measure_in_turns(batch, args)
    elif isolate:
      done = [measure_isolated(method, length, args)]
    else:
      done = [measure(method, length, args, isolated=False)]
    del order[:len(done)]
    for res in done:
      results.append(res)
      report = build_report(config, env, results, previous)  # estimates too
      print(progress_line(res), flush=True)
      if args.out_json:  # after every measurement: survives an interruption
        write_json(args.out_json, report)

  heading, body = render_markdown(report)
  print("\n" + heading + "\n\n" + body)
  if args.out_json:
    print(f"wrote {args.out_json}")
  if args.out_md:
    update_markdown(args.out_md, heading, body)
    print(f"wrote section to {args.out_md}")
  if args.out_json:
    print(f"plot: python scripts/plot_benchmark.py --json {args.out_json} "
          f"--out {os.path.splitext(args.out_json)[0]}.png")
  failed = sorted({f"{r['method']} at {r['length']}" for r in results
                   if any(r[p]["status"] == "error" for p in PHASES)})
  if failed:
    sys.exit(f"{len(failed)} measurement(s) failed: {', '.join(failed)} "
             "(the error is in its line above).")


if __name__ == "__main__":
  main()
