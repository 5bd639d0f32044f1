"""Metric writing: WORKDIR/metrics.jsonl always, TensorBoard when available.

Only process 0 writes. TensorBoard event files go through
``clu.metric_writers`` when TensorFlow is installed; on hosts without it
(e.g. accelerator images) the JSON lines and the console line remain.

A resumed run writes again the steps logged after its checkpoint. In
metrics.jsonl the earlier rows of those steps are dropped first
(``MetricWriter.rewind``); event files can only be appended to, so the
resumed run's events go to a new file beside the old one, and TensorBoard
may show those steps twice: the same values (the steps are recomputed
exactly), except ``steps_per_sec``. metrics.jsonl is the record.

NaN and infinities go into JSON (metrics.jsonl, results.json) as the
strings "nan", "inf" and "-inf" (``json_safe``).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging

from htransformer import tf_util


def json_safe(value):
  """``value`` (a number, or a dict of them, nested) with each NaN or
  infinity as the string "nan", "inf" or "-inf": JSON has no such numbers
  (``json.dumps`` would write a bare ``NaN``, which strict readers refuse)."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _tensorboard_writer(logdir):
  # Imported with the GPUs hidden from it (``tf_util``), before clu.
  if tf_util.import_tensorflow() is None:
    logging.info("TensorFlow not installed: no TensorBoard events, only "
                 "metrics.jsonl.")
    return None
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # clu, or the tensorboard package it uses.
    logging.info("No TensorBoard events, only metrics.jsonl: clu's writer "
                 "could not be imported (%s).", e)
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
      row[k] = json_safe(float(v))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), {k: float(v) for k, v in
                                         scalars.items()})
      self._tb.flush()

  def rewind(self, step: int, redo_final: bool = False):
    """Drops the rows a run resumed at ``step`` writes again: those after
    ``step`` (logged after the checkpoint it resumes from) and, with
    ``redo_final``, the final evaluation's rows at ``step`` (``test_*``).
    A row cut short by a kill goes too. The file is replaced in one rename,
    so a crash leaves the old or the new one."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
        row_step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        logging.warning("Dropping a torn line of %s: %r", self.path, line)
        continue
      if row_step > step or (redo_final and row_step == step and any(
          k.startswith("test_") for k in row)):
        continue
      keep.append(line if line.endswith("\n") else line + "\n")
    if keep == lines:
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All rows of WORKDIR/metrics.jsonl (empty if there is none). A line cut
  short (a run killed while writing it, or one being written now) is left
  out, as a resume drops it (``MetricWriter.rewind``)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def read_record(workdir: str, name: str = "results.json") -> dict | None:
  """The JSON object a run wrote into WORKDIR/``name`` (results.json,
  config.json); None if it is missing, cut short (a run killed while
  writing it) or not an object."""
  try:
    with open(os.path.join(workdir, name)) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


class Progress:
  """Console progress line: step, steps/s, ETA and the latest numbers.

  steps/s counts the steps since the previous line, or since ``restart``
  if that came later: the loop restarts the clock after a segment's first
  step (which compiled the step function) and after each evaluation, so
  neither slows the rate. A line with no step since the restart (the
  segment's first step logged alone) has no rate: it would time the
  compilation. It shows "? steps/s" and "ETA ?".
  """

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self._clock = (start_step, time.time())

  def restart(self, step: int):
    """Times the next rate from ``step``, now."""
    self._clock = (step, time.time())

  def report(self, step: int, scalars: dict) -> float | None:
    """Prints the line of ``step`` (process 0); returns its steps/s, None
    where no step was timed since the restart."""
    now = time.time()
    start, since = self._clock
    rate = (step - start) / max(now - since, 1e-9) if step > start else None
    self._clock = (step, now)
    eta = (self.total - step) / rate if rate is not None else float("inf")
    parts = [f"step {step}/{self.total}",
             "? steps/s" if rate is None else f"{rate:.2f} steps/s",
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
