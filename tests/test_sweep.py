"""scripts/sweep.py: the grid, the commands, the results table."""

import contextlib
import io
import json
import os
import shlex
import sys
import types

import pytest

from htransformer import launch
from tests.scripts_helper import ROOT, child_env, load_script

SPEC = "model.block_size=8,16,32;optimizer.learning_rate=0.05,0.1"

sweep = load_script("sweep")


def _status(args):
  """The exit status of ``sweep.main(args)`` (argparse's usage errors
  exit instead of returning)."""
  try:
    return sweep.main(list(args))
  except SystemExit as e:
    return e.code


def run_sweep(*args):
  """``scripts/sweep.py ARGS`` run from ROOT, in this process (for the
  modes that start no runs: print, collect, the refusals); its exit status
  and output as a finished process's."""
  out, err = io.StringIO(), io.StringIO()
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = _status(args)
  finally:
    os.chdir(cwd)
  return types.SimpleNamespace(returncode=code, stdout=out.getvalue(),
                               stderr=err.getvalue())


def test_parse_sweep_and_grid():
  axes = sweep.parse_sweep(SPEC)
  assert axes == [("model.block_size", [8, 16, 32]),
                  ("optimizer.learning_rate", [0.05, 0.1])]
  assert [type(v) for v in axes[0][1]] == [int] * 3
  assert sweep.parse_sweep("a=true,False; b = full ,1e-3;")[0:2] == [
      ("a", [True, False]), ("b", ["full", 0.001])]
  points = sweep.grid(axes)
  assert len(points) == 6
  assert [sweep.run_name(p) for p in points[:2]] == [
      "model.block_size=8,optimizer.learning_rate=0.05",
      "model.block_size=8,optimizer.learning_rate=0.1"]
  for bad in ("", "model.block_size", "a=", "a=1;a=2"):
    with pytest.raises(ValueError):
      sweep.parse_sweep(bad)


def test_print_mode(tmp_path):
  r = run_sweep("--config=configs/listops.py:quick", f"--sweep={SPEC}",
                f"--workdir={tmp_path}", "--launch=print",
                "--set", "num_train_steps=10", "--set=model.num_layers=1")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 6
  first = shlex.split(lines[0])
  assert first[:3] == [sys.executable, "-m", "htransformer.main"]
  assert first[3] == "--config=" + os.path.join(ROOT, "configs",
                                                "listops.py:quick")
  name = "model.block_size=8,optimizer.learning_rate=0.05"
  assert f"--workdir={tmp_path / name}" in first
  for flag in ("--config.num_train_steps=10", "--config.model.num_layers=1",
               "--config.model.block_size=8",
               "--config.optimizer.learning_rate=0.05"):
    assert flag in first
  assert "--config.model.block_size=32" in lines[-1]
  assert "| run |" in r.stderr  # The (empty) table is not on stdout.
  assert os.path.exists(tmp_path / "sweep.md")


def test_unknown_field_is_refused(tmp_path):
  r = run_sweep("--config=configs/listops.py", "--sweep=model.blok=1,2",
                f"--workdir={tmp_path}", "--launch=print")
  assert r.returncode == 2
  assert "unknown config field 'model.blok'" in r.stderr
  assert "block_size" in r.stderr and not r.stdout


def _write_metrics(workdir, rows, results=None):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  if results:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)


def test_collect(tmp_path):
  _write_metrics(tmp_path / "a=1", [
      {"step": 100, "train_loss": 2.0, "steps_per_sec": 1.0},
      {"step": 100, "eval_accuracy": 0.3},
      {"step": 200, "train_loss": 1.5, "steps_per_sec": 5.0},
      {"step": 200, "eval_accuracy": 0.5},
      {"step": 300, "train_loss": 1.0, "steps_per_sec": 7.0},
      {"step": 300, "eval_accuracy": 0.5},
      {"step": 300, "test_accuracy": 0.45, "test_accuracy_best_eval": 0.48}])
  _write_metrics(tmp_path / "a=2", [
      {"step": 10, "train_loss": 2.0, "steps_per_sec": 3.0},
      {"step": 10, "eval_accuracy": 0.25},
      {"step": 10, "test_accuracy": 0.2, "test_accuracy_best_eval": 0.21}],
                 results={"steps_per_sec": 12.5})
  os.makedirs(tmp_path / "not_a_run")
  r = run_sweep(f"--workdir={tmp_path}", "--launch=collect")
  assert r.returncode == 0, r.stderr
  table = open(tmp_path / "sweep.md").read()
  assert r.stdout.strip() == (
      table.strip() + f"\nTable written to {tmp_path / 'sweep.md'}.")
  rows = [l for l in table.splitlines() if l.startswith("| a=")]
  assert rows == [
      "| a=1 | 0.5000 (200) | 0.4500 | 0.4800 | 6.00 |",
      "| a=2 | 0.2500 (10) | 0.2000 | 0.2100 | 12.50 |"]
  assert table.strip().splitlines()[-1] == (
      f"Best: a=1 (eval accuracy 0.5000 at step 200; {tmp_path / 'a=1'}).")
  # With the sweep, missing runs are listed too.
  r = run_sweep(f"--workdir={tmp_path}", "--launch=collect", "--sweep=a=1,3")
  assert r.returncode == 0, r.stderr
  assert "| a=1 | 0.5000 (200) |" in r.stdout
  assert "| a=3 (no metrics) | - | - | - | - |" in r.stdout


def _tiny_overrides(tmp_path):
  from htransformer.data import listops  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  listops.generate(str(data), num_train=200, num_val=32, num_test=32, seed=0,
                   min_length=5, max_length=30, workers=1)
  return [f"data_dir={data}", "max_length=30", "model.num_layers=1",
          "model.emb_dim=16", "model.qkv_dim=16", "model.mlp_dim=16",
          "model.num_heads=2", "batch_size=8", "eval_batch_size=16",
          "num_train_steps=4", "log_every=2", "eval_every=2",
          "checkpoint_every=4", "optimizer.warmup_steps=2"]


def sweep_here(capfd, monkeypatch, *args):
  """scripts/sweep.py ARGS in this process (no process of its own to start),
  in the environment of the processes the tests start (child_env, on the
  CPU), so the runs it starts get it too; (exit status, stdout, stderr),
  the output of the runs it starts included."""
  for name, value in child_env(JAX_PLATFORMS="cpu").items():
    monkeypatch.setenv(name, value)
  monkeypatch.chdir(ROOT)
  capfd.readouterr()
  code = _status(args)
  out, err = capfd.readouterr()
  return code, out, err


def test_local_run_one_per_gpu(tmp_path, capfd, monkeypatch):
  """--gpus: the runs go concurrently, each with its own
  CUDA_VISIBLE_DEVICES and its console in WORKDIR/<name>/log.txt."""
  overrides = _tiny_overrides(tmp_path)
  python = tmp_path / "python"  # Records the GPU each run was given.
  python.write_text(f'#!/bin/sh\necho "GPU=$CUDA_VISIBLE_DEVICES"\n'
                    f'exec {sys.executable} "$@"\n')
  python.chmod(0o755)
  code, out, err = sweep_here(
      capfd, monkeypatch, "--config=configs/listops.py:quick",
      "--sweep=model.block_size=4,8,16", f"--workdir={tmp_path / 'sw'}",
      "--launch=local", "--gpus=3,5", f"--python={python}",
      *[f"--set={o}" for o in overrides])
  assert code == 0, out[-2000:] + err[-2000:]
  gpus = []
  for bs in (4, 8, 16):
    run = tmp_path / "sw" / f"model.block_size={bs}"
    assert json.load(open(run / "config.json"))["model"]["block_size"] == bs
    log = (run / "log.txt").read_text()
    assert "Final:" in log, log[-2000:]
    gpus.append(log.splitlines()[0])
  assert gpus[:2] == ["GPU=3", "GPU=5"] and gpus[2] in ("GPU=3", "GPU=5")
  assert out.count("finished model.block_size=") == 3
  for bad in ("0,0", "x", "0"):
    code, out, err = sweep_here(
        capfd, monkeypatch, "--config=configs/listops.py:quick",
        "--sweep=seed=1", f"--workdir={tmp_path / 'w'}", f"--gpus={bad}")
    assert code == 2 and "--gpus" in err, err
  assert "for GPU 0 alone give --gpus=1 (a count) or --gpus=0," in err


def test_local_run(tmp_path, capfd, monkeypatch):
  overrides = _tiny_overrides(tmp_path)
  again = lambda *more: sweep_here(
      capfd, monkeypatch, "--config=configs/listops.py:quick",
      "--sweep=model.block_size=4", f"--workdir={tmp_path / 'sw'}",
      "--launch=local", *[f"--set={o}" for o in overrides + list(more)])
  code, out, err = again()
  assert code == 0, out[-2000:] + err[-2000:]
  run = tmp_path / "sw" / "model.block_size=4"
  assert json.load(open(run / "config.json"))["model"]["block_size"] == 4
  line = [l for l in out.splitlines()
          if l.startswith("| model.block_size=4 |")]
  assert len(line) == 1 and " - " not in line[0], out[-2000:]
  assert "Best: model.block_size=4 (eval accuracy" in out
  # Launched again: the finished run is not run again; with more steps it
  # resumes and trains on.
  code, out, err = again()
  assert code == 0, out[-2000:] + err[-2000:]
  assert "[model.block_size=4] finished earlier with these settings" in out
  assert "Resuming" not in out + err
  code, out, err = again("num_train_steps=6")
  assert code == 0, out[-2000:] + err[-2000:]
  assert "finished earlier" not in out
  assert json.load(open(run / "results.json"))["num_train_steps"] == 6


def test_collect_reads_runs_cut_short(tmp_path):
  """A run killed (or being written) mid-line: its torn last row of
  metrics.jsonl, or a results.json cut short, is left out, not a crash."""
  _write_metrics(tmp_path / "a=1", [
      {"step": 100, "train_loss": 2.0, "steps_per_sec": 4.0},
      {"step": 100, "eval_accuracy": 0.3},
      {"step": 200, "train_loss": 1.5, "steps_per_sec": 6.0}])
  with open(tmp_path / "a=1" / "metrics.jsonl", "a") as f:
    f.write('{"step": 200, "eval_accur')
  _write_metrics(tmp_path / "a=2", [{"step": 10, "eval_accuracy": 0.25}])
  (tmp_path / "a=2" / "results.json").write_text('{"steps_per_sec": 1')
  r = run_sweep(f"--workdir={tmp_path}", "--launch=collect")
  assert r.returncode == 0, r.stderr
  assert "| a=1 | 0.3000 (100) | - | - | 6.00 |" in r.stdout
  assert "| a=2 | 0.2500 (10) | - | - | - |" in r.stdout


def test_language_model_runs_are_tabled_by_perplexity(tmp_path):
  """The best evaluation of a language model is its lowest perplexity (as
  training picks it), not its highest token accuracy."""
  _write_metrics(tmp_path / "lm", [
      {"step": 100, "eval_accuracy": 0.50, "eval_perplexity": 9.0},
      {"step": 200, "eval_accuracy": 0.49, "eval_perplexity": 8.0},
      {"step": 200, "test_accuracy": 0.5, "test_perplexity": 8.5,
       "test_accuracy_best_eval": 0.5, "test_perplexity_best_eval": 8.25}],
                 results={"steps_per_sec": 3.0})
  # A second run still before its first evaluation.
  _write_metrics(tmp_path / "lm2", [
      {"step": 50, "train_loss": 3.0, "train_accuracy": 0.2,
       "steps_per_sec": 2.0}, {"step": 50, "test_accuracy": 0.3}])
  text = sweep.table(["lm", "lm2"], str(tmp_path))
  assert text.splitlines()[0] == (
      "| run | best eval perplexity (step) | final test perplexity | "
      "test perplexity (best-eval params) | steps/s |")
  assert "| lm | 8.0000 (200) | 8.5000 | 8.2500 | 3.00 |" in text
  assert "| lm2 | - | - | - | 2.00 |" in text


@pytest.mark.parametrize("args, message", [
    (["--sweep=model.block_size=abc,8"],
     "model.block_size=abc: model.block_size takes an integer"),
    (["--sweep=seed=1", "--set=optimizer.learning_rate=fast"],
     "optimizer.learning_rate takes a number"),
    (["--sweep=seed=1", "--set=model=2"], "model is a group of fields"),
    (["--sweep=model.block_size=8,08"],
     "both run 'model.block_size=8' (one workdir)"),
    # Values of the right type that training refuses: refused before the
    # first run trains, not when the run holding them starts.
    (["--sweep=model.block_size=8,7"], "run model.block_size=7: "
     "model.block_size must be an even integer >= 2, got 7"),
    (["--sweep=model.attention=full,fulll"],
     "run model.attention=fulll: model.attention must be one of"),
    (["--sweep=seed=1", "--set=batch_size=0"],
     "run seed=1: batch_size must be >= 1"),
    (["--sweep=optimizer.learning_rate=0.1,nan"],
     "optimizer.learning_rate must be a positive number"),
    (["--sweep=seed=1", "--set=data.num_val=0"],
     "config.data (generated listops data)"),
])
def test_bad_values_are_refused_before_any_run(tmp_path, args, message):
  """Each run would fail on its own (or two would share a workdir): the
  sweep refuses at once, prints no command and creates nothing."""
  r = run_sweep("--config=configs/listops.py:quick", *args,
                f"--workdir={tmp_path / 'w'}", "--launch=print")
  assert r.returncode == 2, r.stdout
  assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
  assert not r.stdout and not (tmp_path / "w").exists()


def test_unusable_workdir_is_a_clear_error(tmp_path):
  (tmp_path / "a_file").write_text("")
  r = run_sweep("--config=configs/listops.py:quick", "--sweep=seed=1",
                f"--workdir={tmp_path / 'a_file'}", "--launch=print")
  assert r.returncode == 2 and not r.stdout
  assert "exists and is not a folder" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr
  # Collecting from a folder that is not there (a typo) says so and
  # creates nothing.
  r = run_sweep(f"--workdir={tmp_path / 'typo'}", "--launch=collect")
  assert r.returncode == 2 and "no such folder" in r.stderr, r.stderr
  assert not (tmp_path / "typo").exists()


def test_gpu_lists_and_counts():
  """--gpus (sweep.py, reproduce_lra.py): a count or a list of ids, each
  GPU once; the runs' environment puts the repository first on
  PYTHONPATH."""
  assert launch.parse_gpus("4") == ["0", "1", "2", "3"]
  assert launch.parse_gpus("1") == ["0"]
  assert launch.parse_gpus("3,5") == ["3", "5"]
  assert launch.parse_gpus("0,") == ["0"]
  for bad, message in (("0,0", "names a GPU twice"),
                       ("1, 2,1", "names a GPU twice"),
                       ("0", "is a count of no GPUs"),
                       ("x", "is not a count or a list"),
                       ("-1", "is not a count or a list"),
                       ("", "is not a count or a list")):
    with pytest.raises(ValueError, match=message):
      launch.parse_gpus(bad)
  env = launch.env_with_path("/repo", PYTHONPATH="/site", CUDA="1")
  assert env["PYTHONPATH"] == os.pathsep.join(["/repo", "/site"])
  assert env["CUDA"] == "1"


def test_finished_earlier_is_a_run_with_the_same_settings(tmp_path):
  """A run of the grid is not launched again where it finished (results.json)
  with the point's settings, how often it logged, evaluated or checkpointed
  aside; more steps, another value or no results.json launch it."""
  from htransformer import config_utils  # pylint: disable=g-import-not-at-top
  base = config_utils.load_config(
      os.path.join(ROOT, "configs", "listops.py") + ":quick")
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(
      base.to_json_best_effort(indent=2, sort_keys=True))
  assert not sweep.finished_earlier(base, str(run))  # still training
  (run / "results.json").write_text(json.dumps(
      {"test_loss": 1.0, "test_accuracy": 0.5}))
  assert sweep.finished_earlier(base, str(run))
  assert sweep.finished_earlier(config_utils.with_overrides(
      base, [("eval_every", "7"), ("checkpoint_every", "9")]), str(run))
  for key, text in (("num_train_steps", str(base.num_train_steps + 10)),
                    ("optimizer.learning_rate", "0.5"),
                    ("model.dropout_rate", "0.25")):
    assert not sweep.finished_earlier(
        config_utils.with_overrides(base, [(key, text)]), str(run)), key


FAILING_TRAINER = '''#!{python}
"""Stands in for `python -m htransformer.main`: the run of seed 2 fails,
the others log an evaluation."""
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:]
            if a.startswith("--") and "=" in a)
if args.get("config.seed") == "2":
  sys.exit(3)
os.makedirs(args["workdir"], exist_ok=True)
with open(os.path.join(args["workdir"], "metrics.jsonl"), "w") as f:
  f.write(json.dumps({{"step": 4, "eval_accuracy": 0.5}}) + "\\n")
'''


def test_failed_run_is_marked_and_the_sweep_fails(tmp_path, capsys):
  """A run whose process fails is marked "(failed)" in the table, named,
  and makes the sweep's exit status 1."""
  trainer = tmp_path / "trainer"
  trainer.write_text(FAILING_TRAINER.format(python=sys.executable))
  trainer.chmod(0o755)
  assert sweep.main([
      "--config=" + os.path.join(ROOT, "configs", "listops.py") + ":quick",
      "--sweep=seed=1,2", f"--workdir={tmp_path / 'sw'}", "--launch=local",
      f"--python={trainer}"]) == 1
  err = capsys.readouterr().err
  assert "1 run(s) failed: seed=2" in err
  table = (tmp_path / "sw" / "sweep.md").read_text()
  assert "| seed=1 | 0.5000 (4) | - | - | - |" in table
  assert "| seed=2 (failed) | - | - | - | - |" in table
