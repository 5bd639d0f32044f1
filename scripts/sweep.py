#!/usr/bin/env python
r"""Hyperparameter sweeps: a grid of training runs and one table of results.

  python scripts/sweep.py --config=configs/listops.py \
      --sweep="model.block_size=8,16,32;optimizer.learning_rate=0.05,0.1" \
      --workdir=runs/sweep [--launch=local|print|collect] [--set k=v ...]

``--sweep`` is ``;``-separated ``field=v1,v2,...`` axes; the grid is their
product. Values are read as int, float, bool (true/false) or string. Each
run gets ``WORKDIR/<name>`` with a name like
``model.block_size=8,optimizer.learning_rate=0.05`` and is an ordinary
``python -m htransformer.main --config=... --workdir=... --config.k=v ...``
job; ``--set k=v`` (repeatable) adds the same override to every run.

``--launch``:
  local    run the grid here, one run after another (a run that was
           interrupted resumes from its checkpoint when launched again);
           with ``--gpus=0,1,2,3`` (or ``--gpus=4``) one run per GPU at a
           time, each seeing only its GPU, its console in
           ``WORKDIR/<name>/log.txt`` (runs that generate the same data
           wait for the first one's copy);
  print    print one command per line (stdout) for a cluster launcher;
  collect  only gather the results.
Stopped (SIGTERM, Ctrl-C), ``local`` passes SIGTERM on to the runs it
started (each saves its step and exits) and starts no more
(``htransformer.launch``); the same command again resumes.

Every mode then gathers the runs' ``metrics.jsonl`` into a markdown table
(best eval accuracy and its step, final test accuracy, test accuracy with
the best-eval parameters, steps/s; perplexity instead of accuracy for
language models, the best being the lowest), printed (to stderr with
``print``) and written to ``WORKDIR/sweep.md``. Without ``--sweep``,
``collect`` gathers every run directory under WORKDIR (which must exist).

Before anything runs, every swept value and ``--set`` override is checked
against the config: an unknown field, a group of fields or a value of the
wrong type (``model.block_size=abc``) is refused, and so is a grid with two
points of the same name (``8,08``: one workdir for two runs); then each
run's whole config is checked as training would check it (a block size of
7, an unknown attention, a batch of 0), so no run fails after others have
trained. With ``local``, a run that finished earlier with the same settings
is not launched again. The table names the best run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from htransformer import config_utils  # noqa: E402
from htransformer import launch  # noqa: E402
from htransformer import metrics as metrics_lib  # noqa: E402

LAUNCH = ("local", "print", "collect")


def parse_value(text: str):
  """'8' -> 8, '0.05' -> 0.05, 'true' -> True, anything else -> the string."""
  text = text.strip()
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_sweep(spec: str) -> list[tuple[str, list]]:
  """'a.b=1,2;c=x' -> [('a.b', [1, 2]), ('c', ['x'])]."""
  axes = []
  for part in spec.split(";"):
    if not part.strip():
      continue
    key, eq, values = part.partition("=")
    key = key.strip()
    if not eq or not key:
      raise ValueError(f"sweep axis {part.strip()!r} is not field=v1,v2,...")
    vals = [parse_value(v) for v in values.split(",") if v.strip()]
    if not vals:
      raise ValueError(f"sweep axis {key!r} has no values.")
    if key in [k for k, _ in axes]:
      raise ValueError(f"sweep axis {key!r} appears twice.")
    axes.append((key, vals))
  if not axes:
    raise ValueError(f"empty sweep {spec!r}: use field=v1,v2;field=v1,...")
  return axes


def grid(axes) -> list[dict]:
  """All combinations, the last axis varying fastest."""
  keys = [k for k, _ in axes]
  return [dict(zip(keys, combo))
          for combo in itertools.product(*[v for _, v in axes])]


def format_value(v) -> str:
  return repr(v) if isinstance(v, float) else str(v)


def run_name(point: dict) -> str:
  return ",".join(f"{k}={format_value(v)}" for k, v in point.items()
                  ).replace(os.sep, "_")


def run_command(python, config, workdir, point, sets=()) -> list[str]:
  return [python, "-m", "htransformer.main", f"--config={config}",
          f"--workdir={workdir}", *[f"--config.{s}" for s in sets],
          *[f"--config.{k}={format_value(v)}" for k, v in point.items()]]


def check_overrides(config, overrides):
  """Raises ValueError naming the first ``(field, value text)`` that the
  runs would refuse: an unknown field, a group of fields, or a value the
  field's type does not read (``--config.FIELD=TEXT`` as main.py reads it)."""
  for key, text in overrides:
    problem = config_utils.override_problem(config, key, text)
    if problem:
      raise ValueError(problem)


def run_configs(config_spec: str, points, sets) -> list:
  """Each point's whole config (``--set`` overrides and the point's values
  applied as main.py applies them), checked as training checks it:
  ValueError naming the first run and setting no run could use."""
  from htransformer import train  # pylint: disable=g-import-not-at-top
  base = config_utils.load_config(config_spec)
  configs = []
  for point in points:
    overrides = [tuple(s.split("=", 1)) for s in sets] + [
        (k, format_value(v)) for k, v in point.items()]
    config = config_utils.with_overrides(base, overrides)
    try:
      train.check_settings(config)
    except ValueError as e:
      raise ValueError(f"run {run_name(point)}: {e}") from None
    configs.append(config)
  return configs


def finished_earlier(config, workdir: str) -> bool:
  """``workdir`` holds a run that finished (results.json) with these
  settings (how often it logged, evaluated or checkpointed aside)."""
  from htransformer import train  # pylint: disable=g-import-not-at-top
  if "test_loss" not in (metrics_lib.read_record(workdir) or {}):
    return False
  free = tuple(f for f in train.RESUME_FREE_FIELDS if f != "num_train_steps")
  return train.config_changes(config, workdir, free) == []


def check_names(names):
  """Raises ValueError if two points of the grid share a run directory."""
  seen = set()
  for name in names:
    if name in seen:
      raise ValueError(f"two points of the grid are both run {name!r} (one "
                       "workdir): give each value once.")
    seen.add(name)


def _absolute_config(spec: str) -> str:
  path, colon, arg = spec.partition(":")
  return os.path.abspath(path) + colon + arg


# ----------------------------------------------------------------------------
# Results.


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_rows(workdir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl that carry a step (a line cut short
  by a kill is left out)."""
  return [r for r in metrics_lib.read_metrics(workdir)
          if _is_number(r.get("step"))]


def summarize(workdir: str, metric: str | None = None) -> dict:
  """The numbers of one run from its metrics.jsonl (and results.json).

  ``metric`` picks the best evaluation, as in training: the highest
  ``eval_accuracy`` ("accuracy", a classifier) or the lowest
  ``eval_perplexity`` ("perplexity", a language model); None: the latter
  if the run logged a perplexity.
  """
  rows = read_rows(workdir)
  if metric is None:
    metric = ("perplexity" if any("eval_perplexity" in r for r in rows)
              else "accuracy")
  sign = 1 if metric == "accuracy" else -1
  key = f"eval_{metric}"
  evals = [r for r in rows if _is_number(r.get(key))]
  best = max(evals, key=lambda r: (sign * r[key], -r["step"]), default=None)
  last = lambda k: next((r[k] for r in reversed(rows) if k in r), None)
  rates = [r["steps_per_sec"] for r in rows
           if _is_number(r.get("steps_per_sec"))]
  steps_per_sec = (metrics_lib.read_record(workdir) or {}).get(
      "steps_per_sec")
  if steps_per_sec is None and rates:
    # The first rate may include compilation (runs logged before the clock
    # started after the first step, or a first step logged itself).
    steps_per_sec = statistics.median(rates[1:] or rates)
  return {"has_metrics": bool(rows), "metric": metric,
          "best_eval": best and best[key],
          "best_eval_step": best and best["step"],
          "test": last(f"test_{metric}"),
          "test_best_eval": last(f"test_{metric}_best_eval"),
          "steps_per_sec": steps_per_sec}


def _cell(v, fmt="{:.4f}"):
  return "-" if v is None or isinstance(v, str) else fmt.format(v)


def table(names: list[str], sweep_dir: str, failed=()) -> str:
  """The markdown table of the runs ``names`` (``failed``: those whose
  process failed in this launch), accuracy or, when the runs are language
  models, perplexity, then a line naming the best run by its best
  evaluation."""
  dirs = [os.path.join(sweep_dir, name) for name in names]
  summaries = [summarize(d) for d in dirs]
  metric = ("perplexity" if any(s["metric"] == "perplexity"
                                for s in summaries) else "accuracy")
  summaries = [summarize(d, metric) for d in dirs]
  lines = [f"| run | best eval {metric} (step) | final test {metric} | "
           f"test {metric} (best-eval params) | steps/s |",
           "|---|---|---|---|---|"]
  for name, s in zip(names, summaries):
    best = (f"{s['best_eval']:.4f} ({s['best_eval_step']})"
            if s["best_eval"] is not None else "-")
    label = (f"{name} (failed)" if name in failed else
             name if s["has_metrics"] else f"{name} (no metrics)")
    lines.append(f"| {label} | {best} | {_cell(s['test'])} | "
                 f"{_cell(s['test_best_eval'])} | "
                 f"{_cell(s['steps_per_sec'], '{:.2f}')} |")
  sign = 1 if metric == "accuracy" else -1
  ranked = [(sign * s["best_eval"], name, s) for name, s in
            zip(names, summaries) if s["best_eval"] is not None]
  if ranked:
    _, name, s = max(ranked, key=lambda r: r[0])
    lines += ["", f"Best: {name} (eval {metric} {s['best_eval']:.4f} at step "
              f"{s['best_eval_step']}; {os.path.join(sweep_dir, name)})."]
  return "\n".join(lines)


def run_dirs(sweep_dir: str) -> list[str]:
  """Subdirectories of ``sweep_dir`` holding a metrics.jsonl."""
  if not os.path.isdir(sweep_dir):
    return []
  return sorted(d for d in os.listdir(sweep_dir)
                if os.path.exists(os.path.join(sweep_dir, d, "metrics.jsonl")))


# ----------------------------------------------------------------------------


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="config file[:variant], as for main.py")
  p.add_argument("--sweep", help='e.g. "model.block_size=8,16;'
                 'optimizer.learning_rate=0.05,0.1"')
  p.add_argument("--workdir", required=True, help="one subdirectory per run")
  p.add_argument("--launch", choices=LAUNCH, default="local")
  p.add_argument("--set", action="append", default=[], metavar="K=V",
                 help="an override for every run (repeatable)")
  p.add_argument("--gpus", default="",
                 help="with --launch=local: run one run per GPU at a time, "
                 "e.g. 0,1,2,3 or 4 (each run sees only its GPU through "
                 "CUDA_VISIBLE_DEVICES; its console goes to "
                 "WORKDIR/<name>/log.txt)")
  p.add_argument("--python", default=sys.executable,
                 help="interpreter of the runs (default: this one)")
  args = p.parse_args(argv)
  if args.launch != "collect" and not (args.config and args.sweep):
    p.error(f"--launch={args.launch} needs --config and --sweep.")
  if args.gpus:
    if args.launch != "local":
      p.error("--gpus goes with --launch=local.")
    try:
      args.gpus = launch.parse_gpus(args.gpus)
    except ValueError as e:
      p.error(str(e))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  sweep_dir = os.path.abspath(args.workdir)
  names, commands, done = None, [], []
  try:
    if args.sweep:
      axes = parse_sweep(args.sweep)
      sets = [s.strip() for s in args.set]
      for s in sets:
        if "=" not in s:
          raise ValueError(f"--set {s!r} is not field=value.")
      set_keys = [s.split("=", 1)[0] for s in sets]
      both = sorted(set(set_keys) & {k for k, _ in axes})
      if both:
        raise ValueError(f"{both} both swept and set with --set.")
      if args.config:
        check_overrides(
            config_utils.load_config(args.config),
            [(k, format_value(v)) for k, vals in axes for v in vals]
            + [tuple(s.split("=", 1)) for s in sets])
      points = grid(axes)
      names = [run_name(p) for p in points]
      check_names(names)
      if args.config:
        configs = run_configs(args.config, points, sets)
        commands = [run_command(args.python, _absolute_config(args.config),
                                os.path.join(sweep_dir, n), p, sets)
                    for n, p in zip(names, points)]
        if args.launch == "local":
          done = [finished_earlier(c, os.path.join(sweep_dir, n))
                  for n, c in zip(names, configs)]
    if args.launch == "collect":
      if not os.path.isdir(sweep_dir):
        raise ValueError(f"--workdir {args.workdir}: no such folder, so no "
                         "runs to collect.")
    else:
      try:
        config_utils.make_workdir(args.workdir)
      except ValueError as e:
        raise ValueError(f"--workdir {args.workdir}: {e}.") from None
  except (ValueError, OSError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2

  failed = []
  if args.launch == "print":
    for cmd in commands:
      print(shlex.join(cmd))
  elif args.launch == "local":
    env = launch.env_with_path(ROOT)
    todo = []
    for n, c, finished in zip(names, commands, done):
      if finished:
        print(f"[{n}] finished earlier with these settings: "
              f"{os.path.join(sweep_dir, n)}", flush=True)
      else:
        todo.append((n, c))
    if args.gpus:
      failed = launch.run_on_gpus(
          [(n, c, os.path.join(sweep_dir, n, "log.txt")) for n, c in todo],
          args.gpus, env, cwd=ROOT)
    else:
      failed = launch.run_in_turn(todo, env, cwd=ROOT)

  if names is None:
    names = run_dirs(sweep_dir)
    if not names:
      print(f"No runs under {sweep_dir} (no folder with a metrics.jsonl).",
            file=sys.stderr)
  md = table(names, sweep_dir, failed)
  md_path = os.path.join(sweep_dir, "sweep.md")
  with open(md_path, "w") as f:
    if args.sweep:
      f.write(f"Sweep `{args.sweep}` of `{args.config}`"
              + "".join(f", `--set {s}`" for s in args.set) + "\n\n")
    f.write(md + "\n")
  out = sys.stderr if args.launch == "print" else sys.stdout
  print(md, file=out, flush=True)
  print(f"Table written to {md_path}.", file=out, flush=True)
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
