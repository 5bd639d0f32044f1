#!/usr/bin/env python
"""Plots the results of scripts/benchmark_attention.py.

Draws time against sequence length, log-log, one line per method. Full
attention lengths that were skipped as too slow are drawn dashed from their
L^2 estimate. Needs matplotlib (the benchmark itself does not).

  python scripts/plot_benchmark.py --json docs/benchmark_attention.json \\
      --out docs/benchmark_attention.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

LABELS = {"full_cudnn": "full, cuDNN", "full_xla": "full, XLA dense"}
PHASE_NAMES = {"fwd": "forward", "fwd_bwd": "forward+backward"}


def method_label(name: str) -> str:
  if name.startswith("hierarchical_"):
    kind = ", fused kernels" if name.endswith("_pallas") else ", XLA"
    return f"hierarchical, block {name.split('_')[1]}{kind}"
  return LABELS.get(name, name)


def format_length(length: float, _=None) -> str:
  length = int(length)
  if length >= 2**20 and length % 2**20 == 0:
    return f"{length // 2**20}M"
  if length >= 1024 and length % 1024 == 0:
    return f"{length // 1024}K"
  return str(length)


def title(cfg: dict, env: dict, phase: str) -> str:
  """The plot's title: what was timed, where, with which settings."""
  causal = "causal" if cfg["causal"] else "non-causal"
  dropout = (f", attention dropout {cfg['dropout_rate']} (not cuDNN)"
             if cfg.get("dropout_rate") else "")
  return (f"Attention {PHASE_NAMES[phase]} time on {env['device_kind']}\n"
          f"{cfg['dtype']}, heads {cfg['heads']}, head_dim "
          f"{cfg['head_dim']}, {causal}{dropout}, jax {env['jax_version']}")


def plot(report: dict, phase: str, out: str) -> None:
  cfg, env = report["config"], report["environment"]
  fig, ax = plt.subplots(figsize=(7, 5))
  for method in cfg["methods"]:
    results = sorted((r for r in report["results"] if r["method"] == method),
                     key=lambda r: r["length"])
    measured = [(r["length"], r[phase]["median_ms"]) for r in results
                if r[phase].get("median_ms") is not None]
    estimated = [(r["length"], r[phase]["estimated_ms"]) for r in results
                 if r[phase].get("estimated_ms") is not None]
    if not measured:
      continue
    line, = ax.plot(*zip(*measured), marker="o", label=method_label(method))
    if estimated:  # continue the measured line, dashed
      ax.plot(*zip(*([measured[-1]] + estimated)), linestyle="--",
              marker="o", markerfacecolor="none", color=line.get_color(),
              label=f"{method_label(method)} (estimated, L² scaling)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(cfg["lengths"])
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(format_length))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel(f"sequence length (batch = max(1, {cfg['tokens']:,} // "
                "length))")
  ax.set_ylabel(f"{PHASE_NAMES[phase]} time (ms, median)")
  ax.set_title(title(cfg, env, phase), fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=150)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", required=True,
                      help="results of scripts/benchmark_attention.py "
                      "(--out_json), e.g. docs/benchmark_attention.json")
  parser.add_argument("--out",
                      help="image to write (default: the JSON's name with "
                      ".png)")
  parser.add_argument("--phase", choices=sorted(PHASE_NAMES),
                      default="fwd_bwd", help="which time to plot")
  args = parser.parse_args()
  try:
    with open(args.json) as f:
      report = json.load(f)
  except OSError as e:
    sys.exit(f"Error: --json {args.json}: {e.strerror or e}.")
  except ValueError as e:
    sys.exit(f"Error: --json {args.json} is not JSON ({e}).")
  keys = ("config", "environment", "results")
  if not isinstance(report, dict) or not all(k in report for k in keys):
    sys.exit(f"Error: --json {args.json} is not a report of "
             f"scripts/benchmark_attention.py (it has {', '.join(keys)}).")
  out = args.out or os.path.splitext(args.json)[0] + ".png"
  if not any(r.get(args.phase, {}).get("median_ms") is not None
             for r in report["results"]):
    sys.exit(f"Error: --json {args.json} holds no measured {args.phase} "
             "time to plot (every row skipped or failed).")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    sys.exit(f"Error: --out {out}: no folder {folder}.")
  plot(report, args.phase, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
