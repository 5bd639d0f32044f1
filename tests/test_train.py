"""The ListOps training job: configs, steps, checkpoints, resume, errors."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import listops as listops_config
from htransformer import config_utils
from htransformer import input_pipeline
from htransformer import metrics as metrics_lib
from htransformer import models
from htransformer import optim
from htransformer import tasks
from htransformer import train
from htransformer.attention import full_attention, hierarchical_attention
from tests.scripts_helper import ROOT, child_env


def tiny_config(data_dir, **overrides):
  c = listops_config.get_config("quick")
  c.data_dir = data_dir
  c.max_length = 40
  c.model.update(num_layers=1, emb_dim=32, qkv_dim=32, mlp_dim=32,
                 num_heads=2, block_size=4)
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_train_steps = 12
  c.log_every = 4
  c.eval_every = 6
  c.checkpoint_every = 4
  c.optimizer.warmup_steps = 4
  config_utils.set_fields(c, **overrides)
  return c


def run_main(args, timeout=600, optimised=False):
  """``python -m htransformer.main ARGS`` in a CPU process; ``optimised``:
  with XLA's default code optimisation, for runs of many steps (the suite
  turns it off, tests/conftest.py)."""
  env = child_env(optimised=optimised, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "htransformer.main", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def saved_params(workdir):
  """The parameters of the latest checkpoint, as numpy arrays."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data"))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return step, jax.tree.map(np.asarray, state["params"])


@pytest.mark.parametrize("variant",
                         ["", "full", "quick", "long", "long_full"])
def test_configs_load(variant):
  c = listops_config.get_config(variant)
  assert c.task == "listops"
  assert c.model.attention == ("full" if variant.endswith("full") else
                               "hierarchical")
  if variant.startswith("long"):
    assert (c.optimizer.learning_rate, c.num_train_steps) == (0.005, 20000)
  if not variant:
    assert (c.model.num_layers, c.model.num_heads, c.model.emb_dim,
            c.model.mlp_dim, c.batch_size, c.num_train_steps,
            c.max_length) == (4, 8, 512, 1024, 32, 5000, 2000)
    assert c.model.block_size == 16 and c.model.pool == "CLS"


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="nope"):
    listops_config.get_config("nope")
  with pytest.raises(ValueError, match="'long' and 'quick'.*give one"):
    listops_config.get_config("quick,long")


def test_variants_combine():
  """Variants join with commas, as in the other configs; long_full is
  long and full."""
  quick, quick_full = (listops_config.get_config(v)
                       for v in ("quick", "full,quick"))
  assert quick_full.model.attention == "full"
  quick_full.model.attention = quick.model.attention
  assert quick_full == quick
  assert listops_config.get_config("long_full") == (
      listops_config.get_config("long,full"))


# A module called under jit: one compilation per shape, not one per
# operation.
_call = nnx.jit(lambda model, x: model(x))


def test_train_step_reduces_loss(tiny_data):
  c = tiny_config(tiny_data)
  task = tasks.get_task(c)
  model = train.build_model(c, task)
  graphdef, params = nnx.split(model, nnx.Param)
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.adam(3e-3)
  step_fn, eval_fn = train.make_steps(graphdef, tx, seed=0)
  step_fn = jax.jit(step_fn)
  batch = {k: np.stack([task.sources["train"][i][k] for i in range(16)])
           for k in ("inputs", "targets")}
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(params)}
  losses = []
  for _ in range(30):
    state, sums = step_fn(state, batch)
    losses.append(float(sums["loss"] / sums["count"]))
  assert int(state["step"]) == 30
  assert losses[-1] < 0.5 * losses[0], losses
  ev = jax.jit(eval_fn)(state["params"],
                       {**batch, "weights": np.ones(16, np.float32)})
  assert float(ev["count"]) == 16


def test_evaluating_an_empty_split_is_a_clear_error(tiny_data):
  c = tiny_config(tiny_data)
  task = tasks.get_task(c)
  graphdef, params = nnx.split(train.build_model(c, task), nnx.Param)
  import optax  # pylint: disable=g-import-not-at-top
  task = dataclasses.replace(task, sources={**task.sources, "val": []})
  trainer = train.Trainer(c, task, graphdef, params, optax.adam(1e-3))
  with pytest.raises(ValueError, match="'val' split has no examples"):
    trainer.evaluate(params, "val")


def test_evaluation_weighs_every_example_once(tiny_data):
  """The validation loss and accuracy are means over the split's examples,
  with the model's dropout off (0.5 here): the last, partial batch (64 =
  24 + 24 + 16) counts its 16 real examples, not its padding, and weighs
  no more than they do."""
  c = tiny_config(tiny_data, eval_batch_size=24,
                  **{"model.dropout_rate": 0.5,
                     "model.attention_dropout_rate": 0.5})
  task = tasks.get_task(c)
  graphdef, params = nnx.split(train.build_model(c, task), nnx.Param)
  tx, _ = optim.make_optimizer(c.optimizer, c.num_train_steps)
  trainer = train.Trainer(c, task, graphdef, params, tx)
  got = trainer.evaluate(trainer.initial_state(params)["params"], "val")
  val = task.sources["val"]
  assert len(val) == 64 and trainer.eval_batch_size == 24
  batch = input_pipeline.read_batch(val, np.arange(len(val)))
  logits = np.asarray(_call(nnx.merge(graphdef, params),
                            jnp.asarray(batch["inputs"])), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = batch["targets"]
  want_loss = -logp[np.arange(len(val)), targets].mean()
  want_accuracy = (logits.argmax(-1) == targets).mean()
  assert got["val_loss"] == pytest.approx(want_loss, rel=1e-5)
  assert got["val_accuracy"] == pytest.approx(want_accuracy, abs=1e-9)


def test_learning_rate_schedules():
  """The schedules at the steps that define them (lr 0.5, warmup 4, 12
  steps): rsqrt (LRA's) rises linearly to lr / sqrt(warmup) at the end of
  the warmup, then falls as lr / sqrt(step); cosine reaches lr at the end
  of the warmup, lr / 2 halfway through the decay and 0 at
  num_train_steps; constant rises over the warmup, then stays (no warmup:
  lr from step 0). The update of step k (counted from 0) is taken with
  the schedule's value at k."""
  opt = listops_config.get_config("quick").optimizer
  opt.update(learning_rate=0.5, warmup_steps=4, weight_decay=0.0,
             grad_clip=0.0)

  def values(schedule, steps, warmup=4):
    opt.update(schedule=schedule, warmup_steps=warmup)
    fn = optim.learning_rate_schedule(opt, 12)
    return [float(fn(s)) for s in steps]

  np.testing.assert_allclose(values("rsqrt", [0, 1, 2, 4, 16, 64]),
                             [0, 0.0625, 0.125, 0.25, 0.125, 0.0625],
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(
      values("cosine", [0, 2, 4, 8, 11, 12]),
      [0, 0.25, 0.5, 0.25, 0.25 * (1 + np.cos(np.pi * 7 / 8)), 0],
      rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(values("constant", [0, 2, 4, 1000]),
                             [0, 0.25, 0.5, 0.5], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(values("constant", [0, 5], warmup=0),
                             [0.5, 0.5], rtol=1e-6)
  # Adam's update of a constant gradient is the learning rate itself.
  opt.update(schedule="rsqrt", warmup_steps=4)
  tx, schedule = optim.make_optimizer(opt, 12)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for k in range(6):
    updates, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
    np.testing.assert_allclose(updates["w"], -float(schedule(k)),
                               rtol=1e-5, atol=1e-8)


def test_gradient_clipping_and_weight_decay_are_applied():
  """optimizer.grad_clip scales the gradients down to that global norm
  before Adam (its updates are those of the clipped gradients, not of the
  gradients as they came); optimizer.weight_decay shrinks every parameter
  by lr * weight_decay at a step whose gradient is 0."""
  opt = listops_config.get_config("quick").optimizer
  opt.update(learning_rate=0.1, schedule="constant", warmup_steps=0,
             weight_decay=0.0, grad_clip=1.0)
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
  big = {"w": jnp.array([6.0, 0.0, -8.0]), "b": jnp.array([0.0])}  # norm 10
  small = {"w": jnp.array([0.03, 0.04, 0.0]), "b": jnp.array([0.0])}

  def updates(grads, **fields):
    cfg = opt.copy_and_resolve_references()
    cfg.update(**fields)
    tx, _ = optim.make_optimizer(cfg, 10)
    state, out = tx.init(params), []
    for g in grads:
      u, state = tx.update(g, state, params)
      out.append(np.asarray(u["w"]))
    return np.stack(out)

  clipped = updates([big, small])
  np.testing.assert_allclose(
      clipped, updates([jax.tree.map(lambda g: g / 10, big), small],
                       grad_clip=0.0), rtol=1e-5, atol=1e-8)
  assert np.abs(clipped - updates([big, small], grad_clip=0.0)).max() > 1e-3
  zero = jax.tree.map(jnp.zeros_like, params)
  decayed = updates([zero], grad_clip=0.0, weight_decay=0.5)
  np.testing.assert_allclose(decayed[0], -0.05 * params["w"], rtol=1e-6)


def test_model_is_padding_invariant(tiny_data):
  """Padding tokens (id 0) change nothing for the real tokens' prediction."""
  c = tiny_config(tiny_data)
  task = tasks.get_task(c)
  model = train.build_model(c, task)
  tokens = np.array([[12, 3, 4, 16, 5, 16, 0, 0, 0, 0]], np.int32)
  a = _call(model, jnp.asarray(tokens[:, :6]))
  b = _call(model, jnp.asarray(tokens))
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("attention,pool,learned", [
    ("hierarchical", "CLS", False), ("full", "MEAN", True)])
def test_encoder_pads_rows_to_the_attention_length(attention, pool, learned):
  """125 tokens + CLS = 126 rows run as 128 (what the attention pads to):
  the same logits as without the row padding, and the encoder's output
  keeps the input's rows."""
  kw = dict(num_classes=3, mlp_dim=16, emb_dim=16, vocab_size=20,
            max_len=200, num_layers=2, num_heads=2, qkv_dim=16,
            attention=attention, block_size=16, pool=pool,
            learned_positions=learned, dtype="float32",
            implementation="xla")
  padded = models.Classifier(rngs=nnx.Rngs(0), **kw)
  plain = models.Classifier(rngs=nnx.Rngs(0), pad_rows=False, **kw)
  rows = 125 + (pool == "CLS")
  assert padded.encoder.attention_rows(rows) == 128
  assert plain.encoder.attention_rows(rows) == rows
  assert padded.encoder.attention_rows(100) == 100  # 128 would add 28%
  tokens = np.random.default_rng(0).integers(1, 20, (2, 125)).astype(
      np.int32)
  tokens[1, 90:] = 0  # a padded example too
  want = np.asarray(_call(plain, jnp.asarray(tokens)))
  np.testing.assert_allclose(np.asarray(_call(padded, jnp.asarray(tokens))),
                             want, rtol=1e-5, atol=1e-5)
  x, mask = _call(padded.encoder, jnp.asarray(tokens))
  assert x.shape == (2, rows, 16) and mask.shape == (2, rows)


def test_wrong_sequence_length_is_a_clear_error(tiny_data):
  c = tiny_config(tiny_data)
  model = train.build_model(c, tasks.get_task(c))
  with pytest.raises(ValueError, match="max_len"):
    model(jnp.ones((1, 41), jnp.int32))


def test_batch_size_must_divide(tiny_data, tmp_path):
  c = tiny_config(tiny_data, batch_size=0)
  with pytest.raises(ValueError, match="batch_size"):
    train.train_and_evaluate(c, str(tmp_path))
  if jax.device_count() > 1:
    c = tiny_config(tiny_data, batch_size=jax.device_count() + 1)
    with pytest.raises(ValueError, match="divisible"):
      train.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("model.block_size", 0, r"model\.block_size must be an even integer"),
    ("model.block_size", 1, r"model\.block_size .* got 1"),
    ("model.block_size", 5, r"model\.block_size .* got 5"),
    ("model.block_size", -4, r"model\.block_size .* got -4"),
    ("model.dtype", "foo", r"model\.dtype must be one of .*'foo'"),
    ("model.num_heads", 0, r"model\.num_heads must be >= 1"),
    ("model.emb_dim", 0, r"model\.emb_dim must be >= 1"),
    ("model.num_layers", 0, r"model\.num_layers must be >= 1"),
    ("model.qkv_dim", 33, r"model\.qkv_dim \(33\) must be divisible by "
                          r"model\.num_heads \(2\)"),
    ("model.dropout_rate", 1.5, r"model\.dropout_rate must be in \[0, 1\)"),
    ("model.attention_dropout_rate", -0.1,
     r"model\.attention_dropout_rate must be in"),
    ("model.attention", "sparse", r"model\.attention must be one of"),
    ("optimizer.learning_rate", -1.0,
     r"optimizer\.learning_rate must be a positive number, got -1"),
    ("optimizer.learning_rate", float("nan"), r"optimizer\.learning_rate"),
    ("optimizer.learning_rate", 1e39,
     r"optimizer\.learning_rate must be in float32's range .*, got 1e\+39"),
    ("optimizer.learning_rate", 1e-50,
     r"optimizer\.learning_rate must be in float32's range .*, got 1e-50"),
    ("optimizer.warmup_steps", -5, r"optimizer\.warmup_steps must be >= 0"),
    ("model.qkv_dim", 0, r"model\.qkv_dim must be >= 1"),
    ("model.mlp_dim", 0, r"model\.mlp_dim must be >= 1"),
    ("optimizer.b1", -0.1, r"optimizer\.b1 must be in \[0, 1\), got -0\.1"),
    ("optimizer.b2", 1.0, r"optimizer\.b2 must be in \[0, 1\), got 1\.0"),
    ("optimizer.eps", -1e-9, r"optimizer\.eps must be >= 0"),
    ("optimizer.weight_decay", -0.01, r"optimizer\.weight_decay must be >= 0"),
    ("optimizer.grad_clip", -1.0, r"optimizer\.grad_clip must be >= 0"),
    ("optimizer.schedule", "linear", r"optimizer\.schedule must be one of"),
    ("max_length", 0, r"max_length must be positive, got 0"),
    ("batch_size", -8, r"batch_size must be >= 1, got -8"),
    ("eval_batch_size", 0, r"eval_batch_size must be >= 1, got 0"),
    ("num_train_steps", 0, r"num_train_steps must be >= 1, got 0"),
    ("log_every", 0, r"log_every must be >= 1, got 0"),
    ("eval_every", 0, r"eval_every must be >= 1, got 0"),
    ("checkpoint_every", 0, r"checkpoint_every must be >= 1, got 0"),
])
def test_bad_model_and_optimizer_values_are_named(tiny_data, tmp_path, field,
                                                  value, match):
  """Refused before anything runs or is written, naming the field, and
  without warnings on the way (a value past float32's range was cast)."""
  c = tiny_config(tiny_data, **{field: value})
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    with pytest.raises(ValueError, match=match):
      train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def _all_config_variants():
  """(config file, variant) of every config and variant, the combinable
  variants in every combination."""
  import importlib  # pylint: disable=g-import-not-at-top
  import itertools  # pylint: disable=g-import-not-at-top
  out = [("listops", v) for v in ("", "full", "long", "long_full", "quick")]
  lm1b = importlib.import_module("configs.lm1b")
  out += [("lm1b", v) for size in ("",) + lm1b.SIZES
          for v in (size, ",".join(filter(None, (size, "full"))))]
  for name in sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                     if f.endswith(".py")):
    if name in ("listops", "lm1b"):
      continue
    variants = importlib.import_module(f"configs.{name}").VARIANTS
    out += [(name, ",".join(combo)) for r in range(len(variants) + 1)
            for combo in itertools.combinations(variants, r)]
  return out


def test_every_config_variant_passes_the_checks():
  variants = _all_config_variants()
  assert len({name for name, _ in variants}) == 7  # every file in configs/
  for name, variant in variants:
    path = os.path.join(ROOT, "configs", f"{name}.py")
    train.check_config(config_utils.load_config(
        f"{path}:{variant}" if variant else path))


def test_relaunch_that_does_not_fit_the_checkpoint_is_refused(tiny_data,
                                                              tmp_path):
  """Other shapes, or fewer steps than the checkpoint's: a clear error that
  leaves the run's files alone; a dry run refuses the same and keeps the
  run's config.json."""
  w = str(tmp_path)
  train.train_and_evaluate(tiny_config(tiny_data, num_train_steps=4), w)
  files = ("config.json", "metrics.jsonl", "results.json")
  before = {f: (tmp_path / f).read_bytes() for f in files}
  wider = tiny_config(tiny_data, num_train_steps=8,
                      **{"model.emb_dim": 64, "model.qkv_dim": 64})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(wider, w)
  message = str(e.value)
  assert "holds a run whose checkpoint (step 4) does not fit this config" in (
      message)
  assert ("model.emb_dim 32 -> 64, model.qkv_dim 32 -> 64, num_train_steps "
          "4 -> 8." in message)
  assert "Use a new --workdir or the run's config." in message
  # The first difference named is a parameter's (the optimizer's moments
  # differ with them).
  assert re.search(r"does not fit this config \(params/\S+: checkpoint "
                   r"\(\d+, 32\), this config \(\d+, 64\); and \d+ more\)",
                   message), message
  # Arrays that only the config has (another layer) do not fit either.
  deeper = tiny_config(tiny_data, **{"model.num_layers": 2})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(deeper, w)
  message = str(e.value)
  assert re.search(r"checkpoint \(step 4\) does not fit this config "
                   r"\(params/\S+: checkpoint absent, this config \(", message
                   ), message
  assert "model.num_layers 1 -> 2" in message
  with pytest.raises(ValueError, match=r"num_train_steps \(2\) is below the "
                     r"step of the checkpoint in .* \(4\)"):
    train.train_and_evaluate(tiny_config(tiny_data, num_train_steps=2), w)
  # A dry run says the same (it checks the checkpoint as the run would).
  dry = tiny_config(tiny_data, dry_run=True, **{"model.emb_dim": 64,
                                                "model.qkv_dim": 64})
  with pytest.raises(ValueError, match=r"checkpoint \(step 4\) does not fit"):
    train.train_and_evaluate(dry, w)
  assert {f: (tmp_path / f).read_bytes() for f in files} == before
  # Without the run's config.json the error still explains itself.
  os.remove(tmp_path / "config.json")
  with pytest.raises(ValueError, match="There is no .*config.json to compare "
                     "with. Use a new --workdir"):
    train.train_and_evaluate(wider, w)
  assert not (tmp_path / "config.json").exists()


def test_resumed_run_logs_each_step_once(tiny_data, tmp_path):
  """A run killed after logging steps it had not checkpointed yet logs them
  again on resume: metrics.jsonl keeps one row per step (the earlier ones
  dropped), the same rows as an unbroken run's; so does relaunching a
  finished run, which only re-evaluates."""
  c = tiny_config(tiny_data, log_every=2)  # 12 steps, checkpoints every 4
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  train.train_and_evaluate(c, str(tmp_path / "broken"))
  # Killed after logging step 12, before its checkpoint was written, and
  # in the middle of a row.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / "broken" / "checkpoints" / "12")
  with open(tmp_path / "broken" / "metrics.jsonl", "a") as f:
    f.write('{"step": 12, "train_lo')
  train.train_and_evaluate(c, str(tmp_path / "broken"))
  train.train_and_evaluate(c, str(tmp_path / "straight"))  # finished

  def rows(name):  # steps/s differ from run to run
    return [{k: v for k, v in r.items() if k != "steps_per_sec"}
            for r in metrics_lib.read_metrics(str(tmp_path / name))]

  straight = rows("straight")
  assert [r["step"] for r in straight if "train_loss" in r] == list(
      range(2, 13, 2))
  assert [r["step"] for r in straight if "test_loss" in r] == [12]
  assert rows("broken") == straight
  assert not os.path.exists(tmp_path / "broken" / "metrics.jsonl.tmp")


def test_progress_rate_leaves_out_compilation(tiny_data, tmp_path, capsys):
  """The first progress line's steps/s (and so its ETA) is not slowed by
  compiling the step function: it is about the rate of the later lines."""
  c = tiny_config(tiny_data, num_train_steps=30, log_every=10,
                  eval_every=30, checkpoint_every=30)
  train.train_and_evaluate(c, str(tmp_path))
  rates = [r["steps_per_sec"] for r in metrics_lib.read_metrics(str(tmp_path))
           if "steps_per_sec" in r]
  assert len(rates) == 3
  assert rates[0] > 0.3 * min(rates[1:]), rates
  first = [l for l in capsys.readouterr().out.splitlines()
           if l.startswith("step 10/30 |")]
  assert first and f"{rates[0]:.2f} steps/s" in first[0], first


def test_first_step_logged_alone_has_no_rate(tiny_data, tmp_path, capsys):
  """A line of a segment's first step alone (log_every 1 here; also a run
  resumed one step before a log step) could only time that step's
  compilation: it shows no rate and no ETA, and its row has no steps/s,
  rather than a rate many times too slow."""
  c = tiny_config(tiny_data, num_train_steps=3, log_every=1, eval_every=3,
                  checkpoint_every=3)
  results = train.train_and_evaluate(c, str(tmp_path))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path))
          if "train_loss" in r]
  assert [r["step"] for r in rows if "steps_per_sec" in r] == [2, 3]
  assert results["steps_per_sec_intervals"] == 2
  out = capsys.readouterr().out.splitlines()
  first = [l for l in out if l.startswith("step 1/3 |")]
  assert first and first[0].startswith("step 1/3 | ? steps/s | ETA ? |"), out


def test_progress_line_rate_and_eta(monkeypatch, capsys):
  """A progress line's rate counts the steps since the previous line (the
  first: since the restart), and its ETA is the steps left at that rate."""
  import types  # pylint: disable=g-import-not-at-top
  now = [1000.0]
  monkeypatch.setattr(metrics_lib, "time",
                      types.SimpleNamespace(time=lambda: now[0]))
  progress = metrics_lib.Progress(total_steps=10_000, start_step=0)
  now[0] += 30.0  # compiling the first step
  progress.restart(1)
  now[0] += 9.0
  assert progress.report(10, {"train_loss": 2.5}) == 1.0
  now[0] += 2.0
  assert progress.report(20, {}) == 5.0
  now[0] += 1.0
  assert progress.report(10_000, {}) == 9980.0
  assert capsys.readouterr().out.splitlines() == [
      "step 10/10000 | 1.00 steps/s | ETA 2h46m30s | train_loss 2.5",
      "step 20/10000 | 5.00 steps/s | ETA 33m16s",
      "step 10000/10000 | 9980.00 steps/s | ETA 0m00s"]


def test_dry_run_prints_parameter_count(tiny_data, tmp_path):
  r = run_main(["--config=configs/listops.py:quick",
                f"--workdir={tmp_path}", f"--config.data_dir={tiny_data}",
                "--config.max_length=40", "--config.dry_run=True"])
  assert r.returncode == 0, r.stderr[-2000:]
  line = [l for l in r.stdout.splitlines() if "Total parameters:" in l]
  assert line, r.stdout[-2000:]
  n = int(line[0].split(":")[1].replace(",", ""))
  c = listops_config.get_config("quick")
  c.max_length = 40
  c.data_dir = tiny_data
  _, params = nnx.split(train.build_model(c, tasks.get_task(c)), nnx.Param)
  assert n == sum(x.size for x in jax.tree.leaves(params))
  assert os.path.exists(tmp_path / "config.json")
  assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_config_field_is_named(tmp_path):
  r = run_main(["--config=configs/listops.py:quick", f"--workdir={tmp_path}",
                "--config.model.num_layerz=3"])
  assert r.returncode != 0
  assert "Unknown config field 'model.num_layerz'" in r.stderr
  assert "num_layers" in r.stderr  # Lists the real fields.
  assert "Traceback" not in r.stderr


def test_missing_data_dir_is_a_clear_error(tmp_path):
  missing = tmp_path / "no_such_dir"
  r = run_main(["--config=configs/listops.py:quick",
                f"--workdir={tmp_path / 'w'}", f"--config.data_dir={missing}"])
  assert r.returncode != 0
  assert "data_dir does not exist" in r.stderr and str(missing) in r.stderr
  assert "Traceback" not in r.stderr


def test_train_writes_metrics_checkpoints_and_results(tiny_data, tmp_path):
  c = tiny_config(tiny_data)
  results = train.train_and_evaluate(c, str(tmp_path))
  rows = metrics_lib.read_metrics(str(tmp_path))
  keys = set().union(*rows)
  for k in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy",
            "test_accuracy", "test_loss", "test_accuracy_best_eval",
            "steps_per_sec", "learning_rate"):
    assert k in keys, k
  assert [r["step"] for r in rows if "train_loss" in r] == [4, 8, 12]
  assert [r["step"] for r in rows if "eval_accuracy" in r] == [6, 12]
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert json.load(open(tmp_path / "results.json"))["test_accuracy"] == (
      results["test_accuracy"])
  step, _ = saved_params(str(tmp_path))
  assert step == 12
  # The last two checkpoints are kept (the one before the last is where a
  # relaunch resumes if the last cannot be read).
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["8", "12"]
  # Launching again finds the finished run and only re-evaluates.
  again = train.train_and_evaluate(c, str(tmp_path))
  assert again["test_accuracy"] == results["test_accuracy"]


def test_best_holds_the_parameters_of_the_best_evaluation(tiny_data,
                                                          tmp_path):
  """best/ holds the parameters of the highest validation accuracy, not
  the last evaluation's: those of a run stopped at that step. Each row's
  best_eval_accuracy is the best up to its step, and results.json names
  that evaluation."""
  # A constant schedule: the same steps whatever the total. At lr 1e-2 the
  # accuracy peaks, then falls.
  fields = {"log_every": 2, "eval_every": 1, "checkpoint_every": 4,
            "optimizer.schedule": "constant", "optimizer.learning_rate": 1e-2}
  results = train.train_and_evaluate(
      tiny_config(tiny_data, num_train_steps=8, **fields),
      str(tmp_path / "run"))
  evals = [r for r in metrics_lib.read_metrics(str(tmp_path / "run"))
           if "eval_accuracy" in r]
  accuracy = [r["eval_accuracy"] for r in evals]
  assert [r["step"] for r in evals] == list(range(1, 9))
  assert [r["best_eval_accuracy"] for r in evals] == list(
      np.maximum.accumulate(accuracy))
  best = 1 + int(np.argmax(accuracy))
  # What tells the best evaluation from the last one.
  assert best < 8 and accuracy[-1] < accuracy[best - 1], accuracy
  assert (results["best_eval_step"], results["best_eval_accuracy"]) == (
      best, accuracy[best - 1])
  assert os.listdir(tmp_path / "run" / "best") == [str(best)]
  mngr = ocp.CheckpointManager(str(tmp_path / "run" / "best"),
                               item_names=("params", "info"))
  got = mngr.restore(best, args=ocp.args.Composite(
      params=ocp.args.StandardRestore()))["params"]
  mngr.close()
  train.train_and_evaluate(
      tiny_config(tiny_data, num_train_steps=best, **fields),
      str(tmp_path / "short"))
  _, want = saved_params(str(tmp_path / "short"))
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_logged_learning_rate_is_that_of_the_rows_last_step(tiny_data,
                                                             tmp_path):
  """A row's learning_rate is the one its step's update took: step 1's is
  the schedule's value at 0 (0 in the warmup), step 4's at 3."""
  c = tiny_config(tiny_data, num_train_steps=4, log_every=1, eval_every=4,
                  checkpoint_every=4)
  train.train_and_evaluate(c, str(tmp_path))
  rates = [r["learning_rate"] for r in metrics_lib.read_metrics(str(tmp_path))
           if "learning_rate" in r]
  lr = c.optimizer.learning_rate
  np.testing.assert_allclose(rates, [0, lr / 4, lr / 2, 3 * lr / 4],
                             rtol=1e-6)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_data,
                                                             tmp_path):
  # Fine for 8 steps, then a huge learning rate poisons the parameters (a
  # NaN one is refused up front).
  c = tiny_config(tiny_data, num_train_steps=8)
  train.train_and_evaluate(c, str(tmp_path))
  c = tiny_config(tiny_data, num_train_steps=16)
  c.optimizer.learning_rate = 1e30
  with pytest.raises(train.NonFiniteLossError, match="NaN or inf"):
    train.train_and_evaluate(c, str(tmp_path))
  step, params = saved_params(str(tmp_path))
  assert step == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_evaluation_stops_the_run(tiny_data, tmp_path):
  """A last step that ruins the parameters (its own loss, computed before
  the update, still finite) leaves a NaN validation loss: the run stops
  there instead of finishing with test numbers of broken parameters, the
  evaluation becomes no best (its accuracy, argmax of NaN logits, beat
  none) and the step no checkpoint. metrics.jsonl holds the loss as
  "nan", which strict JSON readers take, never a bare NaN."""
  c = tiny_config(tiny_data, num_train_steps=2, log_every=1, eval_every=2,
                  checkpoint_every=2, **{"optimizer.warmup_steps": 1,
                                         "optimizer.learning_rate": 1e30})
  with pytest.raises(train.NonFiniteLossError,
                     match="Validation loss became nan at step 2. Stopping; "
                     "no checkpoint was saved yet"):
    train.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / "best") == []
  assert os.listdir(tmp_path / "checkpoints") == []
  assert not os.path.exists(tmp_path / "results.json")

  def bare(constant):
    raise ValueError(f"bare {constant} in JSON")

  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line, parse_constant=bare) for line in f]
  assert [r["eval_loss"] for r in rows if "eval_loss" in r] == ["nan"]
  assert not any("test_loss" in r for r in rows)
  # results.json goes through the same conversion.
  assert metrics_lib.json_safe({"a": float("inf"), "b": {
      "c": float("-inf"), "d": 1.5}}) == {"a": "inf", "b": {"c": "-inf",
                                                           "d": 1.5}}


def test_tensorflow_is_imported_without_the_accelerators(tmp_path):
  """The metric writer (clu's TensorBoard writer) and tfds import TensorFlow
  where it is installed; it must see no GPU or TPU, or its first operation
  reserves their memory under JAX (decided on a host with TensorFlow and a
  GPU; with TensorFlow on a CPU-only host the writer and its import are
  checked). Without TensorFlow nothing imports it and metrics.jsonl alone
  is written."""
  code = (
      "import sys\n"
      "from htransformer import metrics, tf_util\n"
      f"w = metrics.MetricWriter({str(tmp_path)!r})\n"
      "w.write(1, {'loss': 0.5})\n"
      "tf = sys.modules.get('tensorflow')\n"
      "if tf_util.installed():\n"
      "  assert tf is not None and w._tb is not None\n"
      "  kinds = {d.device_type for d in tf.config.get_visible_devices()}\n"
      "  assert kinds == {'CPU'}, kinds\n"
      "else:\n"
      "  assert tf is None and w._tb is None\n"
      "  assert tf_util.import_tensorflow() is None\n"
      "print('ok')\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        env=child_env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
  assert metrics_lib.read_metrics(str(tmp_path)) == [{"step": 1,
                                                       "loss": 0.5}]


def test_compiled_steps_are_kept_in_the_cache(tiny_data, tmp_path):
  """With no compilation cache set, training keeps its compiled steps in
  CACHE/jax (here ``config.cache_dir``), and a second run of the same
  shapes finds them there (no new entries); a cache set already
  ($JAX_COMPILATION_CACHE_DIR, as this suite's) is left as it is."""
  assert train.use_compilation_cache(tiny_config(tiny_data)) == (
      os.environ["JAX_COMPILATION_CACHE_DIR"])
  cache = tmp_path / "cache"
  env = child_env(JAX_PLATFORMS="cpu",
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_DEBUG_LOG_MODULES="jax._src.compiler")
  del env["JAX_COMPILATION_CACHE_DIR"]
  args = ["--config=configs/listops.py:quick", f"--config.data_dir={tiny_data}",
          f"--config.cache_dir={cache}", "--config.max_length=40",
          "--config.model.num_layers=1", "--config.model.emb_dim=32",
          "--config.model.qkv_dim=32", "--config.model.mlp_dim=32",
          "--config.model.block_size=4", "--config.batch_size=8",
          "--config.eval_batch_size=16", "--config.num_train_steps=4",
          "--config.eval_every=4"]
  entries, hits = [], []
  for run in ("first", "second"):
    proc = subprocess.run(
        [sys.executable, "-m", "htransformer.main", *args,
         f"--workdir={tmp_path / run}"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries.append(sorted(os.listdir(cache / "jax")))
    hits.append(re.findall(r"Persistent compilation cache hit for '(\w+)'",
                           proc.stderr))
  assert entries[0] and entries[1] == entries[0]
  assert {"jit_train_step", "jit_eval_step"} <= set(hits[1]) - set(hits[0])


def test_kill_and_resume_equals_uninterrupted(tiny_data, tmp_path):
  """SIGKILL mid-run, or SIGTERM (saves the step reached), relaunch: same
  final parameters as an unbroken run."""
  args = ["--config=configs/listops.py:quick", f"--config.data_dir={tiny_data}",
          "--config.max_length=40", "--config.model.num_layers=1",
          "--config.model.emb_dim=32", "--config.model.qkv_dim=32",
          "--config.model.mlp_dim=32", "--config.model.block_size=4",
          "--config.batch_size=8", "--config.eval_batch_size=16",
          "--config.num_train_steps=40", "--config.log_every=5",
          "--config.checkpoint_every=5", "--config.eval_every=20"]
  env = child_env(JAX_PLATFORMS="cpu")

  def launch(workdir, out=subprocess.DEVNULL):
    return subprocess.Popen(
        [sys.executable, "-m", "htransformer.main", *args,
         f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=out,
        stderr=subprocess.PIPE, text=True)

  # Three runs side by side: uninterrupted; SIGTERM (preemption, `timeout`:
  # the run saves the step it reached and exits 143); SIGKILL once a
  # checkpoint at step >= 10 exists (nothing saved at the kill).
  straight, stopped, broken = (tmp_path / n
                               for n in ("straight", "stopped", "broken"))
  unbroken, term, proc = launch(straight), launch(stopped), launch(broken)
  signalled = set()
  deadline = time.time() + 300
  while len(signalled) < 2 and time.time() < deadline:
    if "term" not in signalled and ((stopped / "metrics.jsonl").exists()
                                    or term.poll() is not None):
      term.send_signal(signal.SIGTERM)
      signalled.add("term")
    ckpt_dir = broken / "checkpoints"
    if "kill" not in signalled and (proc.poll() is not None or any(
        d.isdigit() and int(d) >= 10
        for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else []))):
      proc.send_signal(signal.SIGKILL)
      signalled.add("kill")
    time.sleep(0.05)
  _, err = term.communicate(timeout=300)
  proc.wait(timeout=300)
  assert unbroken.wait(timeout=300) == 0, unbroken.stderr.read()[-3000:]
  m = re.search(r"Stopped by SIGTERM at step (\d+) of 40; checkpoint saved",
                err)
  assert term.returncode == 143 and m, (term.returncode, err[-3000:])
  stopped_at = int(m.group(1))
  assert 5 <= stopped_at < 40
  assert saved_params(str(stopped))[0] == stopped_at
  assert not (stopped / "results.json").exists()
  killed_at, _ = saved_params(str(broken))
  assert killed_at is not None and killed_at < 40, killed_at

  # Relaunched, both resume and finish.
  resumed = {w: launch(w, subprocess.PIPE) for w in (broken, stopped)}
  for w, at in ((broken, killed_at), (stopped, stopped_at)):
    out, err = resumed[w].communicate(timeout=300)
    assert resumed[w].returncode == 0, err[-3000:]
    assert f"Resuming from step {at}" in out
  step_a, a = saved_params(str(straight))
  for other in (broken, stopped):
    step_b, b = saved_params(str(other))
    assert step_a == step_b == 40
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  # metrics.jsonl reads as one run: each logged step once (the rows a
  # killed run wrote after its checkpoint were dropped on resume). steps/s
  # in results.json: the median over every logged interval of the run
  # (40 steps / 5), the segments before the interruption included.
  for w in (straight, broken, stopped):
    results = json.load(open(w / "results.json"))
    rows = metrics_lib.read_metrics(str(w))
    assert [r["step"] for r in rows if "train_loss" in r] == list(
        range(5, 41, 5)), w
    assert [r["step"] for r in rows if "eval_loss" in r] == [20, 40], w
    assert [r["step"] for r in rows if "test_loss" in r] == [40], w
    rates = {r["step"]: r["steps_per_sec"] for r in rows
             if "steps_per_sec" in r}
    # A relaunch's first step logged alone (stopped one step before a log
    # step) has no rate.
    alone = w == stopped and stopped_at % 5 == 4
    assert sorted(rates) == [s for s in range(5, 41, 5)
                             if not (alone and s == stopped_at + 1)], w
    assert results["steps_per_sec_intervals"] == len(rates), w
    assert results["steps_per_sec"] == pytest.approx(
        np.median(list(rates.values())))
  # The same rows as the unbroken run's: the row after a stop between two
  # log steps averages over the steps before the stop too (the checkpoint
  # of the stop holds their sums).
  train_rows = lambda w: {
      r["step"]: (r["train_loss"], r["train_accuracy"], r["grad_norm"])
      for r in metrics_lib.read_metrics(str(w)) if "train_loss" in r}
  assert train_rows(stopped) == train_rows(straight), stopped_at
  assert train_rows(broken) == train_rows(straight)


def test_quick_job_end_to_end(tmp_path):
  """`:quick` (`make run`) from an empty cache: generate, train, evaluate,
  beat 17%. A sixth of its 1,200 steps, to keep the suite short: it gets
  about 36% validation accuracy there, 34% test (41% validation at 400
  steps, 44.8% at 1,200), well over the 25% asked."""
  env_cache = tmp_path / "cache"
  r = run_main(["--config=configs/listops.py:quick",
                f"--workdir={tmp_path / 'run'}",
                f"--config.cache_dir={env_cache}",
                "--config.num_train_steps=200", "--config.eval_every=100",
                "--config.checkpoint_every=100"], timeout=900,
               optimised=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "generated ListOps data" in r.stdout
  assert "steps/s" in r.stdout and "ETA" in r.stdout
  assert "Devices: 1 x cpu in 1 process(es); mesh data 1 x model 1" in (
      r.stdout)
  results = json.load(open(tmp_path / "run" / "results.json"))
  assert (results["devices"], results["processes"], results["mesh"]) == (
      1, 1, {"data": 1, "model": 1})
  rows = metrics_lib.read_metrics(str(tmp_path / "run"))
  best_eval = max(r["eval_accuracy"] for r in rows if "eval_accuracy" in r)
  assert best_eval > 0.25, best_eval  # Majority class is ~17%.
  assert results["test_accuracy"] > 0.25, results
  # Where the data came from and the schedule, for the results table.
  assert results["data"]["generated"] is True
  assert results["data"]["generator"]["generator"] == (
      "htransformer.data.listops")
  assert results["data"]["data_dir"].startswith(str(env_cache))
  assert results["num_train_steps"] == json.load(
      open(tmp_path / "run" / "config.json"))["num_train_steps"]


def test_attention_layer_passes_implementation():
  x = jax.random.normal(jax.random.key(0), (2, 10, 16))
  full = models.MultiHeadAttention(2, 16, attention="full",
                                   implementation="xla", rngs=nnx.Rngs(0))
  hier = models.MultiHeadAttention(2, 16, attention="hierarchical",
                                   block_size=16, implementation="xla",
                                   rngs=nnx.Rngs(0))
  # block_size 16 >= padded length / 2: hierarchical equals full attention.
  np.testing.assert_allclose(full(x), hier(x), atol=1e-5)
  # Refused when the layer is built, not at its first (perhaps jitted) call.
  with pytest.raises(ValueError, match="implementation"):
    models.MultiHeadAttention(2, 16, attention="hierarchical",
                              implementation="cudnn", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="implementation"):
    models.MultiHeadAttention(2, 16, attention="full",
                              implementation="pallas", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_heads=0), ValueError, "num_heads must be a positive integer"),
    (dict(num_heads=-2), ValueError, "num_heads must be a positive integer"),
    (dict(num_heads=2.0), ValueError, "num_heads must be a positive integer"),
    (dict(num_heads=True), ValueError, "num_heads must be a positive integer"),
    (dict(in_features=0), ValueError, "in_features must be a positive"),
    (dict(qkv_features=-4), ValueError, "qkv_features must be a positive"),
    (dict(block_size=3), ValueError, "block_size must be an even integer"),
    (dict(block_size="4"), ValueError, "block_size must be an even integer"),
    (dict(causal="yes"), TypeError, "causal must be a bool"),
    (dict(implementation="bogus"), ValueError, "implementation must be one"),
    (dict(dropout_rate="0.1"), ValueError, "dropout_rate"),
    # The kernels take blocks of 16, 32, 64, ... only, at every length.
    (dict(block_size=8, implementation="pallas_interpret"), ValueError,
     "block_size must be a power of two >= 16, got 8"),
    (dict(block_size=48, implementation="pallas"), ValueError,
     "block_size must be a power of two >= 16, got 48"),
])
def test_attention_layer_settings_are_checked_when_built(kwargs, error,
                                                         match):
  args = dict(num_heads=2, in_features=16) | kwargs
  with pytest.raises(error, match=match):
    models.MultiHeadAttention(args.pop("num_heads"), args.pop("in_features"),
                              **args, rngs=nnx.Rngs(0))
  # Full attention takes no block size: an odd one is not its business.
  models.MultiHeadAttention(2, 16, attention="full", block_size=3,
                            rngs=nnx.Rngs(0))


def test_attention_layer_dropout():
  """Attention dropout acts in training only, draws from the ``dropout``
  stream, and drops what the attention function drops for that key."""
  x = jax.random.normal(jax.random.key(0), (2, 10, 16))
  make = lambda rate, kind: models.MultiHeadAttention(
      2, 16, attention=kind, block_size=4, implementation="xla",
      dropout_rate=rate, rngs=nnx.Rngs(0))
  for kind in ("hierarchical", "full"):
    plain, drop = make(0.0, kind), make(0.3, kind)
    np.testing.assert_array_equal(plain(x), drop(x))  # deterministic
    with pytest.raises(ValueError, match="needs rngs"):
      drop(x, deterministic=False)
    a = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - drop(x)).max()) > 1e-3
    # The key the layer drew: the stream's first, as nnx.Rngs hands it out.
    key = nnx.Rngs(dropout=1).dropout()
    q, k, v = (m(x).reshape(2, 10, 2, 8)
               for m in (drop.query, drop.key, drop.value))
    fn = hierarchical_attention if kind == "hierarchical" else full_attention
    kw = dict(block_size=4) if kind == "hierarchical" else {}
    y = fn(q, k, v, implementation="xla", dropout_rate=0.3, dropout_rng=key,
           **kw)
    np.testing.assert_allclose(a, drop.out(y.reshape(2, 10, 16)), atol=1e-6)
    # The same key given as a stream or as the key itself.
    np.testing.assert_array_equal(
        a, drop(x, deterministic=False, rngs=nnx.Rngs(dropout=1)["dropout"]))
    np.testing.assert_array_equal(a, drop(x, deterministic=False, rngs=key))
    with pytest.raises(ValueError, match="needs rngs: an nnx.Rngs"):
      drop(x, deterministic=False, rngs=1)
    # nnx's modes: .train() turns dropout on where a call does not say,
    # .eval() off; a call's own deterministic wins.
    drop.train()
    np.testing.assert_array_equal(a, drop(x, rngs=nnx.Rngs(dropout=1)))
    with pytest.raises(ValueError, match="needs rngs"):
      drop(x)
    np.testing.assert_array_equal(plain(x), drop(x, deterministic=True))
    drop.eval()
    np.testing.assert_array_equal(plain(x), drop(x))
  with pytest.raises(ValueError, match="dropout_rate"):
    make(1.5, "full")


def test_train_step_with_attention_dropout(tiny_data):
  """model.attention_dropout_rate reaches the attention layers: in
  training mode another dropout key changes the logits only when it is on
  (the other dropout off)."""
  diffs = {}
  call = nnx.jit(lambda model, tokens, rngs: model(
      tokens, deterministic=False, rngs=rngs))
  for rate in (0.0, 0.5):
    c = tiny_config(tiny_data, **{"model.attention_dropout_rate": rate,
                                  "model.dropout_rate": 0.0})
    task = tasks.get_task(c)
    model = train.build_model(c, task)
    assert model.encoder.blocks[0].attn.dropout_rate == rate
    tokens = jnp.asarray(np.stack(
        [task.sources["train"][i]["inputs"] for i in range(4)]))
    out = [call(model, tokens, nnx.Rngs(dropout=s)) for s in (0, 1)]
    diffs[rate] = float(jnp.abs(out[0] - out[1]).max())
  assert diffs[0.0] == 0.0 and diffs[0.5] > 1e-4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_hot_embedding_equals_gather(dtype, monkeypatch):
  """Small vocabularies are embedded by a one-hot product: same values as
  the gather, and the same gradient (up to the dtype's rounding)."""
  embed = nnx.Embed(20, 16, dtype=dtype, rngs=nnx.Rngs(0),
                    embedding_init=nnx.initializers.normal(1.0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 20, (4, 33)))
  cot = jax.random.normal(jax.random.key(1), (4, 33, 16), dtype)

  graphdef, state = nnx.split(embed)

  def grad(embed_fn):
    def loss(state):
      e = nnx.merge(graphdef, state)
      return jnp.sum((embed_fn(e, tokens) * cot).astype(jnp.float32))
    return np.asarray(jax.grad(loss)(state)["embedding"][...], np.float32)

  one_hot = models.embed_tokens(embed, tokens)
  np.testing.assert_array_equal(np.asarray(one_hot, np.float32),
                                np.asarray(embed(tokens), np.float32))
  g_one_hot = grad(models.embed_tokens)
  g_gather = grad(lambda e, t: e(t))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(g_one_hot, g_gather, rtol=tol, atol=tol * 10)
  monkeypatch.setattr(models, "ONE_HOT_MAX_VOCAB", 10)  # gather above it
  np.testing.assert_array_equal(np.asarray(models.embed_tokens(embed, tokens)),
                                np.asarray(embed(tokens)))


def test_grid_similarity_tells_a_grid_from_a_sequence():
  """inspect_classifier.grid_similarity: a table built from the 2-D
  coordinates is as similar down a column as along a row; the 1-D
  sinusoidal table of the flattened sequence is not (its pixels 4 rows
  apart are 128 tokens apart)."""
  from tests.scripts_helper import load_script  # pylint: disable=g-import-not-at-top
  grid_similarity = load_script("inspect_classifier").grid_similarity
  side = 32
  axis = models.sinusoidal_positions(side, 16)
  rows, cols = np.divmod(np.arange(side * side), side)
  grid = grid_similarity(np.concatenate([axis[rows], axis[cols]], 1), side)
  assert abs(grid["down1"] - grid["right1"]) < 1e-9
  assert abs(grid["down4"] - grid["right4"]) < 1e-9
  assert grid["right1"] > grid["right4"] > grid["far"]
  flat = grid_similarity(models.sinusoidal_positions(side * side, 32), side)
  assert flat["right1"] > 0.9 and flat["down4"] < 0 < flat["right4"]
  noise = grid_similarity(np.random.default_rng(0).standard_normal(
      (side * side, 32)), side)
  assert all(abs(v) < 0.05 for v in noise.values())


def test_inspect_classifier_reports_a_dead_head(tiny_data, tmp_path,
                                                monkeypatch):
  """scripts/inspect_classifier.py on a real run: the checkpoint's step and
  statistics (also from a relative workdir); a head pushed below zero reads
  as 0 units on and one answer for every input; a folder that is no workdir
  is a clear error. More examples than the split holds read the split
  (they were a batch of that many rows of padding: 10**9 ran out of
  memory), and a language model's run is named as one before its data is
  looked for (lm1b's missing data was the error before)."""
  from tests.scripts_helper import load_script  # pylint: disable=g-import-not-at-top
  inspect = load_script("inspect_classifier")
  c = tiny_config(tiny_data, **{"model.head_activation": "relu"})
  train.train_and_evaluate(c, str(tmp_path / "run"))
  out = inspect.inspect(str(tmp_path / "run"), num_examples=16)
  assert out["trained"]["step"] == 12
  for r in out.values():
    assert r["head_units"] == 32 and 0 < r["head_units_on"] <= 32
    assert r["logit_spread"] > 0 and r["feature_spread"] > 0
    assert 0.0 <= r["accuracy"] <= 1.0
  task = tasks.get_task(c)
  model = train.build_model(c, task)
  tokens = np.stack([task.sources["test"][i]["inputs"] for i in range(16)])
  targets = np.array([task.sources["test"][i]["targets"] for i in range(16)])
  alive = inspect.report(model, tokens, targets)
  assert alive == out["init"]  # the run's initialisation, seed 0
  monkeypatch.chdir(tmp_path)  # orbax takes absolute paths only
  assert inspect.inspect("run", num_examples=16) == out
  model.head1.bias[...] = jnp.full((32,), -100.0)
  dead = inspect.report(model, tokens, targets)
  assert dead["head_units_on"] == 0 and dead["logit_spread"] == 0.0
  assert dead["feature_spread"] == alive["feature_spread"]
  with pytest.raises(FileNotFoundError, match="config.json"):
    inspect.inspect(str(tmp_path))
  with pytest.raises(ValueError, match="num_examples"):
    inspect.inspect(str(tmp_path / "run"), num_examples=0)
  with pytest.raises(ValueError, match="split must be one of"):
    inspect.inspect(str(tmp_path / "run"), split="dev")
  assert out["trained"]["examples"] == 16
  whole = inspect.inspect(str(tmp_path / "run"), num_examples=10**9)
  assert whole["trained"]["examples"] == 64  # tiny_data's test split
  lm = config_utils.load_config(os.path.join(ROOT, "configs", "lm1b.py"))
  (tmp_path / "run" / "config.json").write_text(lm.to_json())
  with pytest.raises(ValueError, match="trained a language model"):
    inspect.inspect(str(tmp_path / "run"))
