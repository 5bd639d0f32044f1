"""htransformer/data/cache.py: generated data built once, never half-written."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from htransformer.data import cache
from tests.scripts_helper import ROOT


def test_build_once_writes_once_and_marks_complete(tmp_path):
  calls = []

  def write(folder):
    calls.append(folder)
    with open(os.path.join(folder, "data.txt"), "w") as f:
      f.write("x")

  d = cache.build_once(str(tmp_path), "set", write)
  assert d == str(tmp_path / "set") and cache.is_complete(d)
  assert open(os.path.join(d, "data.txt")).read() == "x"
  assert cache.build_once(str(tmp_path), "set", write) == d
  assert len(calls) == 1
  assert os.listdir(tmp_path) == ["set"]  # No temporary or lock files left.


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path):
  def write(folder):
    with open(os.path.join(folder, "half.txt"), "w") as f:
      f.write("x")
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    cache.build_once(str(tmp_path), "set", write)
  assert not os.path.exists(tmp_path / "set")
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_concurrent_processes_build_once(tmp_path):
  """Runs started together (a sweep) wait for the first one's data."""
  log = tmp_path / "writes.log"
  code = textwrap.dedent(f"""
      import os, sys, time
      sys.path.insert(0, {ROOT!r})
      from htransformer.data import cache
      def write(folder):
        with open({str(log)!r}, "a") as f:
          f.write(str(os.getpid()) + "\\n")
        time.sleep(1.0)
        open(os.path.join(folder, "data.txt"), "w").write("x")
      print(cache.build_once({str(tmp_path / "c")!r}, "set", write))
  """)
  procs = [subprocess.Popen([sys.executable, "-c", code],
                            stdout=subprocess.PIPE, text=True)
           for _ in range(3)]
  outs = [p.communicate(timeout=120)[0].strip() for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert outs == [str(tmp_path / "c" / "set")] * 3
  assert len(log.read_text().split()) == 1  # Built by one process only.
  assert os.listdir(tmp_path / "c") == ["set"]


def test_build_after_a_killed_build_removes_its_leftovers(tmp_path):
  """SIGKILL skips a build's cleanup; the next build of that entry removes
  the temporary folder it left (under the lock), other entries' stay."""
  cache_dir = tmp_path / "c"
  code = textwrap.dedent(f"""
      import os, sys, time
      sys.path.insert(0, {ROOT!r})
      from htransformer.data import cache
      def write(folder):
        open(os.path.join(folder, "half.txt"), "w").write("x")
        print("writing", flush=True)
        time.sleep(600)
      cache.build_once({str(cache_dir)!r}, "set", write)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "writing"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  left = [n for n in os.listdir(cache_dir) if n.startswith(".set.tmp")]
  assert len(left) == 1 and os.path.isfile(cache_dir / left[0] / "half.txt")
  # Another entry's temporary folders (names that start alike included).
  others = [".set.tmpx.tmpabc", ".settmpabc", ".other.tmpabc"]
  for n in others:
    os.makedirs(cache_dir / n)

  def write(folder):
    with open(os.path.join(folder, "data.txt"), "w") as f:
      f.write("y")

  d = cache.build_once(str(cache_dir), "set", write)
  assert open(os.path.join(d, "data.txt")).read() == "y"
  assert sorted(os.listdir(cache_dir)) == sorted(["set"] + others)


def test_a_folder_in_place_without_the_marker_is_built_again(tmp_path):
  """A folder at the entry's place without the completion marker (copied
  by hand and cut short, or written in place by an older version) is not
  taken as data: it is replaced by a complete build."""
  stale = tmp_path / "set"
  stale.mkdir()
  (stale / "half.txt").write_text("x")

  def write(folder):
    with open(os.path.join(folder, "data.txt"), "w") as f:
      f.write("y")

  d = cache.build_once(str(tmp_path), "set", write)
  assert sorted(os.listdir(d)) == sorted([cache.COMPLETE_MARKER, "data.txt"])
  assert open(os.path.join(d, "data.txt")).read() == "y"
  assert os.listdir(tmp_path) == ["set"]
