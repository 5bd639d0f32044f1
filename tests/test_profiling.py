"""htransformer/profiling.py: the device-time summary of a profiler trace
(what scripts/step_time.py and scripts/profile_kernels.py print)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htransformer import profiling
from htransformer.attention import mosaic
from tests.scripts_helper import ROOT, child_env, load_script


def _meta(kind, pid, name, tid=None):
  e = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
  if tid is not None:
    e["tid"] = tid
  return e


def _kernel(pid, tid, name, ts, dur, hlo_op=None):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts,
          "dur": dur, "args": {"hlo_op": hlo_op} if hlo_op else {}}


def test_summary_counts_stream_kernels_once_per_step():
  trace = {"traceEvents": [
      _meta("process_name", 1, "/host:CPU"),
      _meta("process_name", 2, "/device:GPU:0"),
      _meta("thread_name", 2, "Stream #1(Compute)", tid=7),
      _meta("thread_name", 2, "XLA Ops", tid=8),
      # Two steps: two instances of the finest forward kernel and a fusion.
      _kernel(2, 7, "hattn_fwd_l0", 0, 30.0, "pallas_call.3"),
      _kernel(2, 7, "hattn_fwd_l0", 40, 30.0, "pallas_call.9"),
      _kernel(2, 7, "loop_fusion_2", 80, 20.0, "loop_fusion.2"),
      _kernel(2, 7, "hattn_fwd_l0", 200, 30.0, "pallas_call.3"),
      _kernel(2, 7, "hattn_fwd_l0", 240, 30.0, "pallas_call.9"),
      _kernel(2, 7, "loop_fusion_2", 280, 20.0, "loop_fusion.2"),
      # The summary line repeats the kernels: not counted again.
      _kernel(2, 8, "pallas_call.3", 0, 30.0),
      # Host events are not device time.
      _kernel(1, 5, "PjitFunction", 0, 1000.0),
  ]}
  got = profiling.summarize_trace(trace, steps=2, top=5)
  assert got["device_ms_per_step"] == pytest.approx(0.08)
  assert got["wall_ms_per_step"] == pytest.approx(0.15)
  assert got["kernels_per_step"] == 3
  # Gaps of 10 us inside each step; the 100 us between steps is the host's.
  assert got["gap_ms_per_step"] == pytest.approx(0.02)
  kinds = {r["op"]: r for r in got["top_kernels"]}
  assert kinds["hattn_fwd_l0"]["ms_per_step"] == pytest.approx(0.06)
  assert kinds["hattn_fwd_l0"]["share"] == pytest.approx(0.75)
  assert kinds["hattn_fwd_l0"]["calls_per_step"] == 2
  assert [r["op"] for r in got["top"]][:1] in (["pallas_call.3"],
                                               ["pallas_call.9"])
  assert {r["op"] for r in got["top"]} == {"pallas_call.3", "pallas_call.9",
                                           "loop_fusion.2"}
  # A kernel's instance number is not its name: every loop_fusion_<n>.
  assert kinds["loop_fusion"]["calls_per_step"] == 1
  assert "loop_fusion_2" not in kinds


def test_summary_of_a_cpu_trace_says_so():
  trace = [_meta("process_name", 1, "/host:CPU"),
           _kernel(1, 5, "PjitFunction", 0, 10.0)]
  assert "note" in profiling.summarize_trace(trace, steps=1, top=5)


def test_device_profile_runs_on_cpu_and_scripts_load():
  """A real trace: on the CPU backend it has no device lines and says so;
  both scripts that print the summary import."""
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((64, 64))
  got = profiling.device_profile(lambda: f(x).block_until_ready(), steps=2)
  assert got.get("note") or got["device_ms_per_step"] > 0
  for name in ("step_time", "profile_kernels"):
    load_script(name)


def test_kernel_registers_captures_every_kernel_with_its_warps():
  """scripts/kernel_registers.py lowers the forward+backward for CUDA on
  this CPU host and keeps each kernel's Triton IR and warps (the part that
  needs no triton package; compiling it does)."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  from jax.experimental import pallas as pl
  script = load_script("kernel_registers")
  originals = (pl.pallas_call,
               registration.lowering.lower_jaxpr_to_triton_module)
  captured = script.capture_kernels(length=128, block_size=16, head_dim=64,
                                    causal=False, heads=2)
  # 128 tokens in blocks of 16: levels 0-2; 1 and 2 as the coarse tail
  # (kernels.TUNING["tail_rows"]: 128 rows over 2 heads at level 1).
  want = {"hattn_coarsen", "hattn_restrict", "hattn_fwd_l0", "hattn_dq_l0",
          "hattn_dkv_l0"} | {f"hattn_{kind}_l1" for kind in (
              "fwd_tail", "fwd_merge", "bwd_tail", "bwd_merge")}
  assert set(captured) == want
  text, warps, stages = captured["hattn_dkv_l0"]
  assert "tt.func public @hattn_dkv_l0" in text and "tt.dot" in text
  assert (warps, stages) == (1, 1)  # a tile of 16 rows on one warp
  # Pallas is left as it was.
  assert (pl.pallas_call,
          registration.lowering.lower_jaxpr_to_triton_module) == originals


def test_programs_per_sm_from_registers():
  """What Nsight Compute reported as the register limit of 1-warp programs
  on an H200: 164 and 168 registers -> 12, 243 and 255 -> 8, 128 -> 16."""
  script = load_script("kernel_registers")
  assert [script.programs_per_sm(r, 1) for r in (128, 164, 168, 243, 255)] \
      == [16, 12, 12, 8, 8]
  assert script.programs_per_sm(32, 1) == 32  # the SM's program limit
  assert script.programs_per_sm(128, 4) == 4


@pytest.mark.parametrize("kind", ["xla", "pallas", "mosaic"])
def test_copy_kernel_doubles_every_element(kind):
  """The copy ceiling's kernels (benchmark and profile scripts) write
  every element, counted once read and once written."""
  fn, x, nbytes = profiling.copy_kernel(kind, rows=96, interpret=True)
  x = jnp.arange(96 * 1024, dtype=jnp.float32).reshape(96, 1024) % 251
  out = np.asarray(jax.jit(fn)(x.astype(jnp.bfloat16)), np.float32)
  np.testing.assert_array_equal(out, 2 * np.asarray(x))
  assert nbytes == 2 * 96 * 1024 * 2


def test_copy_kernel_bad_arguments_are_named():
  with pytest.raises(ValueError, match="copy kind"):
    profiling.copy_kernel("cuda")
  with pytest.raises(ValueError, match=r"double takes \[n \* 256, 128\]"):
    mosaic.double(jnp.ones((100, 128), jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match="multiple of 32"):
    profiling.copy_kernel("pallas", rows=40)


def test_profile_kernels_compares_the_mosaic_level0_kernels(tmp_path,
                                                            monkeypatch):
  """``profile_kernels.py --mosaic_forward --mosaic_dq --mosaic_dkv
  --interpret``: the Mosaic GPU level-0 kernels against the Triton ones on
  the same inputs, both in interpret mode on this CPU (no device times),
  one row per kernel and length with each stage count's largest
  difference, within bfloat16 rounding of the outputs' size."""
  script = load_script("profile_kernels")
  out = tmp_path / "rows.json"
  monkeypatch.setattr(sys, "argv", [
      "profile_kernels.py", "--mosaic_forward", "--mosaic_dq", "--mosaic_dkv",
      "--interpret", "--lengths", "256", "--tokens", "256", "--stages", "1",
      "2", "--out", str(out)])
  script.main()
  rows = json.loads(out.read_text())
  assert [sorted(k for k in row if k.startswith("triton_")) for row in rows] \
      == [["triton_fwd_l0_device_ms"], ["triton_dq_l0_device_ms"],
          ["triton_dkv_l0_device_ms"]]
  for row, kind in zip(rows, ("fwd", "dq", "dkv")):
    for stages in (1, 2):
      name = f"mosaic_{kind}_l0_stages{stages}"
      assert name not in row, row.get(name)  # a failure's message
      if kind == "fwd":
        assert row[name + "_max_diff_o"] <= 2**-6 * 4, row
        assert row[name + "_max_diff_lse"] <= 1e-4, row
      else:
        assert 1 < row[name + "_max_abs"] < 1e3, row
        assert row[name + "_max_diff"] <= 2**-7 * row[name + "_max_abs"], row


def test_profile_kernels_sweeps_real_tuning_keys():
  """Each TUNING key ``profile_kernels.py`` sweeps is one the kernels have,
  its argument takes several values (``nargs="+"``) and defaults to the
  key's value (0 standing for the default where the key's is None or
  the pyramid's warps), so that a run without the argument times the
  defaults."""
  from htransformer.attention import kernels
  script = load_script("profile_kernels")
  args = script.make_parser().parse_args([])
  default = script.zero_means()
  for key, arg in script._SWEPT.items():
    assert key in kernels.TUNING, key
    values = getattr(args, arg)
    assert isinstance(values, list) and len(values) == 1, (arg, values)
    want = kernels.TUNING[key]
    assert values[0] == want or (not values[0] and default[key] == want), (
        key, values, want)


def test_profile_kernels_settings_set_tuning_in_order(monkeypatch):
  """``profile_kernels.settings`` yields every combination of tiles and
  swept values (the timing and ``--compile_only`` runs share it), each set
  in ``kernels.TUNING`` as it is yielded, and a swept 0 stays the key's
  default when a later pass (the next length) starts after another value
  was set."""
  from htransformer.attention import kernels
  # The settings set every swept key: a copy, put back after the test.
  monkeypatch.setattr(kernels, "TUNING", dict(kernels.TUNING))
  script = load_script("profile_kernels")
  args = script.make_parser().parse_args(
      ["--tiles", "16", "64", "--pyramid_warps", "0", "2",
       "--sweep_blocks", "8"])
  default = script.zero_means()
  for _ in range(2):  # two lengths
    seen = []
    for tile, tuning in script.settings(args, default):
      assert kernels.TUNING["pyramid_warps"] == tuning["pyramid_warps"]
      assert kernels.TUNING["sweep_blocks"] == 8
      seen.append((tile, tuning["pyramid_warps"]))
    assert seen == [(16, default["pyramid_warps"]), (16, 2),
                    (64, default["pyramid_warps"]), (64, 2)]


def test_profile_kernels_times_every_setting_in_interpret_mode(
    tmp_path, monkeypatch):
  """The timing run itself (``--interpret`` on this CPU): the pyramid
  row and one row per backward implementation swept, each with its
  TUNING values and a forward and forward+backward time."""
  from htransformer.attention import kernels
  # The run sets every swept key: a copy, put back after the test.
  monkeypatch.setattr(kernels, "TUNING", dict(kernels.TUNING))
  script = load_script("profile_kernels")
  out = tmp_path / "rows.json"
  monkeypatch.setattr(sys, "argv", [
      "profile_kernels.py", "--interpret", "--lengths", "64", "--tokens",
      "64", "--block_size", "16", "--tiles", "16", "--coarsen_impl", "dot",
      "--backward_l0_impl", "triton", "sweep", "--sweep_blocks", "2",
      "--out", str(out)])
  script.main()
  rows = json.loads(out.read_text())
  assert [sorted(row) for row in rows[:2]] == [
      ["device"], ["batch", "block_size", "head_dim", "length",
                   "pyramid_ms_dot_heads1_rows64"]]
  timed = rows[2:]
  assert [(row["tile"], row["backward_l0_impl"], row["sweep_blocks"])
          for row in timed] == [(16, "triton", 2), (16, "sweep", 2)]
  for row in timed:
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row


def test_profile_kernels_only_settings(tmp_path, monkeypatch):
  """``--only_settings``: no pyramid row (nor copy ceiling or cuDNN), the
  settings' rows as without it."""
  from htransformer.attention import kernels
  monkeypatch.setattr(kernels, "TUNING", dict(kernels.TUNING))
  script = load_script("profile_kernels")
  out = tmp_path / "rows.json"
  monkeypatch.setattr(sys, "argv", [
      "profile_kernels.py", "--interpret", "--only_settings", "--lengths",
      "64", "--tokens", "64", "--block_size", "16", "--tiles", "16",
      "--coarsen_impl", "dot", "--backward_l0_impl", "triton", "--out",
      str(out)])
  script.main()
  rows = json.loads(out.read_text())
  assert [sorted(row) for row in rows[:2]] == [
      ["device"], ["batch", "block_size", "head_dim", "length"]]
  assert [(row["tile"], row["backward_l0_impl"]) for row in rows[2:]] == [
      (16, "triton")]
  assert rows[2]["fwd_ms"] > 0 and rows[2]["fwd_bwd_ms"] > 0


def test_profile_kernels_workers_time_every_setting_once(tmp_path, capfd,
                                                         monkeypatch):
  """``--jobs 2``: two worker processes (this script again) compile four
  settings side by side (two each) and time them one at a time; ``--out``
  has each setting's row once, in the serial run's order, after the
  parent's own rows, and every worker's rows were printed as timed. Each
  row says how its own setting builds the pyramid (the worker times it
  after setting the others). The parent runs in this process (its
  workers in their own, in the environment of the processes the tests
  start)."""
  from htransformer.attention import kernels
  # The parent sets the pyramid's keys: a copy, put back after the test.
  monkeypatch.setattr(kernels, "TUNING", dict(kernels.TUNING))
  for name, value in child_env().items():
    monkeypatch.setenv(name, value)
  monkeypatch.chdir(ROOT)
  script = load_script("profile_kernels")
  out = tmp_path / "rows.json"
  monkeypatch.setattr(sys, "argv", [
      os.path.join(ROOT, "scripts", "profile_kernels.py"),
      "--interpret", "--jobs", "2", "--lengths", "64", "--tokens", "64",
      "--block_size", "16", "--tiles", "16", "--coarsen_impl", "dot",
      "xla", "--backward_l0_impl", "triton", "sweep", "--sweep_blocks",
      "2", "--out", str(out)])
  capfd.readouterr()
  script.main()
  stdout, stderr = capfd.readouterr()
  assert "of --jobs 2 failed" not in stderr, stderr[-3000:]
  rows = json.loads(out.read_text())
  assert [sorted(row) for row in rows[:2]] == [
      ["device"], ["batch", "block_size", "head_dim", "length",
                   "pyramid_ms_dot_heads1_rows64",
                   "pyramid_ms_xla"]]
  want = [("dot", "triton"), ("dot", "sweep"), ("xla", "triton"),
          ("xla", "sweep")]
  assert [(row["coarsen_impl"], row["backward_l0_impl"])
          for row in rows[2:]] == want
  # 64 tokens in blocks of 16: levels 0 and 1, the pyramid makes 1.
  assert [row["pyramid"] for row in rows[2:]] == [
      [f"{impl} 1"] for impl, _ in want]
  for row in rows[2:]:
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
  printed = [json.loads(line) for line in stdout.splitlines()
             if line.startswith("{") and '"fwd_ms"' in line]
  assert sorted((row["coarsen_impl"], row["backward_l0_impl"])
                for row in printed) == sorted(want)
  monkeypatch.setattr(sys, "argv", [
      "profile_kernels.py", "--interpret", "--jobs", "0"])
  with pytest.raises(SystemExit) as done:
    script.main()
  assert done.value.code == 2
  assert "--jobs must be at least 1, got 0" in capfd.readouterr().err


def test_turns_wait_for_every_worker_and_time_one_at_a_time(tmp_path):
  """``profiling.Turns``: four workers started as the scripts start them
  (``Turns.argument``, ``Turns.of_worker``, ``Turns.wait_for``), the
  third ready 1 s after the others, the fourth dead before it is ready,
  each live one holding its turn 0.3 s: no turn starts before every live
  worker is ready, no two turns overlap, and the dead worker holds no one
  up."""
  import subprocess
  code = """if True:
    import sys, time
    from htransformer import profiling
    turns = profiling.Turns.of_worker(sys.argv[1])
    if turns.index == 3:
      sys.exit(1)
    time.sleep(1.0 if turns.index == 2 else 0.0)
    ready = time.time()
    turns.ready()
    with turns.turn():
      start = time.time()
      time.sleep(0.3)
      print(ready, start, time.time())
  """
  workers = [subprocess.Popen(
      [sys.executable, "-c", code,
       profiling.Turns.argument(str(tmp_path), i, 4)], env=child_env(),
      cwd=ROOT, stdout=subprocess.PIPE, text=True) for i in range(4)]
  assert not profiling.Turns.wait_for(workers, str(tmp_path), timeout_s=120)
  assert [w.returncode for w in workers] == [0, 0, 0, 1]
  spans = [tuple(map(float, w.stdout.read().split())) for w in workers[:3]]
  last_ready = max(ready for ready, _, _ in spans)
  assert all(start >= last_ready for _, start, _ in spans), spans
  turns = sorted((start, end) for _, start, end in spans)
  assert all(a[1] <= b[0] for a, b in zip(turns, turns[1:])), turns


def test_calls_per_run_is_not_set_by_one_slow_call():
  """The benchmark scripts' calls per timed run: a first call that waits
  40 ms (a slow dispatch) and later ones of about 1 ms give runs of many
  calls for 20 ms, not the one call that first call alone would give; a
  call slower than the run's length is run once, and ``most`` caps it."""
  import time
  waits = iter([0.04] + [0.001] * 1000)

  def call():
    time.sleep(next(waits))
    return jnp.zeros(())

  calls = profiling.calls_per_run(call, min_s=0.02)
  assert 8 <= calls <= 20, calls  # about 1 ms each
  waits = iter([0.001, 0.001, 0.04] + [0.001] * 1000)  # the last one slow
  calls = profiling.calls_per_run(call, min_s=0.02)
  assert 8 <= calls <= 20, calls
  assert profiling.calls_per_run(lambda: (time.sleep(0.03), jnp.zeros(()))[1],
                                 min_s=0.02) == 1
  assert profiling.calls_per_run(lambda: jnp.zeros(()), min_s=10.0,
                                 most=64) == 64
