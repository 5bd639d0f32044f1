"""TensorFlow, where it is installed, kept off the accelerators.

TensorFlow is optional here (TensorBoard events through ``clu``, and
tensorflow-datasets, which imports it when present). Once imported, its
first operation would place itself on every GPU it sees and, by default,
reserve nearly all of their memory, leaving JAX to run out of memory at
its first large allocation. The project only asks TensorFlow to write
files and read records, so its accelerators are hidden from it as it is
imported, before any of its operations runs.
"""

from __future__ import annotations

import importlib
import importlib.util


def installed() -> bool:
  """Whether TensorFlow can be imported (without importing it)."""
  return importlib.util.find_spec("tensorflow") is not None


def import_tensorflow():
  """The ``tensorflow`` module with its GPUs and TPUs hidden from it, or
  None where it is not installed."""
  if not installed():
    return None
  try:
    tf = importlib.import_module("tensorflow")
  except ImportError:  # A broken install counts as none.
    return None
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      # RuntimeError: TensorFlow's devices were set up before (by the
      # caller's code); ValueError: no such device kind in this build.
      pass
  return tf
