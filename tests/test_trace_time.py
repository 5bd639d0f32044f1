"""scripts/trace_time.py: a stack of layers of one shape lowers the kernels
once; with --per_call, once per layer; --forward counts the XLA work
between the kernels (real runs, lowered for a GPU)."""

import json
import os
import subprocess
import sys

import pytest

from tests.scripts_helper import ROOT


def _rows(*flags):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "trace_time.py"),
       "--as_hopper", "--length", "256", "--tokens", "512", "--heads", "2",
       "--head_dim", "16", *flags],
      capture_output=True, text=True, timeout=600, check=False)
  if "No supported GPU devices found" in proc.stderr:
    pytest.skip("this jax lowers the Triton kernels only with a GPU")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.splitlines()]


def test_layers_of_one_shape_lower_the_kernels_once():
  one, three = _rows("--layers", "1", "3")
  assert (one["layers"], three["layers"]) == (1, 3)
  assert one["batch"] == 2 and one["kernel_calls"] > 0
  assert three["kernel_calls"] == one["kernel_calls"]
  one, three = _rows("--layers", "1", "3", "--per_call")
  assert three["kernel_calls"] == 3 * one["kernel_calls"]


def test_forward_ops_between_the_kernels():
  """--forward: at a length with no padding and no mask, the forward of
  three layers holds the kernels and the layers' three additions, nothing
  else; the gradient does more XLA work (the loss's sum, its gradient)."""
  forward, = _rows("--layers", "3", "--forward")
  assert forward["kernel_calls"] > 0
  assert forward["ops_outside_kernels"] == 3
  grad, = _rows("--layers", "3")
  assert grad["ops_outside_kernels"] > 3
  assert grad["kernel_calls"] > forward["kernel_calls"]


def test_gradient_ops_between_the_kernels():
  """The gradient of one layer, with no padding and no mask, holds the
  kernels and the three operations of the layer and its loss (a broadcast
  of the loss's gradient, its conversion, the layer's addition), nothing
  else: at head_dim 16 (the Triton kernels) and 64 (level 0 by Mosaic GPU
  kernels on Hopper, which take the counts and the prolongation weights
  as numbers: they were 21 more operations), where the level-0 forward
  adds one: the parent lse repeated for it (``mosaic.forward_level``)."""
  for head_dim, repeat in (("16", 0), ("64", 1)):
    row, = _rows("--layers", "1", "--head_dim", head_dim, "--show_ops")
    assert row["kernel_calls"] > 0
    assert row["ops_outside_kernels"] == 3 + repeat, head_dim
    assert row["ops"] == {"add": 1, "broadcast_in_dim": 1 + repeat,
                          "convert": 1}, head_dim

def test_layers_below_one_are_an_error():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "trace_time.py"),
       "--layers", "0"], capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 2
  assert "--layers must be at least 1, got [0]" in proc.stderr
