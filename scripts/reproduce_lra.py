#!/usr/bin/env python
r"""Runs the Long Range Arena tasks and prints the paper's table beside ours.

  python scripts/reproduce_lra.py [--tasks=listops,text,retrieval,image,pathfinder,pathx]
      [--models=hierarchical,full] [--workdir_root=runs/lra] [--collect_only]
      [--variant=quick] [--task_variant=pathfinder=learned_pos ...]
      [--data_dir=text=PATH/aclImdb ...] [--set k=v ...]
      [--results_md=docs/results.md] [--gpus=0,1,2,3]

Defaults: every task, both models, ``runs/lra``, the full configs (hours
on GPUs), the table printed only.

For each chosen task and model it runs (one after another)
``python -m htransformer.main --config=configs/<task>.py --workdir=
WORKDIR_ROOT/<task>-<model> --config.model.attention=<model>`` (``full`` is
what each config's ``:full`` variant sets) (a run that was interrupted
resumes from its checkpoint; a finished one is not run again; stopped by
SIGTERM or Ctrl-C, the script passes SIGTERM on to its runs, which save
their step, and starts no more), then collects every finished
workdir (``results.json``; ``config.json`` for where the data came from)
into a markdown table: our hierarchical model, our full-attention baseline
and the paper's rows, test accuracy (%) of the final parameters, with the
average over the five tasks without Path-X. Tasks trained on generated data
(ListOps, Pathfinder and Path-X without a data_dir) are marked "gen.",
tasks not run "not run", unfinished runs "unfinished". ``--collect_only``
skips training. The table is printed, and with ``--results_md=FILE``
(``docs/results.md`` for the repository's table) also written to FILE as
the section "## LRA reproduction table" (replacing that section if
present, keeping every other section of the file); a table without one
finished run is not written there. A run that finished earlier with other
settings than this launch asks for (another ``--set`` value or data_dir)
is refused, naming them, before anything runs; with a higher
``num_train_steps`` it resumes and trains on. Runs that fail are marked
"failed".

``--gpus=0,1,2,3`` (or a count) runs the tasks concurrently, one per GPU
(each sees only its GPU; its console goes to the workdir's ``log.txt``).

``--variant=quick`` runs the ``:quick`` configs (CPU-sized; not comparable
to the paper) into WORKDIR_ROOT/<task>-<model>-quick. On 2 CPU cores each
hierarchical run takes a few minutes, but full attention at 1,024 and
16,384 pixel tokens is slow there: ~20 minutes for Pathfinder, ~40 for
Path-X (``--models=hierarchical`` leaves them out).

``--task_variant=TASK=VARIANT`` (repeatable) runs one task with a variant of
its config into WORKDIR_ROOT/<task>-<model>-<variant>, and its cells say so
(e.g. "65.77 (gen., :learned_pos)"). The LRA recipe as published leaves
Pathfinder at chance on generated images; learned positions make it learn
(docs/results.md), so the table in docs/results.md uses them, and ListOps's
``:long`` recipe. Training with those recipes (docs/runs/lra/README.md
says which runs were shortened, and how):

  python scripts/reproduce_lra.py --task_variant=pathfinder=learned_pos \
      --task_variant=listops=long

The table itself was written from the runs' records in docs/runs/lra/
(their commands and cards: docs/runs/lra/README.md):

  python scripts/reproduce_lra.py --collect_only --workdir_root=docs/runs/lra \
      --task_variant=pathfinder=learned_pos --task_variant=listops=long \
      --results_md=docs/results.md

``--set`` overrides and ``--data_dir`` folders are checked before anything
runs: a field the task's config lacks, a value of the wrong type, or a
data folder that is not there is refused with the reason.

A run on fewer generated images than its config asks for (a data_dir of a
smaller generated set) is marked "N images".
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from htransformer import config_utils  # noqa: E402  pylint: disable=g-import-not-at-top
from htransformer import launch  # noqa: E402  pylint: disable=g-import-not-at-top
from htransformer import metrics as metrics_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from htransformer.data import pathfinder  # noqa: E402  pylint: disable=g-import-not-at-top

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
AVG_TASKS = TASKS[:5]  # the LRA average leaves out Path-X
MODELS = ("hierarchical", "full")
TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval",
          "image": "Image", "pathfinder": "Pathfinder", "pathx": "Path-X"}
GENERATED_TASKS = ("listops", "pathfinder", "pathx")
SECTION = "## LRA reproduction table"

# Published test accuracy (%): H-Transformer-1D (Zhu & Soricut, 2021) and the
# LRA paper (Tay et al., 2021); None = "fail".
PAPER = [
    ("H-Transformer-1D (paper)",
     (49.53, 78.69, 63.99, 46.05, 68.78, None), 61.41),
    ("Transformer (LRA paper)",
     (36.37, 64.27, 57.46, 42.44, 71.40, None), 54.39),
    ("BigBird (LRA paper)", (36.05, 64.02, 59.29, 40.83, 74.87, None), 55.01),
    ("Performer (LRA paper)",
     (18.01, 65.40, 53.82, 42.77, 77.05, None), 51.41),
]
OUR_ROWS = {"hierarchical": "H-Transformer-1D{block} (ours)",
            "full": "Transformer, full attention (ours)"}


def workdir_for(root: str, task: str, model: str, variant: str = "") -> str:
  name = f"{task}-{model}" + (f"-{variant.replace(',', '-')}"
                              if variant else "")
  return os.path.join(root, name)


def join_variants(*variants: str) -> str:
  """``quick`` and a task's own variant as one config argument."""
  return ",".join(v for v in variants if v)


def config_spec(task: str, variant: str = "") -> str:
  spec = os.path.join("configs", f"{task}.py")
  return spec + (f":{variant}" if variant else "")


def run_command(python, task, model, workdir, variant="", data_dir="",
                sets=()) -> list[str]:
  """The training command; the full-attention baseline is the same config
  with ``model.attention=full`` (what every config's ``:full`` sets)."""
  cmd = [python, "-m", "htransformer.main",
         f"--config={config_spec(task, variant)}", f"--workdir={workdir}",
         f"--config.model.attention={model}"]
  if data_dir:
    cmd.append(f"--config.data_dir={data_dir}")
  cmd += [f"--config.{s}" for s in sets]
  return cmd


@functools.lru_cache(maxsize=None)
def task_config(task: str, variant: str = ""):
  """The task's config (None without a config file here); an unknown
  variant raises ValueError naming it."""
  try:
    return config_utils.load_config(
        os.path.join(ROOT, config_spec(task, variant)))
  except (OSError, ImportError):  # A task without a config file here.
    return None


def config_steps(task: str, variant: str = "") -> int | None:
  """num_train_steps of the task's config (the schedule the paper ran)."""
  config = task_config(task, variant)
  return None if config is None else int(config.num_train_steps)


def config_images(task: str, variant: str = "") -> int | None:
  """data.num_images of an image task's config (generated set's size)."""
  config = task_config(task, variant)
  data = None if config is None else config.get("data")
  return None if data is None else data.get("num_images")


def collect(workdir: str, task: str, variant: str = "",
            recipe: str = "") -> dict:
  """{status: finished|unfinished|not run, accuracy (%), generated, ...}.

  ``generated``: the data came from this repository's generators: what
  results.json's ``data`` record says (runs since it has one), else a
  generated task run without a data_dir. ``steps``: (run's, config's)
  num_train_steps when the run was shorter than its config; ``images``: the
  generated set's size when smaller than the config's; ``recipe``: the
  task's own variant (``--task_variant``), shown in its cell; ``done`` (an
  unfinished run): (last logged step, the run's num_train_steps).
  """
  cfg = metrics_lib.read_record(workdir, "config.json") or {}
  r = metrics_lib.read_record(workdir)
  if r is None or "test_accuracy" not in r:
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
      return {"status": "not run"}
    steps = [int(row["step"]) for row in metrics_lib.read_metrics(workdir)
             if isinstance(row.get("step"), int)]
    out = {"status": "unfinished"}
    if steps and cfg.get("num_train_steps"):
      out["done"] = (max(steps), int(cfg["num_train_steps"]))
    return out
  if isinstance(r.get("data"), dict) and "generated" in r["data"]:
    generated = bool(r["data"]["generated"])
  else:
    generated = task in GENERATED_TASKS and not cfg.get("data_dir")
  out = {"status": "finished", "accuracy": 100.0 * r["test_accuracy"],
         "generated": generated}
  block = (cfg.get("model") or {}).get("block_size")
  if block is not None:
    out["block_size"] = block
  if (generated and task in ("pathfinder", "pathx")
      and isinstance(r.get("data"), dict)):
    # Version-1 images (no version in the record) mostly hid their labels.
    gen = r["data"].get("generator") or {}
    version = int(gen.get("generator_version", 1))
    if version < pathfinder.GENERATOR_VERSION:
      out["superseded"] = version
    wanted = config_images(task, variant)
    if gen.get("num_images") and wanted and int(gen["num_images"]) < wanted:
      out["images"] = int(gen["num_images"])
  if recipe:
    out["recipe"] = recipe
  if "test_accuracy_best_eval" in r:
    out["accuracy_best_eval"] = 100.0 * r["test_accuracy_best_eval"]
  steps = r.get("num_train_steps", cfg.get("num_train_steps"))
  full = config_steps(task, variant)
  if steps is not None and full is not None and int(steps) < full:
    out["steps"] = (int(steps), full)
  return out


def other_settings(workdir: str, task: str, model: str, variant: str,
                   data_dir: str, sets) -> list[str] | None:
  """How the finished run in ``workdir`` differs from what this launch
  would run there, in the settings the launch gives (the attention, the
  data_dir, ``--set`` overrides): "field run's -> this launch's" for each;
  [] where only ``num_train_steps`` is higher (the run resumes and trains
  on); None where nothing differs."""
  import json  # pylint: disable=g-import-not-at-top
  config = task_config(task, variant)
  old = metrics_lib.read_record(workdir, "config.json")
  if config is None or old is None:
    return None
  overrides = [("model.attention", model)] + (
      [("data_dir", data_dir)] if data_dir else []) + [
          tuple(s.split("=", 1)) for s in sets]
  new = config_utils.with_overrides(config, overrides)
  old = config_utils.flatten(old)
  new = config_utils.flatten(json.loads(new.to_json_best_effort()))
  diffs, more_steps = [], False
  for key, _ in overrides:
    key = key.strip()
    was, now = old.get(key), new.get(key)
    if was is None or was == now:
      continue
    if key == "num_train_steps" and now > was:
      more_steps = True
    else:
      diffs.append(f"{key} {json.dumps(was)} -> {json.dumps(now)}")
  if diffs:
    return diffs
  return [] if more_steps else None


def _cell(entry: dict | None) -> str:
  if entry is None or entry["status"] == "not run":
    return "not run"
  if entry["status"] != "finished":
    if "done" in entry:
      return entry["status"] + " ({:,} of {:,} steps)".format(*entry["done"])
    return entry["status"]
  notes = ["gen."] if entry["generated"] else []
  if "superseded" in entry:
    notes[-1] = f"gen. v{entry['superseded']}, superseded"
  if "recipe" in entry:
    notes.append(f":{entry['recipe']}")
  if "images" in entry:
    notes.append(f"{entry['images']:,} images")
  if "steps" in entry:
    notes.append("{:,} of {:,} steps".format(*entry["steps"]))
  text = f"{entry['accuracy']:.2f}"
  return text + (f" ({', '.join(notes)})" if notes else "")


def table(entries: dict) -> str:
  """entries[(task, model)] -> collect() dict; returns the markdown table."""
  head = "| model | " + " | ".join(TITLES[t] for t in TASKS) + " | Avg |"
  lines = [head, "|" + "---|" * (len(TASKS) + 2)]
  for model in MODELS:
    row = [entries.get((t, model)) for t in TASKS]
    done = [e["accuracy"] for t, e in zip(TASKS, row)
            if t in AVG_TASKS and e and e["status"] == "finished"]
    if len(done) == len(AVG_TASKS):
      avg = f"{sum(done) / len(done):.2f}"
    else:
      avg = f"— ({len(done)}/{len(AVG_TASKS)} tasks)"
    # The block size where every finished run used the same one.
    blocks = {e["block_size"] for e in row
              if e and e["status"] == "finished" and "block_size" in e}
    label = OUR_ROWS[model].format(
        block=f", block {blocks.pop()}" if len(blocks) == 1 else "")
    lines.append(f"| {label} | "
                 + " | ".join(_cell(e) for e in row) + f" | {avg} |")
  for name, accs, avg in PAPER:
    cells = ["fail" if a is None else f"{a:.2f}" for a in accs]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg:.2f} |")
  return "\n".join(lines)


def section(entries: dict, workdir_root: str, variant: str = "") -> str:
  notes = [
      SECTION, "",
      f"Written by `scripts/reproduce_lra.py` from the finished runs under "
      f"`{workdir_root}`" + (f" (`:{variant}` configs: CPU-sized, not "
                             "comparable to the paper)" if variant else "")
      + ". Test accuracy (%) with the final parameters; the average is over "
      "the five tasks without Path-X. \"gen.\": trained and tested on data "
      "generated by this repository (ListOps, Pathfinder, Path-X "
      "generators, seeds in the configs), not the LRA release. "
      "\":variant\": trained with that variant of the task's config "
      "(`--task_variant`). \"N images\": on N generated images, fewer "
      "than the config's. \"N of M "
      "steps\": trained for N steps instead of the config's M (a shortened "
      "schedule). \"gen. vN, superseded\": Pathfinder or Path-X images of "
      "an older generator version (version 1 let different snakes touch, so "
      "most label-0 images looked connected; version 2 drew snakes as "
      "bright as the markers, which no network found): rerun on the "
      "current one. "
      "\"not run\": no finished run of that task.", "",
      table(entries), ""]
  best = [(t, m, e) for (t, m), e in sorted(entries.items())
          if e.get("status") == "finished" and "accuracy_best_eval" in e]
  if best:
    notes.append("Test accuracy with the best-on-validation parameters: "
                 + "; ".join(f"{TITLES[t]} {m} {e['accuracy_best_eval']:.2f}"
                             for t, m, e in best) + ".")
    notes.append("")
  return "\n".join(notes)


def write_section(path: str, text: str) -> None:
  """Replaces (or appends) the SECTION of a markdown file, keeping the rest."""
  old = open(path).read() if os.path.isfile(path) else "# Results\n"
  lines = old.splitlines()
  start = next((i for i, l in enumerate(lines) if l.strip() == SECTION), None)
  if start is None:
    new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
  else:
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("## ")), len(lines))
    before = "\n".join(lines[:start]).rstrip("\n")
    after = "\n".join(lines[end:])
    new = (before + "\n\n" if before else "") + text.rstrip("\n") + "\n"
    if after:
      new += "\n" + after.rstrip("\n") + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(new)


def _split_list(text: str, allowed, what: str) -> list[str]:
  items = [t.strip() for t in text.split(",") if t.strip()]
  bad = [t for t in items if t not in allowed]
  if bad:
    raise SystemExit(f"Unknown {what}: {bad}; choose from {list(allowed)}.")
  return items


def _task_items(items, flag: str, what: str) -> dict:
  """["TASK=VALUE", ...] -> {TASK: VALUE}; a bad item is named."""
  out = {}
  for item in items:
    task, sep, value = item.partition("=")
    if not sep or task not in TASKS or not value:
      raise SystemExit(f"{flag} needs TASK={what} with TASK in {TASKS}, "
                       f"got {item!r}.")
    out[task] = value
  return out


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--tasks", default=",".join(TASKS),
                 help="comma-separated tasks")
  p.add_argument("--models", default=",".join(MODELS),
                 help="comma-separated models")
  p.add_argument("--workdir_root", default="runs/lra",
                 help="one workdir per task and model below it")
  p.add_argument("--collect_only", action="store_true",
                 help="train nothing: table the finished runs")
  p.add_argument("--variant", default="", choices=["", "quick"],
                 help="quick: the CPU-sized :quick configs")
  p.add_argument("--task_variant", action="append", default=[],
                 metavar="TASK=VARIANT",
                 help="a variant of one task's config (repeatable).")
  p.add_argument("--data_dir", action="append", default=[],
                 metavar="TASK=PATH", help="data_dir of a task (repeatable).")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a config override for every run (repeatable).")
  p.add_argument("--results_md", default="",
                 help="markdown file the table is also written to (its own "
                 "section), relative to the repository root unless "
                 "absolute, e.g. docs/results.md; default: printed only.")
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--gpus", default="",
                 help="run one task per GPU at a time, e.g. 0,1,2,3 or 4 "
                 "(console of each run in its workdir's log.txt)")
  args = p.parse_args(argv)
  if args.gpus:
    try:
      args.gpus = launch.parse_gpus(args.gpus)
    except ValueError as e:
      p.error(str(e))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  tasks = _split_list(args.tasks, TASKS, "task")
  models = _split_list(args.models, MODELS, "model")
  data_dirs = {task: os.path.abspath(path) for task, path in
               _task_items(args.data_dir, "--data_dir", "PATH").items()}
  recipes = _task_items(args.task_variant, "--task_variant", "VARIANT")
  variants = {t: join_variants(args.variant, recipes.get(t, ""))
              for t in TASKS}
  for task, recipe in recipes.items():
    if any(v.endswith("full") for v in recipe.split(",")):
      raise SystemExit(f"--task_variant {task}={recipe}: the table runs "
                       "every task with both attentions itself; leave the "
                       "full-attention variants out.")
    try:
      task_config(task, variants[task])
    except ValueError as e:
      raise SystemExit(f"--task_variant {task}={recipe}: {e}") from e
  if not args.collect_only:
    for s in args.set:
      key, sep, text = s.partition("=")
      if not sep:
        raise SystemExit(f"--set {s}: not FIELD=VALUE.")
      if key.strip() == "model.attention":
        raise SystemExit(f"--set {s}: the table runs every task with both "
                         "attentions itself; leave model.attention out.")
      for task in tasks:
        config = task_config(task, variants[task])
        problem = config and config_utils.override_problem(
            config, key.strip(), text)
        if problem:
          raise SystemExit(f"--set {s} (configs/{task}.py): {problem}")
    for task in tasks:
      if task in data_dirs and not os.path.isdir(data_dirs[task]):
        raise SystemExit(f"--data_dir {task}={data_dirs[task]}: no such "
                         "folder.")
    # Data that cannot be there, found now rather than when the task's turn
    # comes after hours of the others.
    if "retrieval" in tasks and "retrieval" not in data_dirs:
      raise SystemExit("Retrieval reads the LRA release's files only: give "
                       "--data_dir retrieval=PATH (its tsv_data/), or leave "
                       "it out of --tasks.")
    from_tfds = [t for t in ("text", "image") if t in tasks
                 and t not in data_dirs]
    if from_tfds and importlib.util.find_spec("tensorflow_datasets") is None:
      raise SystemExit(
          f"{', '.join(from_tfds)} without --data_dir read a prepared "
          "tensorflow_datasets copy, and tensorflow_datasets is not "
          "installed: give --data_dir TASK=PATH (aclImdb/, "
          "cifar-10-batches-py/), install and prepare it, or leave them "
          "out of --tasks.")
  root = os.path.abspath(args.workdir_root)
  if args.collect_only and not os.path.isdir(root):
    raise SystemExit(f"--workdir_root {args.workdir_root}: no such folder, "
                     "so no runs to collect.")
  failed = []
  if not args.collect_only:
    env = launch.env_with_path(ROOT)
    jobs, refused = [], []
    for task in tasks:
      for model in models:
        workdir = workdir_for(root, task, model, variants[task])
        if collect(workdir, task, variants[task])["status"] == "finished":
          other = other_settings(workdir, task, model, variants[task],
                                 data_dirs.get(task, ""), args.set)
          if other is None:
            print(f"[{task} {model}] finished earlier: {workdir}",
                  flush=True)
            continue
          if other:
            refused.append(f"{workdir} ({', '.join(other)})")
            continue
        cmd = run_command(args.python, task, model, workdir, variants[task],
                          data_dirs.get(task, ""), args.set)
        jobs.append((f"{task}-{model}", cmd,
                     os.path.join(workdir, "log.txt")))
    if refused:
      raise SystemExit(
          "These runs finished earlier with other settings than this launch "
          "asks for (the run's -> this launch's): " + "; ".join(refused)
          + ". Use another --workdir_root, or move those folders away to "
          "run them again.")
    show = lambda name, cmd: print(
        f"[{name}] " + " ".join(map(shlex.quote, cmd)), flush=True)
    if args.gpus:
      for name, cmd, _ in jobs:
        show(name, cmd)
      failed = launch.run_on_gpus(jobs, args.gpus, env, cwd=ROOT)
    else:
      for name, cmd, _ in jobs:
        show(name, cmd)
      failed = launch.run_in_turn([(name, cmd) for name, cmd, _ in jobs],
                                  env, cwd=ROOT)
  entries = {(t, m): collect(workdir_for(root, t, m, variants[t]), t,
                             variants[t], recipes.get(t, ""))
             for t in TASKS for m in MODELS}
  for name in failed:
    task, model = name.split("-", 1)
    if entries[(task, model)]["status"] != "finished":
      entries[(task, model)] = {"status": "failed"}
  text = section(entries, args.workdir_root, args.variant)
  print(text)
  if args.results_md:
    results_md = os.path.join(ROOT, args.results_md)  # absolute: as given
    if not any(e["status"] == "finished" for e in entries.values()):
      print(f"Not written to {results_md}: no run under {root} has "
            "finished, and the table would replace its section with "
            "\"not run\".", file=sys.stderr)
    else:
      write_section(results_md, text)
      print(f"Wrote the table to {results_md}.", file=sys.stderr)
  if failed:
    print(f"Failed runs: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
