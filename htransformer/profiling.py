"""Where device time goes: a JAX profiler trace summarised by operation.

``device_profile(fn, steps)`` traces ``steps`` calls of ``fn`` and returns
the device time per call, by operation (XLA fusions, cuDNN and Pallas
kernels) and by kernel name without its instance number (e.g. every
``hattn_fwd_l0``). Used by scripts/step_time.py (a training step) and
scripts/profile_kernels.py (the attention alone). On a GPU, XLA's command
buffers hide the kernels of a step behind one entry: set
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to see them.

``copy_kernel(kind)`` is the device's copy ceiling to time: a 1 GiB
bfloat16 array doubled by XLA, a Pallas (Triton) kernel or a Mosaic GPU
kernel (on an H200 the Triton kernel moves about 20% more bytes per second
than XLA's, the Mosaic GPU one a little more again: 3,970 and 4,020
against 3,300 GB/s, docs/benchmarks.md).

``calls_per_run(call, min_s)`` is how many back-to-back calls a timed run
of the benchmark scripts issues, so that the host's dispatch latency does
not count.

``Turns`` lets the scripts' worker processes compile side by side and then
time one at a time (``--jobs``): most of a measurement's cost is compiling
(the kernels' lowering in Python, which JAX's persistent cache does not
keep), a cost the host's cores can share, while timings must have the
device alone.
"""

import collections
import contextlib
import fcntl
import glob
import gzip
import json
import os
import re
import signal
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Rows of 1,024 elements per program of the Pallas copy (64 KiB of
# bfloat16 read and written).
_COPY_ROWS = 32


def copy_kernel(kind: str = "xla", rows: int = 2**19, interpret=False):
  """(fn, x, bytes moved per call): ``fn(x)`` doubles ``x``, a bfloat16
  [rows, 1024] array (1 GiB by default), through XLA (``kind`` "xla"), a
  Pallas kernel of [32, 1024] blocks ("pallas", the ceiling for kernels
  written as the attention's are) or a Mosaic GPU kernel ("mosaic":
  ``attention.mosaic.double``; Hopper GPUs and newer). Bytes are those
  read plus written."""
  if kind not in ("xla", "pallas", "mosaic"):
    raise ValueError("copy kind must be 'xla', 'pallas' or 'mosaic', got "
                     f"{kind!r}.")
  if rows % _COPY_ROWS:
    raise ValueError(f"rows must be a multiple of {_COPY_ROWS}, got {rows}.")
  x = jnp.ones((rows, 1024), jnp.bfloat16)
  if kind == "xla":
    fn = lambda x: x * 2
  elif kind == "mosaic":  # [256, 128] tiles (rows % 32: a whole number)
    from htransformer.attention import mosaic
    fn = lambda x: mosaic.double(x.reshape(-1, 128),
                                 interpret=interpret).reshape(x.shape)
  else:
    def double(x_ref, o_ref):
      o_ref[...] = x_ref[...] * 2

    spec = pl.BlockSpec((_COPY_ROWS, 1024), lambda i: (i, 0))
    fn = lambda x: pl.pallas_call(
        double, grid=(x.shape[0] // _COPY_ROWS,), in_specs=[spec],
        out_specs=spec, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        interpret=interpret, name="copy_ceiling")(x)
  return fn, x, 2 * x.nbytes


def calls_per_run(call, min_s: float, most: int = 200,
                  tries: int = 3) -> int:
  """Calls of ``call`` (which returns arrays) that back to back take about
  ``min_s`` seconds (1 to ``most``), from the fastest of ``tries`` single
  calls: one call that waits on the host (a slow dispatch after the
  warm-up) would otherwise set too few, and runs of too few calls time
  the host's latency instead of the device's work (on an H200, one
  benchmark method's median was 1.56 ms per call in runs of 3 calls, set
  by one slow call, and 1.21 in runs of 13 in another process:
  docs/benchmarks.md)."""
  fastest = float("inf")
  for _ in range(tries):
    start = time.perf_counter()
    jax.block_until_ready(call())
    fastest = min(fastest, time.perf_counter() - start)
  return int(min(most, max(1, min_s // max(fastest, 1e-6))))


def device_profile(fn, steps: int, top: int = 25) -> dict:
  """Traces ``steps`` calls of ``fn``; returns the busiest device ops."""
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(steps):
        fn()
    paths = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"),
                      recursive=True)
    if not paths:
      raise RuntimeError(f"The profiler wrote no trace under {logdir}.")
    with gzip.open(paths[0]) as f:
      trace = json.load(f)
  return summarize_trace(trace, steps, top)


# Idle time between kernels longer than this (us) is the host's, between
# steps, not a launch gap inside one.
_STEP_GAP_US = 20.0


def summarize_trace(trace, steps, top):
  """Device time by operation and by kernel name in a perfetto trace."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, n in names.items()
            if "/device:" in n and "CPU" not in n}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  kernels = [e for e in events if e.get("ph") == "X" and e["pid"] in device
             and e.get("dur")]
  # GPU traces show each kernel on its stream and again on summary lines
  # ("XLA Ops", "XLA Modules"); count the streams only.
  streams = [e for e in kernels
             if "Stream" in threads.get((e["pid"], e.get("tid")), "")]
  kernels = streams or kernels
  if not kernels:
    return {"note": "no device events in the trace (CPU backend?)"}
  by_op = collections.defaultdict(lambda: [0.0, 0])
  by_kind = collections.defaultdict(lambda: [0.0, 0])
  for e in kernels:
    args = e.get("args") or {}
    for table, key in ((by_op, args.get("hlo_op") or e["name"]),
                       # The kernel's name without its instance number:
                       # e.g. all forward kernels of the finest level.
                       (by_kind, re.sub(r"[._]\d+$", "", e["name"]))):
      table[key][0] += e["dur"]
      table[key][1] += 1
  busy = sum(v[0] for v in by_op.values())
  start = min(e["ts"] for e in kernels)
  end = max(e["ts"] + e["dur"] for e in kernels)
  # Launch gaps inside a step: idle time between the kernels so far and
  # the next one's start, where shorter than _STEP_GAP_US.
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
  reach, idle = spans[0][1], 0.0
  for ts, te in spans[1:]:
    if 0 < ts - reach < _STEP_GAP_US:
      idle += ts - reach
    reach = max(reach, te)

  def rows(table):
    return [{"op": k, "ms_per_step": round(v[0] / 1e3 / steps, 3),
             "share": round(v[0] / busy, 4), "calls_per_step": v[1] / steps}
            for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]]

  return {
      "device_ms_per_step": round(busy / 1e3 / steps, 3),
      "wall_ms_per_step": round((end - start) / 1e3 / steps, 3),
      "kernels_per_step": round(len(kernels) / steps, 1),
      "gap_ms_per_step": round(idle / 1e3 / steps, 3),
      "top": rows(by_op), "top_kernels": rows(by_kind)}


class Turns:
  """Worker ``index`` of ``jobs`` processes sharing the folder ``sync``:
  each compiles its work, calls ``ready()``, then times its work inside
  ``turn()``, which lets it in once every worker is ready and only while
  no other worker is timing (a file lock).

  The process that starts the workers passes each its ``argument(sync,
  index, jobs)`` (which the worker turns back into its ``Turns`` with
  ``of_worker``, ending with its parent) and waits for them with
  ``wait_for``, which marks ready any worker that ended before it was, so
  that the others are not held waiting."""

  def __init__(self, sync: str, index: int, jobs: int):
    self.sync, self.index, self.jobs = sync, index, jobs

  @staticmethod
  def argument(sync: str, index: int, jobs: int) -> str:
    """What worker ``index`` is told: the folder, its place, and this
    (its parent) process."""
    return f"{sync}/{index}/{jobs}/{os.getpid()}"

  @classmethod
  def of_worker(cls, argument: str) -> "Turns":
    """The worker's ``Turns`` from its ``argument``; from here on the
    worker ends when its parent does (``end_with_parent``)."""
    sync, index, jobs, parent = argument.rsplit("/", 3)
    end_with_parent(int(parent))
    return cls(sync, int(index), int(jobs))

  @staticmethod
  def _mark_ready(sync: str, index: int) -> None:
    open(os.path.join(sync, f"ready.{index}"), "a").close()

  @classmethod
  def wait_for(cls, workers, sync: str, timeout_s: float | None = None):
    """Waits until the processes ``workers`` (``subprocess.Popen``, the
    i-th worker i) have ended, killing them all past ``timeout_s``;
    returns whether it did."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    killed = False
    while any(w.poll() is None for w in workers):
      for i, w in enumerate(workers):
        if w.poll() is not None:  # done, or died before it was ready
          cls._mark_ready(sync, i)
      if deadline is not None and time.monotonic() > deadline:
        for w in workers:
          w.kill()
        killed = True
      time.sleep(0.2)
    return killed

  def ready(self) -> None:
    self._mark_ready(self.sync, self.index)

  @contextlib.contextmanager
  def turn(self):
    while sum(name.startswith("ready.")
              for name in os.listdir(self.sync)) < self.jobs:
      time.sleep(0.2)
    with open(os.path.join(self.sync, "turn.lock"), "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def end_with_parent(parent: int) -> None:
  """This process ends when ``parent`` does (Linux: the kernel signals it),
  so that a worker of a stopped run neither holds the device nor waits
  for its turn; it ends now if ``parent`` already has."""
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # DEATHSIG
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent:
    sys.exit("the run that started this worker has ended")
