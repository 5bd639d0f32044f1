"""scripts/lm_compare.sh's paths and data download, with a stand-in for
Python that records its calls and writes the runs' files."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.scripts_helper import ROOT

# Stands in for python: records each call; "-m htransformer.main" writes
# the run's files in its --workdir; anything else (the table) runs in
# Python.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [ "$1" = -m ]; then
  for arg in "$@"; do
    case $arg in --workdir=*) workdir=${arg#--workdir=} ;; esac
  done
  mkdir -p "$workdir"
  echo '{}' > "$workdir/config.json"
  : > "$workdir/metrics.jsonl"
  echo '%s' > "$workdir/results.json"
elif [ "$1" = - ]; then
  exec %s "$@"
fi
"""
RESULTS = {"test_perplexity": 2.0, "test_perplexity_best_eval": 2.0,
           "best_eval_perplexity": 2.0, "best_eval_step": 1,
           "test_tokens": 8, "steps_per_sec": 1.0, "tokens_per_sec": 8.0,
           "total_parameters": 1}


@pytest.mark.parametrize("own_text", [False, True])
def test_relative_paths_are_the_callers_and_own_text_is_not_fetched(
    tmp_path, own_text):
  """ROOT, COPY_TO and text_files globs given relative are the caller's
  folder's, not the repository's; the BBC text is fetched only for the
  config's own text_files."""
  repo = tmp_path / "repo"
  (repo / "scripts").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "scripts", "lm_compare.sh"),
              repo / "scripts")
  fake = tmp_path / "python"
  fake.write_text(FAKE_PYTHON % (json.dumps(RESULTS), sys.executable))
  fake.chmod(0o755)
  caller = tmp_path / "caller"
  caller.mkdir()
  calls = tmp_path / "calls"
  args = [] if own_text else [
      "--config.data.text_files=corpus/*.txt,/abs/*.md,~/t/*.txt"]
  subprocess.run(
      ["bash", str(repo / "scripts" / "lm_compare.sh"), "out"] + args,
      cwd=caller, check=True, capture_output=True, text=True,
      env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls),
           "COPY_TO": "copy"})
  assert (caller / "out" / "compare.md").exists()
  assert (caller / "out" / "full" / "results.json").exists()
  assert (caller / "copy" / "compare.md").exists()
  assert (caller / "copy" / "hierarchical" / "results.json").exists()
  assert not (repo / "out").exists() and not (repo / "copy").exists()
  fetched = [c for c in calls.read_text().splitlines()
             if "prepare_text_corpus.py" in c]
  assert fetched == (["scripts/prepare_text_corpus.py "
                      "--output_dir=data/bbc_news"] if own_text else [])
  runs = [c for c in calls.read_text().splitlines()
          if c.startswith("-m htransformer.main")]
  assert len(runs) == 2
  for run in runs:
    assert ("--config.data.text_files=" in run) == (not own_text)
    if not own_text:
      assert run.endswith(f"--config.data.text_files={caller}/corpus/*.txt,"
                          "/abs/*.md,~/t/*.txt")
