"""scripts/reproduce_lra.py: the table from fake finished workdirs."""

import json
import os

import pytest

from htransformer.data import pathfinder
from tests.scripts_helper import load_script

rl = load_script("reproduce_lra")


def _fake_run(root, task, model, acc, data_dir="", best=None, finished=True):
  d = os.path.join(root, f"{task}-{model}")
  os.makedirs(d)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"task": task, "data_dir": data_dir}, f)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 10, "eval_accuracy": acc}) + "\n")
  if finished:
    r = {"test_accuracy": acc, "test_loss": 1.0}
    if best is not None:
      r["test_accuracy_best_eval"] = best
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump(r, f)


def _row(text, start):
  return next(l for l in text.splitlines() if l.startswith("| " + start))


def test_table_from_finished_workdirs(tmp_path):
  root = str(tmp_path / "runs")
  accs = {"listops": 0.40, "text": 0.70, "retrieval": 0.60, "image": 0.45,
          "pathfinder": 0.65}
  for task, acc in accs.items():
    _fake_run(root, task, "hierarchical", acc,
              data_dir="/data/x" if task in ("text", "retrieval") else "",
              best=acc + 0.01)
  _fake_run(root, "pathx", "hierarchical", 0.5)
  _fake_run(root, "listops", "full", 0.36, data_dir="/lra/listops-1000")
  _fake_run(root, "text", "full", 0.5, finished=False)
  entries = {(t, m): rl.collect(rl.workdir_for(root, t, m), t)
             for t in rl.TASKS for m in rl.MODELS}
  text = rl.table(entries)
  ours = _row(text, "H-Transformer-1D (ours)")  # no block size recorded
  cells = [c.strip() for c in ours.strip("|").split("|")]
  assert cells[1:] == ["40.00 (gen.)", "70.00", "60.00", "45.00",
                       "65.00 (gen.)", "50.00 (gen.)", "56.00"]
  full = [c.strip() for c in _row(text, "Transformer, full").strip(
      "|").split("|")]
  assert full[1:] == ["36.00", "unfinished", "not run", "not run", "not run",
                      "not run", "— (1/5 tasks)"]
  paper = _row(text, "H-Transformer-1D (paper)")
  assert "49.53" in paper and "fail" in paper and "61.41" in paper
  assert "54.39" in _row(text, "Transformer (LRA paper)")
  assert text.splitlines()[0] == ("| model | ListOps | Text | Retrieval | "
                                  "Image | Pathfinder | Path-X | Avg |")
  sec = rl.section(entries, "runs")
  assert sec.startswith(rl.SECTION)
  assert "ListOps hierarchical 41.00" in sec


def test_collect_only_writes_own_section(tmp_path, capsys):
  root = str(tmp_path / "runs")
  _fake_run(root, "pathfinder", "hierarchical", 0.61)
  md = tmp_path / "results.md"
  md.write_text("# Results\n\n## ListOps\n\nkeep me\n\n"
                f"{rl.SECTION}\n\nold table\n\n## Later\n\nkeep me too\n")
  assert rl.main(["--collect_only", f"--workdir_root={root}",
                  f"--results_md={md}"]) == 0
  out = capsys.readouterr().out
  assert "61.00 (gen.)" in out
  text = md.read_text()
  assert "keep me\n" in text and "keep me too" in text
  assert "old table" not in text and text.count(rl.SECTION) == 1
  assert text.index("## ListOps") < text.index(rl.SECTION) < text.index(
      "## Later")
  # Again: replaced, not duplicated; a file without the section gets it
  # appended.
  rl.main(["--collect_only", f"--workdir_root={root}", f"--results_md={md}"])
  assert md.read_text() == text
  other = tmp_path / "other.md"
  other.write_text("# Results\n\n## Mine\n\nx\n")
  rl.main(["--collect_only", f"--workdir_root={root}",
           f"--results_md={other}"])
  assert other.read_text().startswith("# Results\n\n## Mine\n\nx\n\n"
                                      + rl.SECTION)


def test_the_results_file_is_written_only_when_asked_and_not_emptied(
    tmp_path, capsys):
  """The default prints the table only; a results file is not replaced by
  a table of no finished run (a typo in --workdir_root, a fresh clone);
  collecting from a folder that is not there is an error."""
  md = tmp_path / "results.md"
  md.write_text(f"# Results\n\n{rl.SECTION}\n\nthe published table\n")
  root = tmp_path / "runs"
  _fake_run(str(root), "listops", "full", 0.1, finished=False)
  assert rl.main(["--collect_only", f"--workdir_root={root}"]) == 0
  assert rl.parse_args([]).results_md == ""
  assert rl.main(["--collect_only", f"--workdir_root={root}",
                  f"--results_md={md}"]) == 0
  err = capsys.readouterr().err
  assert f"Not written to {md}: no run under {root} has finished" in err
  assert "the published table" in md.read_text()
  with pytest.raises(SystemExit, match="no such folder, so no runs"):
    rl.main(["--collect_only", f"--workdir_root={tmp_path / 'typo'}",
             f"--results_md={md}"])
  assert "the published table" in md.read_text()


def test_block_size_in_the_row_label(tmp_path):
  root = str(tmp_path / "runs")
  for task, block in (("listops", 8), ("text", 8), ("image", 16)):
    _fake_run(root, task, "hierarchical", 0.5)
    cfg = os.path.join(root, f"{task}-hierarchical", "config.json")
    json.dump({"task": task, "model": {"block_size": block}}, open(cfg, "w"))
  entries = lambda tasks: {
      (t, "hierarchical"): rl.collect(rl.workdir_for(root, t, "hierarchical"),
                                      t) for t in tasks}
  assert "| H-Transformer-1D, block 8 (ours) |" in rl.table(
      entries(["listops", "text"]))
  assert "| H-Transformer-1D (ours) |" in rl.table(
      entries(["listops", "image"]))


def test_finished_runs_with_other_settings_are_refused(tmp_path, capsys):
  """A finished run relaunched with another --set value would be skipped
  as finished and tabled as if it had those settings: refused, naming
  them, as is a lower num_train_steps; a higher one resumes it."""
  trainer = tmp_path / "trainer"
  trainer.write_text(FAKE_TRAINER.format(python=rl.sys.executable))
  trainer.chmod(0o755)
  root = tmp_path / "runs"
  workdir = root / "listops-hierarchical"
  workdir.mkdir(parents=True)
  json.dump({"task": "listops", "model": {"attention": "hierarchical"},
             "num_train_steps": 20, "optimizer": {"learning_rate": 0.05}},
            open(workdir / "config.json", "w"))
  (workdir / "metrics.jsonl").write_text('{"step": 20}\n')
  json.dump({"test_accuracy": 0.3, "test_loss": 1.0},
            open(workdir / "results.json", "w"))
  argv = ["--tasks=listops", "--models=hierarchical", f"--workdir_root={root}",
          f"--python={trainer}"]
  assert rl.main(argv + ["--set=num_train_steps=20"]) == 0
  assert "finished earlier" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    rl.main(argv + ["--set=num_train_steps=20",
                    "--set=optimizer.learning_rate=0.5"])
  assert (f"{workdir} (optimizer.learning_rate 0.05 -> 0.5)"
          in str(e.value)), str(e.value)
  # Fewer steps than it trained: refused too (training would refuse them).
  with pytest.raises(SystemExit) as e:
    rl.main(argv + ["--set=num_train_steps=10"])
  assert f"{workdir} (num_train_steps 20 -> 10)" in str(e.value), str(
      e.value)
  assert rl.main(argv + ["--set=num_train_steps=40"]) == 0
  out = capsys.readouterr().out
  assert "finished earlier" not in out and "num_train_steps=40" in out


def test_data_record_and_shortened_schedules(tmp_path):
  """results.json's data record overrides the data_dir guess; a run with
  fewer steps than its config is marked with both step counts."""
  root = str(tmp_path / "runs")
  full = rl.config_steps("pathfinder")
  assert full == 62600
  _fake_run(root, "pathfinder", "hierarchical", 0.5, data_dir="/tmp/pf32")
  _fake_run(root, "pathfinder", "full", 0.7, data_dir="/lra_release")
  _fake_run(root, "listops", "hierarchical", 0.4)
  for model, generated, steps in (("hierarchical", True, 6260),
                                  ("full", False, full)):
    path = os.path.join(root, f"pathfinder-{model}", "results.json")
    r = json.load(open(path))
    r.update(data={"data_dir": "x", "generated": generated,
                   "generator": {"generator_version":
                                 pathfinder.GENERATOR_VERSION}},
             num_train_steps=steps)
    json.dump(r, open(path, "w"))
  entries = {(t, m): rl.collect(rl.workdir_for(root, t, m), t)
             for t in rl.TASKS for m in rl.MODELS}
  assert entries[("pathfinder", "hierarchical")]["steps"] == (6260, full)
  assert "steps" not in entries[("pathfinder", "full")]
  text = rl.table(entries)
  ours = [c.strip() for c in _row(text, "H-Transformer-1D (ours)")
          .strip("|").split("|")]
  assert ours[5] == "50.00 (gen., 6,260 of 62,600 steps)"
  assert ours[1] == "40.00 (gen.)"  # Old results.json: guessed from data_dir.
  theirs = [c.strip() for c in _row(text, "Transformer, full").strip(
      "|").split("|")]
  assert theirs[5] == "70.00"
  # Images of an older Pathfinder generator (no version recorded: 1).
  path = os.path.join(root, "pathfinder-hierarchical", "results.json")
  r = json.load(open(path))
  del r["data"]["generator"]
  json.dump(r, open(path, "w"))
  entry = rl.collect(rl.workdir_for(root, "pathfinder", "hierarchical"),
                     "pathfinder")
  assert rl._cell(entry) == (
      "50.00 (gen. v1, superseded, 6,260 of 62,600 steps)")
  # An unfinished run says how far it got.
  _fake_run(root, "pathx", "full", 0.5, finished=False)
  cfg_path = os.path.join(root, "pathx-full", "config.json")
  json.dump({"task": "pathx", "num_train_steps": 25000}, open(cfg_path, "w"))
  with open(os.path.join(root, "pathx-full", "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 7500, "train_loss": 0.69}) + "\n")
  entry = rl.collect(rl.workdir_for(root, "pathx", "full"), "pathx")
  assert rl._cell(entry) == "unfinished (7,500 of 25,000 steps)"


def test_commands():
  cmd = rl.run_command("py", "text", "full", "/w/text-full", "quick",
                       "/d/aclImdb", ["batch_size=8"])
  assert cmd == ["py", "-m", "htransformer.main",
                 "--config=configs/text.py:quick", "--workdir=/w/text-full",
                 "--config.model.attention=full",
                 "--config.data_dir=/d/aclImdb", "--config.batch_size=8"]
  with pytest.raises(SystemExit):
    rl.main(["--collect_only", "--tasks=nope", "--results_md="])


FAKE_TRAINER = '''#!{python}
"""Stands in for `python -m htransformer.main`: records its GPU and writes
the files of a finished run."""
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
workdir = args["workdir"]
task = os.path.basename(args["config"]).split(".")[0]
os.makedirs(workdir, exist_ok=True)
print("GPU=" + os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
if task == "pathfinder" and args["config.model.attention"] == "full":
  sys.exit(3)  # A run that fails.
json.dump({{"task": task, "data_dir": ""}},
          open(os.path.join(workdir, "config.json"), "w"))
open(os.path.join(workdir, "metrics.jsonl"), "w").write('{{"step": 1}}\\n')
json.dump({{"test_accuracy": 0.5}},
          open(os.path.join(workdir, "results.json"), "w"))
'''


@pytest.mark.parametrize("gpus", ["", "2"], ids=["sequential", "gpus"])
def test_runs_the_chosen_tasks(tmp_path, capsys, gpus):
  """The run path (a stand-in trainer): every task and model once, failures
  reported, finished runs not run again; with --gpus one per GPU."""
  trainer = tmp_path / "trainer"
  trainer.write_text(FAKE_TRAINER.format(python=rl.sys.executable))
  trainer.chmod(0o755)
  root = tmp_path / "runs"
  argv = ["--tasks=listops,pathfinder", f"--workdir_root={root}",
          "--results_md=", f"--python={trainer}"] + (
              [f"--gpus={gpus}"] if gpus else [])
  assert rl.main(argv) == 1  # pathfinder-full failed
  out = capsys.readouterr()
  assert "Failed runs: pathfinder-full" in out.err
  ours = [c.strip() for c in _row(out.out, "H-Transformer-1D (ours)")
          .strip("|").split("|")]
  assert ours[1] == "50.00 (gen.)" and ours[5] == "50.00 (gen.)"
  assert "unfinished" not in ours[5]
  full = [c.strip() for c in _row(out.out, "Transformer, full attention")
          .strip("|").split("|")]
  assert full[5] == "failed" and full[2] == "not run"
  if gpus:
    seen = {(root / f"{t}-{m}" / "log.txt").read_text().split()[0]
            for t in ("listops", "pathfinder") for m in rl.MODELS}
    assert seen == {"GPU=0", "GPU=1"}
  # Again: the finished runs are skipped, only the failed one runs.
  assert rl.main(argv) == 1
  out = capsys.readouterr().out
  assert out.count("finished earlier") == 3


def test_task_variant_runs_and_cells(tmp_path, capsys):
  """--task_variant: the task's runs use that variant (own workdirs), its
  cells name it; a smaller generated set than the config's is marked."""
  trainer = tmp_path / "trainer"
  trainer.write_text(FAKE_TRAINER.format(python=rl.sys.executable).replace(
      "sys.exit(3)", "pass"))
  trainer.chmod(0o755)
  root = tmp_path / "runs"
  assert rl.main(["--tasks=pathfinder", f"--workdir_root={root}",
                  "--task_variant=pathfinder=learned_pos", "--results_md=",
                  f"--python={trainer}"]) == 0
  out = capsys.readouterr().out
  assert "--config=configs/pathfinder.py:learned_pos" in out
  for model in rl.MODELS:
    assert (root / f"pathfinder-{model}-learned_pos" / "results.json").exists()
  assert not (root / "pathfinder-hierarchical").exists()
  ours = [c.strip() for c in _row(out, "H-Transformer-1D (ours)")
          .strip("|").split("|")]
  assert ours[5] == "50.00 (gen., :learned_pos)"
  # Without the flag the same root has no Pathfinder run (other workdirs).
  rl.main(["--collect_only", f"--workdir_root={root}", "--results_md="])
  out = capsys.readouterr().out
  assert _row(out, "H-Transformer-1D (ours)").split("|")[5].strip(
      ) == "not run"
  # A Path-X run on 40,000 generated images where the config has 200,000.
  _fake_run(str(root), "pathx", "hierarchical", 0.49)
  path = root / "pathx-hierarchical" / "results.json"
  r = json.loads(path.read_text())
  r.update(num_train_steps=15000, data={
      "data_dir": "/tmp/px", "generated": True, "generator": {
          "generator_version": pathfinder.GENERATOR_VERSION,
          "num_images": 40000}})
  path.write_text(json.dumps(r))
  entry = rl.collect(str(root / "pathx-hierarchical"), "pathx")
  assert rl._cell(entry) == "49.00 (gen., 40,000 images, 15,000 of 500,000 steps)"
  # quick and a task variant combine in one config argument and workdir.
  assert rl.join_variants("quick", "learned_pos") == "quick,learned_pos"
  assert rl.workdir_for("/r", "pathfinder", "full", "quick,learned_pos") == (
      "/r/pathfinder-full-quick-learned_pos")


@pytest.mark.parametrize("flag, message", [
    ("--task_variant=pathfinder=nope", "Unknown variant(s) ['nope']"),
    ("--task_variant=pathfinder=learned_pos,full", "leave the full"),
    ("--task_variant=learned_pos", "needs TASK=VARIANT"),
    ("--task_variant=cifar=x", "needs TASK=VARIANT"),
])
def test_task_variant_errors(flag, message):
  with pytest.raises(SystemExit) as e:
    rl.main(["--collect_only", flag, "--results_md="])
  assert message in str(e.value)


def test_runs_cut_short_are_unfinished_not_a_crash(tmp_path, capsys):
  """A run killed while writing: a torn last line of metrics.jsonl, or a
  results.json cut short. Collecting (and relaunching, which collects
  first) reads them as unfinished runs."""
  root = str(tmp_path / "runs")
  _fake_run(root, "listops", "hierarchical", 0.4, finished=False)
  d = os.path.join(root, "listops-hierarchical")
  json.dump({"task": "listops", "num_train_steps": 5000},
            open(os.path.join(d, "config.json"), "w"))
  with open(os.path.join(d, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 500, "train_loss": 1.7}) + "\n")
    f.write('{"step": 1000, "train_lo')
  _fake_run(root, "pathfinder", "full", 0.5)
  with open(os.path.join(root, "pathfinder-full", "results.json"), "w") as f:
    f.write('{"test_accuracy": 0.5, "test_lo')
  assert rl._cell(rl.collect(d, "listops")) == (
      "unfinished (500 of 5,000 steps)")
  assert rl.collect(os.path.join(root, "pathfinder-full"),
                    "pathfinder")["status"] == "unfinished"
  assert rl.main(["--collect_only", f"--workdir_root={root}",
                  "--results_md="]) == 0
  assert "unfinished (500 of 5,000 steps)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--set=model.blok_size=8"], "unknown config field 'model.blok_size'"),
    (["--set=model.block_size=abc"], "model.block_size takes an integer"),
    (["--tasks=listops,pathfinder", "--set=data.num_images=1000"],
     "(configs/listops.py): unknown config field 'data.num_images'"),
    (["--set=model.attention=full"], "leave model.attention out"),
    (["--tasks=text", "--data_dir=text=/no/such/aclImdb"],
     "--data_dir text=/no/such/aclImdb: no such folder"),
    (["--tasks=listops,retrieval"],
     "Retrieval reads the LRA release's files only"),
])
def test_bad_overrides_and_data_dirs_stop_before_any_run(tmp_path, flags,
                                                          message):
  """Each run would fail on its own (or, for model.attention, both rows
  would train one model): refused before anything runs."""
  trainer = tmp_path / "trainer"
  trainer.write_text(FAKE_TRAINER.format(python=rl.sys.executable))
  trainer.chmod(0o755)
  root = tmp_path / "runs"
  with pytest.raises(SystemExit) as e:
    rl.main([f"--workdir_root={root}", "--results_md=",
             f"--python={trainer}", *flags])
  assert message in str(e.value)
  assert not root.exists()
