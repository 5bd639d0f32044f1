"""Metric writing: WORKDIR/metrics.jsonl always, TensorBoard when available.

Only process 0 writes. TensorBoard event files go through
``clu.metric_writers`` when TensorFlow is installed; on hosts without it
(e.g. accelerator images) the JSON lines and the console line remain.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging


def _tensorboard_writer(logdir):
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.info("TensorFlow not installed: no TensorBoard events, only "
                 "metrics.jsonl.")
    return None
  return metric_writers.SummaryWriter(logdir)


class MetricWriter:
  """Writes scalars to metrics.jsonl (and TensorBoard) from process 0."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = _tensorboard_writer(workdir) if self.active else None

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), {k: float(v) for k, v in
                                         scalars.items()})
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All rows of WORKDIR/metrics.jsonl (empty if there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Console progress line: step, steps/s, ETA and the latest numbers."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.last_step = start_step
    self.last_time = time.time()

  def report(self, step: int, scalars: dict) -> float:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    parts = [f"step {step}/{self.total}", f"{rate:.2f} steps/s",
             f"ETA {_fmt_time(eta)}"]
    parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
    if jax.process_index() == 0:
      print(" | ".join(parts), flush=True)
    return rate


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
