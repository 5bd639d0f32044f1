"""scripts/benchmark_attention.py: a real (tiny, CPU) run end to end, its
markdown section, --merge, and the checks of its flags."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from htransformer.attention import kernels
from tests.scripts_helper import ROOT, load_script

bench = load_script("benchmark_attention")


def _run(*flags):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "benchmark_attention.py"),
       "--smoke", "--repeats", "1", "--warmup", "0", *flags],
      capture_output=True, text=True, timeout=600, check=False)


def test_smoke_run_writes_results_and_only_its_section(tmp_path,
                                                       monkeypatch):
  """Both runs' main in this process (its probe of the device still a
  process of its own, as on a GPU host)."""
  out_json, out_md = str(tmp_path / "b.json"), str(tmp_path / "b.md")
  with open(out_md, "w") as f:
    f.write("# Benchmarks\n\n## Another section\n\nkept as is\n")
  flags = ["--methods", "hierarchical_16", "full_xla", "--out_json",
           out_json, "--out_md", out_md]

  def run(*more):  # as _run's command; a failure exits non-zero
    monkeypatch.setattr(sys, "argv", [
        os.path.join(ROOT, "scripts", "benchmark_attention.py"), "--smoke",
        "--repeats", "1", "--warmup", "0", *more, *flags])
    bench.main()

  run("--lengths", "256")
  # A second run adds a length; --merge keeps the first run's results.
  run("--lengths", "512", "--merge")

  with open(out_json) as f:
    report = json.load(f)
  got = {(r["method"], r["length"]): r for r in report["results"]}
  assert set(got) == {(m, n) for m in ("hierarchical_16", "full_xla")
                      for n in (256, 512)}
  for res in got.values():
    assert res["batch"] == 1024 // res["length"]
    for phase in ("fwd", "fwd_bwd"):
      assert res[phase]["status"] == "ok"
      assert res[phase]["median_ms"] > 0
  with open(out_md) as f:
    text = f.read()
  assert "## Another section\n\nkept as is\n" in text
  heading = [line for line in text.splitlines()
             if line.startswith("## Attention: hierarchical vs full")]
  assert len(heading) == 1  # replaced by the second run, not appended
  for length in (256, 512):
    assert f"\n| {length} | {1024 // length} |" in text


def test_cpu_run_writes_nothing_unasked_and_skips_gpu_methods(tmp_path):
  """Without --out_json / --out_md nothing is written (the repository's
  records stay as they are); cuDNN and the fused kernels, which need a GPU,
  are skipped with the reason rather than failing every row."""
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "benchmark_attention.py"),
       "--lengths", "256", "--tokens", "512", "--heads", "2", "--repeats", "1",
       "--warmup", "0", "--no-isolate", "--methods", "hierarchical_16",
       "full_cudnn", "hierarchical_16_pallas"],
      capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "wrote" not in proc.stdout and not os.listdir(tmp_path)
  assert "skipped (needs a GPU: cuDNN)" in proc.stdout, proc.stdout[-2000:]
  assert "skipped (needs a GPU: the fused kernels)" in proc.stdout
  assert "error" not in proc.stdout


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "0"], "--lengths must be at least 1, got 0"),
    (["--lengths", "-256"], "--lengths must be at least 1, got -256"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--dtype", "bogus"], "invalid choice: 'bogus'"),
    (["--methods", "hierarchical_3"], "must be an even integer >= 2"),
    (["--methods", "hierarchical_24_pallas"], "powers of two >= 16"),
])
def test_bad_flags_are_usage_errors(flags, message, monkeypatch, capsys):
  """The script's main in this process: argparse's usage error (exit 2),
  before anything runs."""
  monkeypatch.setattr(sys, "argv", [
      os.path.join(ROOT, "scripts", "benchmark_attention.py"), *flags])
  with pytest.raises(SystemExit) as done:
    bench.main()
  err = capsys.readouterr().err
  assert done.value.code == 2, err[-2000:]
  assert message in err and "Traceback" not in err


def test_jobs_measure_each_pair_once_in_a_process_of_its_own(tmp_path):
  """``--jobs 3`` over 2 lengths x 2 methods and a skipped pair: batches of
  worker processes (3 and 1; the skipped pair not measured) that compile
  side by side and time in turns; every pair's result once, ok, in the
  serial run's order, the run recorded as isolated."""
  out_json = str(tmp_path / "b.json")
  proc = _run("--jobs", "3", "--lengths", "256", "512", "--methods",
              "hierarchical_16", "full_xla", "--skip_xla_dense_above", "256",
              "--out_json", out_json, "--out_md", str(tmp_path / "b.md"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out_json) as f:
    report = json.load(f)
  assert report["config"]["isolate"] is True
  results = report["results"]
  assert [(r["method"], r["length"]) for r in results] == [
      ("hierarchical_16", 256), ("full_xla", 256), ("hierarchical_16", 512),
      ("full_xla", 512)]
  for res in results[:3]:
    for phase in ("fwd", "fwd_bwd"):
      assert res[phase]["status"] == "ok" and res[phase]["median_ms"] > 0
      assert res[phase]["compile_s"] > 0
  assert results[3]["status"] == "skipped"
  proc = _run("--jobs", "2", "--no-isolate", "--lengths", "256")
  assert proc.returncode != 0 and "drop --no-isolate" in proc.stderr


def test_a_merge_with_other_settings_is_refused(tmp_path):
  out_json = str(tmp_path / "b.json")
  flags = ["--methods", "full_xla", "--out_json", out_json, "--out_md",
           str(tmp_path / "b.md")]
  assert _run("--lengths", "256", *flags).returncode == 0
  proc = _run("--lengths", "256", "--causal", "--merge", *flags)
  assert proc.returncode != 0
  assert "--merge" in proc.stderr and "pick another --out_json" in proc.stderr


@pytest.mark.parametrize("flag,message", [
    ("coarsen_impl=xl", "TUNING['coarsen_impl'] must be one of"),
    ("num_warps=3", "TUNING['num_warps'] must be"),
    ("coarsen_rows=48", "TUNING['coarsen_rows'] must be"),
    ("sweep_levels=all", "TUNING['sweep_levels'] must be None"),
    ("tail_rows=auto", "TUNING['tail_rows'] must be 0"),
    ("tile_rowz=64", "expected KEY=VALUE with KEY one of"),
    ("num_warps", "expected KEY=VALUE"),
])
def test_bad_tuning_flags_are_named(monkeypatch, capsys, flag, message):
  monkeypatch.setattr(kernels, "TUNING", dict(kernels.TUNING))
  before = dict(kernels.TUNING)
  with pytest.raises(SystemExit):
    bench.parse_args(["--smoke", "--tuning", flag])
  assert message in capsys.readouterr().err
  assert kernels.TUNING == before  # nothing half-applied


def test_tuning_flags_set_the_kernels_settings(monkeypatch):
  monkeypatch.setattr(kernels, "TUNING", dict(kernels.TUNING))
  args = bench.parse_args(["--smoke", "--methods", "hierarchical_16_pallas",
                           "--tuning", "coarsen_impl=pallas",
                           "coarsen_rows=32", "num_warps=None",
                           "sweep_levels=auto"])
  assert args.tuning_values == {"coarsen_impl": "pallas", "coarsen_rows": 32,
                                "num_warps": None, "sweep_levels": None}
  assert kernels.TUNING["coarsen_impl"] == "pallas"
  assert kernels.TUNING["coarsen_rows"] == 32


def test_tuning_without_a_fused_method_is_an_error(monkeypatch, capsys):
  """--tuning changes only the fused kernels: with plain methods alone it
  would time nothing it names."""
  monkeypatch.setattr(kernels, "TUNING", dict(kernels.TUNING))
  with pytest.raises(SystemExit):
    bench.parse_args(["--smoke", "--tuning", "num_warps=4"])
  assert "add a hierarchical_<block_size>_pallas method" in (
      capsys.readouterr().err)
  # The children of an isolated run take the parent's flags, whatever
  # method they measure.
  for child in (["--single", "full_cudnn", "1024"], ["--probe"]):
    args = bench.parse_args([*child, "--tuning", "num_warps=4"])
    assert args.tuning_values == {"num_warps": 4}


def test_memory_floor_counts_the_arrays_any_attention_moves():
  cfg = {"tokens": 65536, "heads": 8, "head_dim": 64, "dtype": "bfloat16"}
  array = 65536 * 8 * 64 * 2  # one [65,536, 8, 64] bfloat16 array
  for length in (1024, 65536):
    assert bench.floor_bytes(cfg, length, "fwd") == 4 * array
    assert bench.floor_bytes(cfg, length, "fwd_bwd") == 12 * array


def test_kernel_lines_measure_the_floor_at_the_copy_bandwidth():
  """The fused kernels' table: the floor at the card's copy bandwidth
  (the faster of the two copies) and the bytes per second achieved."""
  cfg = {"tokens": 65536, "heads": 8, "head_dim": 64, "dtype": "bfloat16",
         "lengths": [65536], "methods": ["hierarchical_16_pallas"]}
  lookup = {("hierarchical_16_pallas", 65536): {
      "status": "ok", "fwd": {"median_ms": 0.5},
      "fwd_bwd": {"median_ms": 1.5}}}
  env = {"copy_gbps": 4000.0, "copy_gbps_xla": 3300.0,
         "copy_gbps_pallas": 4000.0}
  text = "\n".join(bench.kernel_lines(
      {"config": cfg, "environment": env}, lookup))
  assert "copy bandwidth of 4,000 GB/s" in text
  assert "fastest of XLA, a Pallas kernel and, on Hopper, a Mosaic" in text
  array = 65536 * 8 * 64 * 2
  row = [line for line in text.splitlines() if line.startswith("| 64K")]
  cells = [c.strip() for c in row[0].split("|")[1:-1]]
  floor = 4 * array / 4e12 * 1e3
  assert cells[3] == f"{floor:.3f}"  # forward floor, ms
  assert cells[4] == f"{0.5 / floor:.1f}"  # times the floor
  assert cells[5] == f"{4 * array / 0.5e-3 / 1e9:.0f}"  # achieved GB/s
  assert cells[9] == f"{12 * array / 4e12 * 1e3:.3f}"
  assert cells[10] == f"{1.5 / (12 * array / 4e12 * 1e3):.1f}"


@pytest.mark.parametrize("method,head_dim,length,want", [
    ("hierarchical_16_pallas", 64, 65536, (0.3, 0.8)),
    ("hierarchical_16_pallas", 64, 1024, (0.3, 0.8)),
    ("hierarchical_16_pallas", 64, 262144, (1.2, 3.2)),
    ("hierarchical_64_pallas", 64, 65536, (0.6, 1.6)),
    ("hierarchical_16_pallas", 128, 65536, (0.6, 1.6)),
    ("hierarchical_16_pallas", 128, 1048576, (9.6, 25.6)),
    ("hierarchical_32_pallas", 64, 65536, None),
    ("hierarchical_64_pallas", 128, 65536, None),
    ("hierarchical_16_pallas", 32, 65536, None)])
def test_kernel_lines_give_each_setting_its_target(method, head_dim, length,
                                                   want):
  """The targets: 0.3 / 0.8 ms at blocks of 16 and head_dim 64, twice
  those at blocks of 64 or head_dim 128 (not both), scaled by the tokens
  past 65,536; no target at other settings, and met only at or under it."""
  cfg = {"tokens": 65536, "heads": 8, "head_dim": head_dim,
         "dtype": "bfloat16", "lengths": [length], "methods": [method]}
  times = {"fwd": 0.45, "fwd_bwd": 1.3}
  lookup = {(method, length): {
      "status": "ok", **{p: {"median_ms": ms} for p, ms in times.items()}}}
  text = "\n".join(bench.kernel_lines(
      {"config": cfg, "environment": {"copy_gbps": 3000.0}}, lookup))
  row = [line for line in text.splitlines()
         if line.startswith(f"| {bench.format_length(length)} ")]
  cells = [c.strip() for c in row[0].split("|")[1:-1]]
  got = (cells[6], cells[7], cells[12], cells[13])
  if want is None:
    assert got == ("", "", "", "")
  else:
    assert got == (f"{want[0]:g}", "yes" if 0.45 <= want[0] else "no",
                   f"{want[1]:g}", "yes" if 1.3 <= want[1] else "no")
  for other in ({"heads": 4}, {"dtype": "float32"}, {"tokens": 32768}):
    assert bench.kernel_target_ms({**cfg, **other}, method, length,
                                  "fwd") is None


def test_copy_bandwidth_is_the_fastest_copy(monkeypatch):
  """The copies are recorded (the Mosaic GPU one on Hopper GPUs, where it
  compiles; so does the pyramid's Mosaic GPU kernel, which the record
  names); the card's bandwidth is the fastest (the copies themselves need
  a GPU: tests/test_profiling.py checks their kernels in interpret
  mode)."""
  speeds = {"xla": 3300.0, "pallas": 3970.0, "mosaic": 4020.0}
  monkeypatch.setattr(bench, "copy_bandwidth_gbps", speeds.get)
  env = bench.environment_info(measure_copy=True)
  # No Mosaic GPU copy on this CPU (a Hopper GPU's): the faster of two.
  assert (env["copy_gbps"], env["copy_gbps_xla"], env["copy_gbps_pallas"],
          env["copy_gbps_mosaic"]) == (3970.0, 3300.0, 3970.0, None)
  assert (env["coarsen_impl"], env["forward_l0_impl"]) == ("dot", "triton")
  monkeypatch.setattr(kernels, "mosaic_gpu", lambda: True)
  env = bench.environment_info(measure_copy=True)
  assert (env["copy_gbps"], env["copy_gbps_mosaic"]) == (4020.0, 4020.0)
  assert (env["coarsen_impl"], env["forward_l0_impl"]) == ("mosaic", "mosaic")
  assert bench.environment_info()["copy_gbps"] is None


def _result(method, length, fwd_bwd_ms, fwd_ms=None, tokens=1024):
  ok = lambda ms: {"status": "ok", "median_ms": ms}
  return {"method": method, "length": length,
          "batch": bench.batch_for(length, tokens), "status": "ok",
          "fwd": ok(fwd_ms or fwd_bwd_ms / 3), "fwd_bwd": ok(fwd_bwd_ms)}


def _config(methods, lengths, **changes):
  return {"tokens": 1024, "heads": 2, "head_dim": 16, "dtype": "float32",
          "causal": False, "repeats": 1, "warmup": 0, "seed": 0,
          "lengths": lengths, "methods": methods,
          "skip_xla_dense_above": 2**20, "full_max_length": 512,
          "dropout_rate": 0.0, **changes}


def test_markdown_section_is_replaced_where_it_stands(tmp_path):
  """The run's section replaces the one of the same heading, up to the next
  heading; the sections before and after it stay as they are, and a new
  heading is appended at the end."""
  path = str(tmp_path / "b.md")
  heading = "## Attention: hierarchical vs full (float32)"
  with open(path, "w") as f:
    f.write(f"# Benchmarks\n\n## Before\n\nfirst\n\n{heading}\n\nold table\n"
            "\n## After\n\nlast\n")
  bench.update_markdown(path, heading, "new table\n")
  with open(path) as f:
    assert f.read() == (f"# Benchmarks\n\n## Before\n\nfirst\n\n{heading}\n"
                        "\nnew table\n\n## After\n\nlast\n")
  bench.update_markdown(path, "## Other", "more\n")
  with open(path) as f:
    assert f.read().endswith("## After\n\nlast\n\n## Other\n\nmore\n")


def test_ratios_are_hierarchical_over_the_reference_and_estimates_scale():
  """The ratio table divides each hierarchical time by full attention's
  (lower is better), at lengths where full attention was skipped by its
  batch * L**2 estimate from the longest measured length, marked ~."""
  cfg = _config(["hierarchical_16", "full_xla"], [256, 512, 1024])
  results = [_result("hierarchical_16", 256, 2.0),
             _result("full_xla", 256, 8.0),
             _result("hierarchical_16", 512, 3.0),
             _result("full_xla", 512, 12.0),
             _result("hierarchical_16", 1024, 6.0),
             bench.skipped_result("full_xla", 1024, "quadratic",
                                  argparse.Namespace(tokens=1024))]
  report = bench.build_report(cfg, {"commands": []}, results, None)
  lookup = {(r["method"], r["length"]): r for r in report["results"]}
  # Batch 1 at 1024 against batch 2 at 512: 1 * 1024**2 / (2 * 512**2).
  assert lookup[("full_xla", 1024)]["fwd_bwd"]["estimated_ms"] == 24.0
  assert lookup[("full_xla", 1024)]["fwd"]["estimated_ms"] == 8.0
  rows = [line for line in bench.ratio_lines(report, lookup)
          if line.startswith("| ")]
  assert rows == ["| length | hier-16 / XLA dense |", "| 256 | 0.250 |",
                  "| 512 | 0.250 |", "| 1K | ~0.250 |"]


def test_ratio_targets_are_met_at_or_below():
  cfg = _config(["hierarchical_16", "full_cudnn"], [4096, 16384])
  results = [_result("hierarchical_16", 4096, 1.2),
             _result("full_cudnn", 4096, 1.0),
             _result("hierarchical_16", 16384, 0.5),
             _result("full_cudnn", 16384, 1.0)]
  report = bench.build_report(cfg, {"commands": []}, results, None)
  lookup = {(r["method"], r["length"]): r for r in report["results"]}
  rows = [line for line in bench.ratio_lines(report, lookup)
          if line.startswith("| ")]
  assert rows[1:] == ["| 4K | 1.200 | ≤ 1.2 | yes |",
                      "| 16K | 0.500 | ≤ 0.35 | no |"]


def test_merge_keeps_the_new_measurements_and_the_old_others(tmp_path):
  """--merge: a pair measured again takes this run's result; the earlier
  report's other pairs, lengths, methods and commands are kept; a report
  of another card or other settings is refused."""
  old_cfg = _config(["hierarchical_16", "full_xla"], [256, 512])
  old_env = {"device_kind": "cpu", "commands": ["python first"]}
  old = bench.build_report(old_cfg, old_env, [
      _result("hierarchical_16", 256, 5.0), _result("full_xla", 256, 9.0),
      _result("hierarchical_16", 512, 7.0)], None)
  path = str(tmp_path / "b.json")
  bench.write_json(path, old)
  cfg = _config(["hierarchical_64", "hierarchical_16"], [256])
  env = {"device_kind": "cpu", "commands": ["python second"]}
  previous = bench.load_previous(path, cfg, env)
  report = bench.build_report(cfg, env, [
      _result("hierarchical_16", 256, 1.0),
      _result("hierarchical_64", 256, 2.0)], previous)
  got = {(r["method"], r["length"]): r["fwd_bwd"]["median_ms"]
         for r in report["results"]}
  assert got == {("hierarchical_16", 256): 1.0, ("full_xla", 256): 9.0,
                 ("hierarchical_64", 256): 2.0,
                 ("hierarchical_16", 512): 7.0}
  assert len(report["results"]) == 4
  assert report["config"]["lengths"] == [256, 512]
  assert report["config"]["methods"] == ["hierarchical_16", "hierarchical_64",
                                         "full_xla"]
  assert report["environment"]["commands"] == ["python first",
                                               "python second"]
  with pytest.raises(SystemExit, match="was measured on cpu, not NVIDIA H200"):
    bench.load_previous(path, cfg, {**env, "device_kind": "NVIDIA H200"})
  with pytest.raises(SystemExit, match="head_dim=16, this run 64"):
    bench.load_previous(path, {**cfg, "head_dim": 64}, env)
