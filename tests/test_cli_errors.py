"""Bad command lines of ``python -m htransformer.main``: one clear line
("Error: ..."), a non-zero exit, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest

from htransformer import train
from tests.scripts_helper import ROOT, child_env
from tests.test_train import tiny_config

CONFIG = os.path.join(ROOT, "configs", "listops.py")


def run_main(args, cwd):
  """``python -m htransformer.main ARGS`` on the CPU, run in ``cwd``."""
  return subprocess.run([sys.executable, "-m", "htransformer.main", *args],
                        cwd=cwd, env=child_env(JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)


def assert_clear_error(r, *expected):
  assert r.returncode not in (0, None), r.stdout[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "\\n" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("Error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  for text in expected:
    assert text in errors[0], r.stderr[-3000:]


def test_empty_workdir_is_refused(tmp_path):
  """It would train into the current directory."""
  r = run_main([f"--config={CONFIG}:quick", "--workdir=",
                "--config.dry_run=True"], cwd=tmp_path)
  assert_clear_error(r, "--workdir")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("where,problem", [
    ("a_file", "exists and is not a folder"),
    ("a_file/run", "a_file is not a folder"),
    pytest.param("/proc/run", "cannot create it", marks=pytest.mark.skipif(
        not os.path.isdir("/proc"), reason="no /proc")),
    pytest.param("read_only", "cannot write into it", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into read-only folders")),
    # A folder no one, root included, can write into.
    pytest.param("/proc", "cannot write into it", marks=pytest.mark.skipif(
        not os.path.isdir("/proc"), reason="no /proc")),
])
def test_unusable_workdir_is_a_clear_error(tmp_path, where, problem):
  (tmp_path / "a_file").write_text("not a folder")
  (tmp_path / "read_only").mkdir(mode=0o555)
  workdir = where if where.startswith("/") else str(tmp_path / where)
  r = run_main([f"--config={CONFIG}:quick", f"--workdir={workdir}",
                "--config.dry_run=True"], cwd=tmp_path)
  assert_clear_error(r, f"Error: --workdir {workdir}: ", problem)


def test_unknown_field_with_space_separated_config(tmp_path):
  r = run_main(["--config", f"{CONFIG}:quick", "--config.trian=1",
                f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
  assert_clear_error(r, "Unknown config field 'trian' (from --config.trian=1)",
                     "num_train_steps")


@pytest.mark.parametrize("overrides", [[], ["--config.num_train_steps=3"]])
def test_missing_config_file_is_a_clear_error(tmp_path, overrides):
  r = run_main(["--config=configs/nosuch.py", *overrides,
                f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
  assert_clear_error(r, "no such config file: configs/nosuch.py")


def test_bad_model_value_is_named(tmp_path):
  r = run_main([f"--config={CONFIG}:quick", "--config.model.block_size=0",
                f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
  assert_clear_error(r, "model.block_size must be an even integer >= 2, "
                     "got 0")
  assert not os.path.exists(tmp_path / "w")  # the refused run left no folder
  # A folder that was there before stays.
  os.makedirs(tmp_path / "kept")
  r = run_main([f"--config={CONFIG}:quick", "--config.model.block_size=0",
                f"--workdir={tmp_path / 'kept'}"], cwd=tmp_path)
  assert r.returncode == 1 and os.path.isdir(tmp_path / "kept")


def test_relaunch_with_other_shapes_keeps_the_run(tiny_data, tmp_path):
  """The run's config.json stays; the error names the differing fields."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tiny_data, num_train_steps=4),
                           str(workdir))
  config_json = (workdir / "config.json").read_bytes()
  r = run_main([f"--config={CONFIG}:quick", f"--workdir={workdir}",
                f"--config.data_dir={tiny_data}", "--config.max_length=40"],
               cwd=tmp_path)
  assert_clear_error(r, "does not fit this config", "model.emb_dim 32 -> 64",
                     "Use a new --workdir or the run's config.")
  assert (workdir / "config.json").read_bytes() == config_json
  # A dry run says the same (it would have reported success), and one of
  # the run's own shapes says that it fits.
  r = run_main([f"--config={CONFIG}:quick", f"--workdir={workdir}",
                f"--config.data_dir={tiny_data}", "--config.max_length=40",
                "--config.dry_run=True"], cwd=tmp_path)
  assert_clear_error(r, "does not fit this config", "model.emb_dim 32 -> 64")
  fits = ["--config.model.num_layers=1", "--config.model.emb_dim=32",
          "--config.model.qkv_dim=32", "--config.model.mlp_dim=32",
          "--config.model.num_heads=2", "--config.model.block_size=4"]
  r = run_main([f"--config={CONFIG}:quick", f"--workdir={workdir}",
                f"--config.data_dir={tiny_data}", "--config.max_length=40",
                "--config.dry_run=True", *fits], cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "holds a run at step 4: this config fits its checkpoint" in r.stdout
  assert (workdir / "config.json").read_bytes() == config_json


@pytest.mark.parametrize("override, expected", [
    ("--config.model.block_size=x", ["model.block_size takes an integer"]),
    ("--config.model=3", ["model is a group of fields", "block_size"]),
])
def test_override_of_the_wrong_kind_is_one_line(tmp_path, override, expected):
  r = run_main([f"--config={CONFIG}:quick", override,
                f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
  assert_clear_error(r, *expected)
  assert not (tmp_path / "w").exists()


def test_config_file_that_raises_is_one_line(tmp_path):
  r = run_main([f"--config={CONFIG}:nope", f"--workdir={tmp_path / 'w'}"],
               cwd=tmp_path)
  assert_clear_error(r, "Unknown variant(s) ['nope']", "'long_full'")


@pytest.mark.parametrize("override, expected", [
    ("--config.data.num_val=0", ["config.data (generated listops data)",
                                 "must be >= 1", "'val': 0"]),
    ("--config.data.max_length=5", ["min_length + 1 < max_length"]),
    ("--config.model.implementation=triton",
     ["model.implementation must be one of", "'triton'"]),
    ("--config.model.implementation=pallas --config.model.block_size=16",
     ["runs on a GPU", "'cpu'"]),
    # The quick model's blocks of 8, which the kernels cannot take.
    ("--config.model.implementation=pallas",
     ["model.implementation='pallas'", "power of two >= 16, got 8"]),
])
def test_settings_refused_before_any_data_is_made(tmp_path, override,
                                                  expected):
  """Refused by the dry run too, and before generating anything: a real
  run would have found them out only after minutes of generation."""
  for dry in ("True", "False"):
    r = run_main([f"--config={CONFIG}:quick", *override.split(),
                  f"--config.dry_run={dry}",
                  f"--config.cache_dir={tmp_path / 'cache'}",
                  f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
    assert_clear_error(r, *expected)
    assert not (tmp_path / "w").exists()
    assert not (tmp_path / "cache").exists() or not [
        n for n in os.listdir(tmp_path / "cache") if "listops" in n]


def test_bad_multi_process_flags_are_one_line(tmp_path):
  r = run_main([f"--config={CONFIG}:quick", "--config.dry_run=True",
                "--num_processes=2", "--process_id=0",
                f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
  assert_clear_error(r, "multi-process setup", "coordinator_address")
  assert not (tmp_path / "w").exists()


def test_interrupted_while_generating_data(tmp_path):
  """Ctrl-C (SIGINT to the whole process group, workers included) while
  the data is generated: one line, exit 130, no traceback from the run or
  its workers, no workdir left, nothing in the cache that looks finished."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(
      [sys.executable, "-m", "htransformer.main", f"--config={CONFIG}:quick",
       "--config.data.num_train=400000", "--config.data.seed=5",
       f"--config.cache_dir={tmp_path / 'cache'}",
       f"--workdir={tmp_path / 'w'}"],
      cwd=tmp_path, env=child_env(JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)
  try:
    for line in proc.stdout:
      if line.startswith("No data_dir given"):
        break
    time.sleep(5)  # the generator's worker processes have started
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("Interrupted."), err[-3000:]
  assert not (tmp_path / "w").exists()
  assert not [n for n in os.listdir(tmp_path / "cache")
              if n.startswith("listops") and not n.endswith(".lock")]


@pytest.mark.parametrize("module, args, expected", [
    ("listops", ["--min_length=50", "--max_length=40"],
     "min_length + 1 < max_length"),
    ("listops", ["--num_train=-1"], "must be >= 0"),
    ("listops", ["--num_train=1", "--output_dir=FILE"], "is a file"),
    ("pathfinder", ["--num_images=0"], "num_images must be >= 1"),
    ("pathfinder", ["--num_images=1", "--output_dir=FILE/sub"],
     "lies under"),
])
def test_data_generators_answer_bad_arguments_in_one_line(tmp_path, module,
                                                          args, expected):
  (tmp_path / "FILE").write_text("not a folder")
  args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
  if not any(a.startswith("--output_dir") for a in args):
    args.append(f"--output_dir={tmp_path / 'out'}")
  r = subprocess.run(
      [sys.executable, "-m", f"htransformer.data.{module}", *args],
      cwd=tmp_path, env=child_env(JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=300)
  assert_clear_error(r, expected)
  assert not (tmp_path / "out").exists()
