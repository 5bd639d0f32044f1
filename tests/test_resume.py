"""Interrupted, damaged and doubled runs: what a relaunch finds and says.

* A run killed while it evaluates at a checkpoint step, or while it writes
  a checkpoint, ends, once relaunched, with the metrics rows, best
  parameters and final parameters of a run that was never interrupted.
* A checkpoint that cannot be read (cut short, part missing) or a
  checkpoint folder that cannot be written is a one-line error naming the
  folder and what to do, raised at once: never a traceback, nor a process
  that waits minutes before it exits.
* A second launch into a workdir where a run still trains is refused; a
  stopped launcher of runs on several GPUs stops its runs.
* The progress line's steps/s times no compilation.

The kills are real (SIGKILL of a training process at a chosen moment), so
this file is also the worker: ``python tests/test_resume.py kill
DATA_DIR WORKDIR MOMENT STEP CHECKPOINT_EVERY``.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from htransformer import checkpoint as ckpt_lib
from htransformer import config_utils
from htransformer import input_pipeline
from htransformer import metrics as metrics_lib
from htransformer import optim
from htransformer import tasks
from htransformer import train
from tests.scripts_helper import ROOT, child_env, load_script
from tests.test_train import saved_params, tiny_config

# 8 steps: logs every 2, evaluates and checkpoints every 4.
# The tiny ListOps model of the command-line runs below.
TINY_FLAGS = ["--config.max_length=40", "--config.model.num_layers=1",
              "--config.model.emb_dim=32", "--config.model.qkv_dim=32",
              "--config.model.mlp_dim=32", "--config.model.num_heads=2",
              "--config.model.block_size=4", "--config.batch_size=8",
              "--config.eval_batch_size=16",
              "--config.optimizer.warmup_steps=4"]
RUN = {"num_train_steps": 8, "log_every": 2, "eval_every": 4,
       "checkpoint_every": 4}
# The same, evaluated at every step.
EVERY_STEP = {**RUN, "eval_every": 1}


def with_val_watched(get_task, before_read):
  """``get_task`` whose task calls ``before_read(i)`` before each read of
  its validation split (to act at a chosen moment of an evaluation)."""

  class Watched:

    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      before_read(i)
      return self.source[i]

  def watched(*args, **kwargs):
    task = get_task(*args, **kwargs)
    task.sources["val"] = Watched(task.sources["val"])
    return task

  return watched


def kill_worker(data_dir, workdir, moment, kill_step, checkpoint_every):
  """Trains ``EVERY_STEP`` (checkpoints every ``checkpoint_every``) and
  SIGKILLs itself at ``moment`` of step ``kill_step``: ``eval`` (the
  validation's first read) or ``save`` (the checkpoint begun, its writing
  in the background); ``none``: trains to the end."""

  def kill():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

  save = ckpt_lib.Checkpointer.save

  def save_then(self, step, state, data_state):
    save(self, step, state, data_state)
    if moment == "save" and step == kill_step:
      kill()
    # Anything else is on disk before training goes on, so what the kill
    # leaves does not depend on how fast orbax writes in the background.
    self.wait()

  ckpt_lib.Checkpointer.save = save_then

  def before_val_read(i):
    del i
    rows = metrics_lib.read_metrics(workdir)
    if moment == "eval" and rows and rows[-1]["step"] == kill_step:
      kill()

  tasks.get_task = with_val_watched(tasks.get_task, before_val_read)
  train.train_and_evaluate(
      tiny_config(data_dir, **{**EVERY_STEP,
                               "checkpoint_every": checkpoint_every}),
      workdir)


def _rows(workdir):
  """metrics.jsonl without steps/s (it differs from run to run)."""
  return [{k: v for k, v in r.items() if k != "steps_per_sec"}
          for r in metrics_lib.read_metrics(str(workdir))]


def test_killed_runs_end_as_an_unbroken_one(tiny_data, tmp_path):
  """Killed while evaluating the last step, or while writing its
  checkpoint: the relaunch evaluates steps 5 to 8 again (resumed from the
  checkpoint of step 4; with checkpoints only at the end, from the start)
  and ends with the metrics rows, best checkpoint and parameters of an
  unbroken run; the rows it writes again report the best evaluation up to
  their step, not the killed run's later one."""
  # name: (moment, checkpoint_every); the rows do not depend on the latter
  # (log_every 2 logs every checkpoint step too).
  kills = {"in_eval": ("eval", 8), "in_save": ("save", 4)}

  def worker(name, moment, every):
    # Every run in a CPU process of its own, the uninterrupted one and the
    # relaunches too: the runs compare bit for bit, so they must not mix
    # devices (the suite may run in-process tests on a GPU).
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "kill", tiny_data,
         str(tmp_path / name), moment, "8", str(every)],
        cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  procs = {name: worker(name, moment, every)
           for name, (moment, every) in kills.items()}
  procs["straight"] = worker("straight", "none", 4)
  for name, p in procs.items():
    out = p.communicate(timeout=300)[0]
    want_rc = 0 if name == "straight" else -signal.SIGKILL
    assert p.returncode == want_rc, f"{name}:\n{out[-3000:]}"
  # What the kills left: no evaluation of step 8; its checkpoint unfinished.
  assert [r["step"] for r in _rows(tmp_path / "in_eval")
          if "eval_loss" in r] == list(range(1, 8))
  assert "8" not in os.listdir(tmp_path / "in_save" / "checkpoints")
  relaunched = {name: worker(name, "none", every)
                for name, (_, every) in kills.items()}
  for name, p in relaunched.items():
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, f"{name}:\n{out[-3000:]}"

  straight = _rows(tmp_path / "straight")
  evals = {r["step"]: r for r in straight if "eval_loss" in r}
  assert list(evals) == list(range(1, 9))
  # What makes the rows of steps 5-7 tell: the best evaluation before step
  # 8 comes after step 5.
  top = max(evals[s]["eval_accuracy"] for s in range(1, 8))
  assert evals[5]["best_eval_accuracy"] < top, evals
  _, want = saved_params(str(tmp_path / "straight"))
  for name, (_, every) in kills.items():
    assert _rows(tmp_path / name) == straight, name
    assert os.listdir(tmp_path / name / "best") == os.listdir(
        tmp_path / "straight" / "best"), name
    step, got = saved_params(str(tmp_path / name))
    assert step == 8
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(x, y)
    assert sorted(os.listdir(tmp_path / name / "checkpoints")) == (
        ["8"] if every == 8 else ["4", "8"])
    assert (json.load(open(tmp_path / name / "results.json"))
            ["test_accuracy_best_eval"] == json.load(open(
                tmp_path / "straight" / "results.json"))
            ["test_accuracy_best_eval"])


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
  """A run of 8 steps with checkpoints at 4 and 8."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  train.train_and_evaluate(tiny_config(tiny_data, **RUN), str(workdir))
  return workdir


def test_stop_between_log_steps_keeps_the_rows_of_an_unbroken_run(
    tiny_data, finished_run, tmp_path, monkeypatch):
  """SIGTERM during step 3 (logs at 2 and 4): the run stops at 3, and once
  resumed its row of step 4 averages over steps 3 and 4, as the unbroken
  run's does (the stop's checkpoint holds step 3's sums), not over step 4
  alone."""
  train_iterator = input_pipeline.train_iterator

  class SignalAtThirdBatch:

    def __init__(self, it):
      self.it, self.batches = it, 0

    def __iter__(self):
      return self

    def __next__(self):
      self.batches += 1
      if self.batches == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return next(self.it)

    def get_state(self):
      return self.it.get_state()

    def set_state(self, state):
      self.it.set_state(state)

  monkeypatch.setattr(input_pipeline, "train_iterator",
                      lambda *a, **k: SignalAtThirdBatch(
                          train_iterator(*a, **k)))
  workdir = str(tmp_path)
  c = tiny_config(tiny_data, **RUN)
  with pytest.raises(train.TrainingStopped, match="at step 3 of 8"):
    train.train_and_evaluate(c, workdir)
  monkeypatch.setattr(input_pipeline, "train_iterator", train_iterator)
  train.train_and_evaluate(c, workdir)
  train_rows = lambda w: [
      (r["step"], r["train_loss"], r["train_accuracy"], r["grad_norm"])
      for r in metrics_lib.read_metrics(str(w)) if "train_loss" in r]
  want = train_rows(finished_run)
  assert [r[0] for r in train_rows(workdir)] == [2, 4, 6, 8]
  np.testing.assert_allclose(train_rows(workdir), want, rtol=1e-6)


def test_resumed_with_other_settings_says_so_and_keeps_the_old_config(
    tiny_data, finished_run, tmp_path, capsys):
  """Longer, with other log and evaluation steps: no warning, a note that
  the cosine schedule follows the new total. Another learning rate: a
  warning naming it, and the config of the steps before kept as
  config.step{N}.json."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  original = json.load(open(workdir / "config.json"))
  train.train_and_evaluate(
      tiny_config(tiny_data, **RUN | {"num_train_steps": 10, "log_every": 5,
                                      "eval_every": 5}), str(workdir))
  out = capsys.readouterr().out
  assert "Resuming from step 8" in out and "Warning" not in out
  # best/ holds step 8's parameters, of the steps this run continues.
  assert "Resuming with other settings" not in out
  assert os.listdir(workdir / "best") in (["8"], ["10"])
  lr_at_8 = optim.learning_rate_schedule(tiny_config(tiny_data).optimizer,
                                         10)(8)
  assert (f"Note: num_train_steps changed from 8 to 10: from step 8 on, the "
          f"cosine learning-rate schedule follows the new total (learning "
          f"rate {float(lr_at_8):.4g} at step 8).") in out, out
  assert sorted(p.name for p in workdir.glob("config*.json")) == [
      "config.json"]
  lr = original["optimizer"]["learning_rate"]
  train.train_and_evaluate(
      tiny_config(tiny_data, **RUN | {"num_train_steps": 12,
                                      "optimizer.learning_rate": lr / 2}),
      str(workdir))
  out = capsys.readouterr().out
  assert (f"Warning: resuming from step 10 with settings that differ from "
          f"the run's config (its value -> this one's): "
          f"optimizer.learning_rate {json.dumps(lr)} -> "
          f"{json.dumps(lr / 2)}. The steps up to 10 ran with "
          f"{workdir / 'config.step10.json'}") in out, out
  kept = json.load(open(workdir / "config.step10.json"))
  assert kept["optimizer"]["learning_rate"] == lr
  assert kept["num_train_steps"] == 10
  now = json.load(open(workdir / "config.json"))
  assert now["optimizer"]["learning_rate"] == lr / 2
  # A finished run relaunched as it was: it says so and only evaluates.
  train.train_and_evaluate(
      tiny_config(tiny_data, **RUN | {"num_train_steps": 12,
                                      "optimizer.learning_rate": lr / 2}),
      str(workdir))
  out = capsys.readouterr().out
  assert "has trained its 12 steps: evaluating its parameters again" in out
  assert "Warning" not in out and "Note" not in out
  # Trained on twice past its end, evaluated once more: one final test row,
  # at the last step (the earlier ends' rows went when they were trained
  # past).
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in rows if "test_loss" in r] == [12]


@pytest.mark.parametrize("dry_run", [False, True])
def test_fewer_steps_than_the_checkpoint_are_refused(tiny_data, finished_run,
                                                     dry_run):
  """num_train_steps below the step of the run's checkpoint: refused, by
  the dry run as by the run (not "this config fits its checkpoint"), with
  the run's files left alone."""
  files = ("config.json", "metrics.jsonl", "results.json")
  before = {f: (finished_run / f).read_bytes() for f in files}
  c = tiny_config(tiny_data, **RUN | {"num_train_steps": 6,
                                      "dry_run": dry_run})
  with pytest.raises(ValueError, match=(
      r"num_train_steps \(6\) is below the step of the checkpoint in .* "
      r"\(8\)\. Use num_train_steps >= 8")):
    train.train_and_evaluate(c, str(finished_run))
  assert {f: (finished_run / f).read_bytes() for f in files} == before


def test_better_evaluation_of_the_best_step_replaces_it(tiny_data,
                                                        finished_run,
                                                        tmp_path):
  """A run killed after saving a step's best parameters, before that
  step's checkpoint, evaluates the step again once resumed. Where the new
  evaluation comes out better than the saved one (other float rounding:
  another mesh or eval_batch_size), its parameters replace those of the
  same step in best/, instead of the run failing with "Checkpoint for step
  N already exists" at every relaunch."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  step = int(os.listdir(workdir / "best")[0])
  for s in os.listdir(workdir / "checkpoints"):
    if int(s) >= step:
      shutil.rmtree(workdir / "checkpoints" / s)
  # The killed run's evaluation of that step came out lower (by less than
  # one example of the 64).
  info = workdir / "best" / str(step) / "info" / "metadata"
  saved = json.loads(info.read_text())
  info.write_text(json.dumps(
      {**saved, "eval_accuracy": saved["eval_accuracy"] - 0.01}))
  results = train.train_and_evaluate(tiny_config(tiny_data, **RUN),
                                     str(workdir))
  assert os.listdir(workdir / "best") == [str(step)]
  assert results["best_eval_step"] == step
  assert results["best_eval_accuracy"] == saved["eval_accuracy"]
  abstract_state = _abstract_state(workdir)
  _, want = ckpt_lib.restore_params(str(finished_run), abstract_state,
                                    best=True)
  _, got = ckpt_lib.restore_params(str(workdir), abstract_state, best=True)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("change", ["learning_rate", "num_train_steps"])
def test_resumed_with_other_settings_drops_the_best_saved_after_it(
    tiny_data, finished_run, tmp_path, capsys, change):
  """A run resumed from step 4 with another learning rate (or another
  num_train_steps, which the cosine schedule follows) where best/ holds
  step 8's parameters of the earlier settings (a segment killed after
  evaluating step 8): those go, and best/ ends with this segment's."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  assert os.listdir(workdir / "best") == ["8"]
  shutil.rmtree(workdir / "checkpoints" / "8")
  lr = json.load(open(workdir / "config.json"))["optimizer"]["learning_rate"]
  fields = ({"optimizer.learning_rate": lr / 2} if change == "learning_rate"
            else {"num_train_steps": 12})
  results = train.train_and_evaluate(tiny_config(tiny_data, **RUN | fields),
                                     str(workdir))
  assert (f"Resuming with other settings: the best-on-validation parameters "
          f"that an earlier attempt saved after step 4 (step 8) are removed "
          f"from {workdir / 'best'}.") in capsys.readouterr().out
  evals = {r["step"]: r["eval_accuracy"] for r in metrics_lib.read_metrics(
      str(workdir)) if "eval_accuracy" in r and r["step"] > 4}
  assert results["best_eval_accuracy"] == max(evals.values())
  assert evals[results["best_eval_step"]] == max(evals.values())
  assert os.listdir(workdir / "best") == [str(results["best_eval_step"])]
  if change == "num_train_steps":
    return
  assert results["best_eval_step"] == 8
  assert list(evals.values()) == [results["best_eval_accuracy"]]
  abstract_state = _abstract_state(workdir)
  _, got = ckpt_lib.restore_params(str(workdir), abstract_state, best=True)
  _, want = saved_params(str(workdir))
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)


def test_changed_settings_are_every_field_but_those_a_resume_may_change(
    tiny_data, finished_run, tmp_path):
  """config_changes (a resume's warning and its best/, the sweep's finished
  runs) names each field that differs from the run's config.json, those
  of the model and nested ones included, and one the run's config lacks;
  not those a resume may change freely."""
  c = lambda **fields: tiny_config(tiny_data, **RUN | fields)
  assert train.config_changes(c(), str(finished_run)) == []
  assert train.config_changes(c(
      num_train_steps=12, log_every=1, eval_every=2, checkpoint_every=6,
      eval_batch_size=32, cache_dir="/elsewhere", **{"mesh.model": 1}),
                              str(finished_run)) == []
  assert train.config_changes(c(
      data_seed=3, **{"model.attention": "full", "model.dropout_rate": 0.2,
                      "data.num_train": 7}), str(finished_run)) == [
                          "data.num_train 6000 -> 7", "data_seed 0 -> 3",
                          'model.attention "hierarchical" -> "full"',
                          "model.dropout_rate 0.1 -> 0.2"]
  # A run of an older version, whose config.json lacks a field.
  old = json.load(open(finished_run / "config.json"))
  del old["model"]["head_activation"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert train.config_changes(c(), str(tmp_path)) == [
      'model.head_activation (absent) -> "gelu"']


def _damage_arrays(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    if "/d" in root[len(str(step_dir)):]:
      for f in files:
        open(os.path.join(root, f), "w").close()


def test_start_from_step_0_drops_the_best_of_an_earlier_start(
    tiny_data, finished_run, tmp_path, capsys):
  """A run that starts from step 0 (its checkpoints deleted, say) where
  best/ holds an earlier start's parameters: those go, so that the best
  parameters and their test numbers are this run's."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  assert os.listdir(workdir / "best") == ["8"]
  shutil.rmtree(workdir / "checkpoints")
  c = tiny_config(tiny_data, **{**RUN, "num_train_steps": 4,
                                "optimizer.learning_rate": 1e-4})
  results = train.train_and_evaluate(c, str(workdir))
  assert results["best_eval_step"] == 4
  assert os.listdir(workdir / "best") == ["4"]
  evals = [r["eval_accuracy"] for r in metrics_lib.read_metrics(
      str(workdir)) if "eval_accuracy" in r]
  assert evals == [results["best_eval_accuracy"]]
  assert (f"Starting from step 0: the best-on-validation parameters of an "
          "earlier start that left no checkpoint (step 8) are removed from "
          f"{workdir / 'best'}.") in capsys.readouterr().out


def test_trained_on_and_stopped_leaves_no_results_of_the_earlier_end(
    tiny_data, finished_run, tmp_path, monkeypatch):
  """A finished run trained on with a higher num_train_steps and stopped
  before the new end: its results.json (the earlier end's test numbers) goes
  when it resumes, as the earlier end's test rows of metrics.jsonl do, so the
  sweep launches it again and reproduce_lra tables it as unfinished instead
  of taking it for finished with these settings."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  assert (workdir / "results.json").exists()
  train_iterator = input_pipeline.train_iterator

  def signal_at_second_batch(*args, **kwargs):
    it = train_iterator(*args, **kwargs)
    next_batch, batches = it.__next__, [0]

    class Stopping:
      def __iter__(self):
        return self

      def __next__(self):
        batches[0] += 1
        if batches[0] == 2:
          os.kill(os.getpid(), signal.SIGTERM)
        return next_batch()

      get_state, set_state = it.get_state, it.set_state

    return Stopping()

  monkeypatch.setattr(input_pipeline, "train_iterator",
                      signal_at_second_batch)
  c = tiny_config(tiny_data, **RUN | {"num_train_steps": 12})
  with pytest.raises(train.TrainingStopped, match="at step 10 of 12"):
    train.train_and_evaluate(c, str(workdir))
  sweep = load_script("sweep")
  assert not sweep.finished_earlier(c, str(workdir))
  reproduce_lra = load_script("reproduce_lra")
  assert reproduce_lra.collect(str(workdir), "listops")["status"] == (
      "unfinished")
  assert not (workdir / "results.json").exists()
  assert not any("test_loss" in r
                 for r in metrics_lib.read_metrics(str(workdir)))


# Restoring arrays cut short leaves orbax's asyncio callbacks to a closed
# event loop ("Event loop is closed", printed as an unraisable exception);
# the run's own error is what the test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [
    "arrays cut short", "no state", "no data", "data not JSON", "empty",
    "best info not JSON"])
def test_unreadable_checkpoint_is_a_clear_error(tiny_data, finished_run,
                                                tmp_path, damage):
  """A relaunch over a damaged checkpoint names its folder and what to do
  (delete it: resume from the checkpoint before), in one line, and
  leaves the run's files alone."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  if damage.startswith("best"):
    folder, step = "best", int(os.listdir(workdir / "best")[0])
  else:
    folder, step = "checkpoints", 8
  step_dir = workdir / folder / str(step)
  if damage == "arrays cut short":
    _damage_arrays(step_dir)
  elif damage == "no state":
    shutil.rmtree(step_dir / "state")
  elif damage == "no data":
    shutil.rmtree(step_dir / "data")
  elif damage == "data not JSON":
    (step_dir / "data" / "metadata").write_text("{next_index")
  elif damage == "empty":
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  else:
    (step_dir / "info" / "metadata").write_text("{step")
  files = ("config.json", "metrics.jsonl", "results.json")
  before = {f: (workdir / f).read_bytes() for f in files}
  c = tiny_config(tiny_data, **{**RUN, "num_train_steps": 12})
  with pytest.raises(ValueError) as e:  # main prints it as "Error: ..."
    train.train_and_evaluate(c, str(workdir))
  message = str(e.value)
  assert "\n" not in message
  assert f"The checkpoint of step {step} in {step_dir} cannot be read (" in (
      message)
  if folder == "checkpoints":
    assert (f"Delete {step_dir} to resume from step 4, the checkpoint before "
            "it, or use a new --workdir." in message)
  else:
    assert f"Delete {step_dir} to go on without the best-on-validation" in (
        message)
  assert {f: (workdir / f).read_bytes() for f in files} == before
  if damage in ("arrays cut short", "best info not JSON"):
    shutil.rmtree(step_dir)  # Doing what it says resumes.
    results = train.train_and_evaluate(c, str(workdir))
    assert saved_params(str(workdir))[0] == 12
    # best/ holds what results.json says it evaluated.
    assert os.listdir(workdir / "best") == [str(results["best_eval_step"])]


def test_unreadable_checkpoint_prints_no_traceback(tiny_data, finished_run,
                                                   tmp_path):
  """From the command line, a checkpoint that fails while its arrays are
  read prints its one-line error and nothing else: the reads still under
  way, ending after it, printed "Event loop is closed" tracebacks."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  os.remove(workdir / "checkpoints" / "8" / "state" / "manifest.ocdbt")
  args = ["--config=configs/listops.py:quick", f"--workdir={workdir}",
          f"--config.data_dir={tiny_data}", *TINY_FLAGS,
          *[f"--config.{k}={v}" for k, v in RUN.items()]]
  r = subprocess.run([sys.executable, "-m", "htransformer.main", *args],
                     cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=200)
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stderr.splitlines() == [
      l for l in r.stderr.splitlines() if l.startswith(
          f"Error: The checkpoint of step 8 in {workdir / 'checkpoints'}"
          "/8 cannot be read (")], r.stderr[-3000:]


def _abstract_state(workdir):
  """The training state's structure for the run in ``workdir``, built as
  the readers of finished runs (sampling, inspect_classifier) build it."""
  config = config_utils.read_run_config(str(workdir))
  task = tasks.get_task(config, str(workdir))
  _, params = nnx.split(train.build_model(config, task, config.seed),
                        nnx.Param)
  tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
  return train.abstract_state(params, tx)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_reading_a_damaged_checkpoint_of_a_finished_run(finished_run,
                                                        tmp_path):
  """restore_params (sampling, inspect_classifier) names the damaged
  checkpoint and what to do, in one line, as a CheckpointError (main
  programs print ValueErrors as "Error: ..."); the undamaged best one
  still reads."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  abstract_state = _abstract_state(workdir)
  step_dir = workdir / "checkpoints" / "8"
  _damage_arrays(step_dir)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.restore_params(str(workdir), abstract_state)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(
      f"The checkpoint of step 8 in {step_dir} cannot be read ("), message
  assert message.endswith(
      "Copy the run's folder again in full, or delete "
      f"{step_dir} to read step 4."), message
  step, params = ckpt_lib.restore_params(str(workdir), abstract_state,
                                         best=True)
  assert step == int(os.listdir(workdir / "best")[0])
  assert jax.tree.leaves(params)
  shutil.rmtree(step_dir)  # Doing what it says reads step 4.
  assert ckpt_lib.restore_params(str(workdir), abstract_state)[0] == 4
  shutil.rmtree(workdir / "checkpoints")
  with pytest.raises(FileNotFoundError, match="no such folder"):
    ckpt_lib.restore_params(str(workdir), abstract_state)


_SAVE_INTO_A_FILE = """
import os, shutil, sys, time
import jax.numpy as jnp
from htransformer import checkpoint as ckpt_lib
workdir = sys.argv[1]
ckpt = ckpt_lib.Checkpointer(workdir)
state = {"step": jnp.zeros((), jnp.int32), "w": jnp.ones((4, 4))}
ckpt.save(1, state, {"next_index": 1})
ckpt.wait()
# The disk goes away under the run: its step folder cannot be made.
shutil.rmtree(os.path.join(workdir, "checkpoints"))
open(os.path.join(workdir, "checkpoints"), "w").close()
try:
  ckpt.save(2, state, {"next_index": 2})
  ckpt.wait()
except Exception as e:  # pylint: disable=broad-except
  print(f"{type(e).__name__}: {e}")
ckpt.close()
"""


def test_unwritable_checkpoint_folder_is_a_clear_error(tiny_data, tmp_path):
  """A checkpoint folder that cannot be written: refused before training
  starts, in one line; one that fails later (a full disk) raises at the
  save, and the process exits at once (a failure in orbax's background
  threads held it for 5 minutes)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a folder")
  args = ["--config=configs/listops.py:quick", f"--workdir={workdir}",
          f"--config.data_dir={tiny_data}", "--config.max_length=40",
          "--config.num_train_steps=4", "--config.checkpoint_every=2"]
  start = time.time()
  r = subprocess.run([sys.executable, "-m", "htransformer.main", *args],
                     cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=200)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("Error: ")]
  assert errors == [f"Error: Checkpoint folder {workdir / 'checkpoints'}: "
                    "exists and is not a folder."], r.stderr[-3000:]
  assert not (workdir / "metrics.jsonl").exists()  # nothing trained

  r = subprocess.run([sys.executable, "-c", _SAVE_INTO_A_FILE,
                      str(tmp_path / "later")], cwd=ROOT,
                     env=child_env(JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=200)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (f"CheckpointError: Could not write a checkpoint in "
          f"{tmp_path / 'later' / 'checkpoints'} (NotADirectoryError" in
          r.stdout), r.stdout + r.stderr[-3000:]
  assert time.time() - start < 150


_KILLED_IN_SAVES = """
import os, signal, sys
import jax.numpy as jnp
from htransformer import checkpoint as ckpt_lib
ckpt = ckpt_lib.Checkpointer(sys.argv[1])
state = {"step": jnp.zeros((), jnp.int32), "w": jnp.ones((1024, 1024))}
ckpt.save(1, state, {"next_index": 1})
ckpt.save_best(1, state, {"eval_accuracy": 0.5, "step": 1})
ckpt.wait()
# A stop's checkpoint of step 3 and a better evaluation, both begun (their
# writing in the background) when the kill comes. Their arrays are 64 MB,
# so the writing cannot end before the kill even where this process waits
# for a busy core (with 4 MB, once in a loaded suite, step 3's save ended
# first and left no temporary folder).
big = {"step": state["step"], "w": jnp.ones((4096, 4096))}
ckpt.save(3, big, {"next_index": 3})
ckpt.save_best(3, big, {"eval_accuracy": 0.75, "step": 3})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_saves_cut_short_by_a_kill_leave_nothing_behind(tmp_path):
  """The temporary folders of saves a SIGKILL cut short (arrays written in
  part) go when the relaunch starts, also those of steps it does not save
  again."""
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-c", _KILLED_IN_SAVES, str(workdir)],
                     cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=200)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  tmp = "3.orbax-checkpoint-tmp"
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", tmp]
  assert tmp in os.listdir(workdir / "best")
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  try:
    assert ckpt.latest_step() == 1
    state = {"step": np.int32(0), "w": np.zeros((1024, 1024), np.float32)}
    ckpt.save(2, state, {"next_index": 2})
    ckpt.save_best(2, state, {"eval_accuracy": 0.625, "step": 2})
    ckpt.wait()
  finally:
    ckpt.close()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
  assert os.listdir(workdir / "best") == ["2"]


def test_second_run_in_a_workdir_is_refused(tiny_data, tmp_path):
  """A launch into a workdir where a run still trains is refused (both
  would write the same checkpoints and metrics.jsonl: rows twice, orbax
  failing on the other's files); the training run goes on, and once it
  ends, even killed, a relaunch resumes."""
  workdir = tmp_path / "run"
  run = {**RUN, "num_train_steps": 100000, "checkpoint_every": 2}
  proc = subprocess.Popen(
      [sys.executable, "-m", "htransformer.main",
       "--config=configs/listops.py:quick", f"--workdir={workdir}",
       f"--config.data_dir={tiny_data}", *TINY_FLAGS,
       *[f"--config.{k}={v}" for k, v in run.items()]],
      cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 200
    while (ckpt_lib.latest_step(str(workdir)) is None and
           proc.poll() is None and time.time() < deadline):
      time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    before = _rows(workdir)
    # The same run, relaunched while it trains (in this process).
    with pytest.raises(ValueError, match=(
        f"Another run is training in {workdir} .*: wait for it to end or "
        "stop it, or use a new --workdir.")):
      train.train_and_evaluate(
          tiny_config(tiny_data, **{**run, "num_train_steps": 400}),
          str(workdir))
    assert proc.poll() is None
    assert _rows(workdir)[:len(before)] == before
  finally:
    proc.kill()
    proc.wait()
  step = ckpt_lib.latest_step(str(workdir))
  train.train_and_evaluate(  # only evaluates the checkpoint
      tiny_config(tiny_data, **{**run, "num_train_steps": step}),
      str(workdir))
  assert json.load(open(workdir / "results.json"))["num_train_steps"] == step


_JOB = """
import os, signal, sys, time
name = sys.argv[1]
def stop(signum, frame):
  open(name + ".stopped", "w").close()
  sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
with open(name + ".pid", "w") as f:
  f.write(str(os.getpid()))
time.sleep(120)
"""

_LAUNCHERS = {
    "gpus": """
import sys
from htransformer import launch
jobs = [(n, [sys.executable, "-c", sys.argv[1], n], n + ".log")
        for n in ("a", "b", "c")]
launch.run_on_gpus(jobs, ["0", "1"], poll_s=0.05)
""",
    "in_turn": """
import sys
from htransformer import launch
jobs = [(n, [sys.executable, "-c", sys.argv[1], n]) for n in ("a", "b")]
launch.run_in_turn(jobs)
"""}


@pytest.mark.parametrize("mode", ["gpus", "in_turn"])
def test_stopped_launcher_stops_its_runs(tmp_path, mode):
  """SIGTERM to the launcher of runs (scripts/sweep.py and
  reproduce_lra.py, one after another or with --gpus one per GPU) passes
  on to the runs (a training run saves and exits) and starts no more,
  instead of leaving them running with no launcher."""
  proc = subprocess.Popen([sys.executable, "-c", _LAUNCHERS[mode], _JOB],
                          cwd=tmp_path, env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  started = "ab" if mode == "gpus" else "a"
  pids = []
  try:
    deadline = time.time() + 60
    while len(pids) < len(started) and time.time() < deadline:
      time.sleep(0.05)
      pids = [int(open(tmp_path / f"{n}.pid").read()) for n in started
              if (tmp_path / f"{n}.pid").exists() and
              (tmp_path / f"{n}.pid").read_text()]
    assert len(pids) == len(started)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGTERM, out
    for n in started:
      assert (tmp_path / f"{n}.stopped").exists(), out
    # No next run started: "c" with two GPUs, "b" one after another.
    after = "c" if mode == "gpus" else "b"
    assert not (tmp_path / f"{after}.pid").exists(), out
    for pid in pids:
      with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_progress_rate_times_no_compilation(tiny_data, tmp_path,
                                            monkeypatch):
  """No XLA compilation falls inside a progress line's timed interval
  (the learning rate and the sums of the first log line compiled inside
  the first one, which read several times too slow on a GPU), also in a
  resumed run."""
  compiles, intervals = [], []

  def on_event(event, duration, **kwargs):
    del kwargs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      compiles.append((time.time() - duration, time.time()))

  class Timed(metrics_lib.Progress):
    def report(self, step, scalars):
      since = self._clock[1]  # pylint: disable=protected-access
      rate = super().report(step, scalars)
      intervals.append((step, since, self._clock[1]))  # pylint: disable=protected-access
      return rate

  monkeypatch.setattr(metrics_lib, "Progress", Timed)
  jax.clear_caches()  # compiled by earlier tests, as by none in a new run
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    c = tiny_config(tiny_data, **{**RUN, "log_every": 5})
    train.train_and_evaluate(c, str(tmp_path))
    c = tiny_config(tiny_data, **{**RUN, "num_train_steps": 16,
                                  "log_every": 5})
    train.train_and_evaluate(c, str(tmp_path))  # resumed at step 8
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  # Log and checkpoint steps, the last.
  assert [s for s, _, _ in intervals] == [4, 5, 8, 10, 12, 15, 16]
  assert compiles
  inside = [(s, round(b - a, 3)) for s, a, b in intervals
            for c0, c1 in compiles if c1 > a and c0 < b]
  assert not inside, inside


def test_divergence_before_the_first_checkpoint_says_so(tiny_data, tmp_path):
  c = tiny_config(tiny_data, **{**RUN, "optimizer.learning_rate": 1e30})
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train_and_evaluate(c, str(tmp_path))
  assert f"no checkpoint was saved yet in {tmp_path}." in str(e.value)
  assert "None" not in str(e.value)


def test_checkpoint_whose_parameters_give_nan_is_named(tiny_data,
                                                      tmp_path):
  """An update at a checkpoint step that leaves huge but finite parameters:
  the checkpoint is written, the next step's loss is NaN. The error says
  that checkpoint's parameters give it, also when a relaunch resumes from
  it, and names the one to resume from; doing as it says finishes the
  run."""
  workdir = str(tmp_path)
  fields = {**RUN, "log_every": 1, "checkpoint_every": 1,
            "optimizer.warmup_steps": 1}
  c = tiny_config(tiny_data, **fields, **{"optimizer.learning_rate": 1e30})
  advice = (f"Stopping; the parameters of the last checkpoint, step 2 in "
            f"{workdir}, give a NaN or inf loss at step 3: delete "
            f"{tmp_path / 'checkpoints' / '2'} to resume from step 1, the "
            "checkpoint before it. ")
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train_and_evaluate(c, workdir)
  assert str(e.value).startswith(
      "Training loss became NaN or inf between steps 2 and 3 (or earlier "
      "since the last log). " + advice), str(e.value)
  c = tiny_config(tiny_data, **fields)  # a learning rate that trains
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train_and_evaluate(c, workdir)
  assert advice in str(e.value)
  shutil.rmtree(tmp_path / "checkpoints" / "2")
  results = train.train_and_evaluate(c, workdir)
  assert np.isfinite(results["test_loss"])


def test_nonfinite_parameters_are_not_checkpointed(tiny_data, tmp_path,
                                                   monkeypatch):
  """An update that leaves NaN parameters at a checkpoint step, whose own
  loss (computed before it) is finite: the run stops there, and they are
  not saved."""
  make_optimizer = optim.make_optimizer

  def nan_updates(cfg, total_steps):
    tx, schedule = make_optimizer(cfg, total_steps)
    nan = optax.stateless(lambda updates, params: jax.tree.map(
        lambda u: u * jnp.nan, updates))
    return optax.chain(tx, nan), schedule

  monkeypatch.setattr(optim, "make_optimizer", nan_updates)
  c = tiny_config(tiny_data, **{**RUN, "log_every": 1, "checkpoint_every": 1})
  with pytest.raises(train.NonFiniteLossError,
                     match="^Parameters became NaN or inf at step 1. "
                     "Stopping; no checkpoint was saved yet"):
    train.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []


# htransformer.main (its arguments after the script's) whose checkpoints
# take 2 s longer to finish in the background.
_SLOW_SAVES = """
import sys, time
import orbax.checkpoint as ocp
from absl import app
from htransformer import config_utils, main
finalize = ocp.CheckpointManager._finalize
def slow(*args, **kwargs):
  time.sleep(2)
  return finalize(*args, **kwargs)
ocp.CheckpointManager._finalize = slow
sys.argv = ["htransformer.main", *sys.argv[1:]]
app.run(main.main, flags_parser=config_utils.parse_config_flags)
"""


def _tiny_args(tiny_data, workdir, **fields):
  """Command-line arguments of ``tiny_config``'s run in ``workdir``, with
  ``fields`` set."""
  fields = {"data_dir": tiny_data, "max_length": 40,
            "model.num_layers": 1, "model.emb_dim": 32, "model.qkv_dim": 32,
            "model.mlp_dim": 32, "model.num_heads": 2, "model.block_size": 4,
            "batch_size": 8, "eval_batch_size": 16,
            "optimizer.warmup_steps": 4, **fields}
  return ["--config=configs/listops.py:quick", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in fields.items()]]


def test_divergence_waits_for_the_checkpoint_being_written(tiny_data,
                                                            tmp_path):
  """A loss that turns NaN while the checkpoint before it is still being
  written: the error comes once it is on disk, names it, and is the one
  line printed (no traceback of a save cut short at exit)."""
  workdir = tmp_path / "run"
  args = _tiny_args(tiny_data, workdir, **{
      **RUN, "log_every": 1, "checkpoint_every": 2,
      "optimizer.warmup_steps": 1, "optimizer.learning_rate": 1e30})
  r = subprocess.run([sys.executable, "-c", _SLOW_SAVES, *args],
                     cwd=ROOT, env=child_env(JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=200)
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stderr.splitlines() == [
      "Error: Training loss became NaN or inf between steps 2 and 3 (or "
      "earlier since the last log). Stopping; the parameters of the last "
      f"checkpoint, step 2 in {workdir}, give a NaN or inf loss at step 3: "
      f"delete {workdir / 'checkpoints' / '2'} to start again from step 0. "
      "Lower optimizer.learning_rate or set optimizer.grad_clip."
  ], r.stderr[-3000:]
  assert os.listdir(workdir / "checkpoints") == ["2"]


def test_sigterm_during_the_last_evaluation_stops_before_the_test(
    tiny_data, tmp_path, monkeypatch):
  """SIGTERM (``timeout``, a scheduler) while the last step evaluates: the
  run stops there, as at any other step, instead of going on into the
  test evaluation; the relaunch only evaluates on the test split."""
  get_task = tasks.get_task
  workdir = str(tmp_path)

  def before_val_read(i):
    rows = metrics_lib.read_metrics(workdir)
    if i == 0 and rows and rows[-1]["step"] == RUN["num_train_steps"]:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(tasks, "get_task",
                      with_val_watched(get_task, before_val_read))
  c = tiny_config(tiny_data, **RUN)
  with pytest.raises(train.TrainingStopped,
                     match="at step 8 of 8; .* evaluate on the test split"):
    train.train_and_evaluate(c, workdir)
  assert saved_params(workdir)[0] == 8
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert not any("test_loss" in r for r in metrics_lib.read_metrics(workdir))

  monkeypatch.setattr(tasks, "get_task", get_task)
  results = train.train_and_evaluate(c, workdir)
  assert "test_accuracy" in results
  rows = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
  assert [r["step"] for r in rows if "test_loss" in r] == [8]


def test_rewind_drops_the_rows_a_resumed_run_writes_again(tmp_path):
  """Resumed at step 4: the rows after it and a line cut short go, the
  rows of step 4 stay; with redo_final (a finished run's relaunch) its
  test row goes too. Every line left is a whole row."""
  rows = [{"step": 2, "train_loss": 1.5}, {"step": 4, "train_loss": 1.25},
          {"step": 4, "eval_loss": 1.0}, {"step": 4, "test_loss": 1.125},
          {"step": 5, "train_loss": 1.0}, {"step": 6, "eval_loss": 0.5}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows)
                  + '{"step": 3, "train_lo')
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.rewind(4)
  assert [json.loads(l) for l in path.read_text().splitlines()] == rows[:4]
  writer.rewind(4, redo_final=True)
  assert [json.loads(l) for l in path.read_text().splitlines()] == rows[:3]
  writer.close()


def test_read_metrics_leaves_out_a_line_cut_short(tmp_path):
  """A run killed while writing a row (and not yet resumed) leaves half a
  line: the rows before it still read."""
  rows = [{"step": 2, "train_loss": 1.5}, {"step": 4, "eval_loss": 1.25}]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (tmp_path / "metrics.jsonl").write_text(text + '{"step": 6, "train_lo')
  assert metrics_lib.read_metrics(str(tmp_path)) == rows


if __name__ == "__main__":
  if sys.argv[1] == "kill":
    sys.path.insert(0, ROOT)
    kill_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
                int(sys.argv[6]))
