"""Meshes and processes: the same global batch gives the same training.

* 4 forced host devices, mesh (data 4) and (data 2, model 2), against one
  device: same losses and parameters within float rounding; parameters and
  Adam's moments are sharded by the models' annotations, batches over the
  data axis.
* The fused kernels (interpreted) on inputs sharded over batch and heads
  run per device (no all-gather) and give the unsharded values and
  gradients, for automatic and explicit mesh axes.
* Two real processes on localhost (JAX CPU collectives, gloo) run
  ``htransformer.main`` to the end, stop, resume from their checkpoint and
  finish; the final parameters equal a single-process run's, and only
  process 0 wrote metrics.

The device and process counts are fixed when JAX starts, so every run is a
subprocess; this file is also the worker (``python tests/test_distributed.py
steps ...``).
"""

import functools
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.scripts_helper import ROOT, child_env

STEPS = 6


def _env(num_devices=None):
  flag = "--xla_force_host_platform_device_count"
  return child_env(
      JAX_PLATFORMS="cpu", drop_xla_flags=[flag],
      add_xla_flags=[f"{flag}={num_devices}"] if num_devices else [])


# ----------------------------------------------------------------------------
# Forced host devices: one process, several meshes.


def steps_worker(data_dir, models, out):
  """Trains STEPS steps for each mesh.model in ``models``; saves to ``out``."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from htransformer import input_pipeline, optim, tasks, train  # pylint: disable=g-import-not-at-top,g-multiple-import
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top

  saved, info = {}, {"devices": jax.device_count()}
  for model in models:
    c = tiny_config(data_dir, **{"mesh.model": model})
    task = tasks.get_task(c)
    graphdef, params = nnx.split(train.build_model(c, task), nnx.Param)
    tx, _ = optim.make_optimizer(c.optimizer, c.num_train_steps)
    trainer = train.Trainer(c, task, graphdef, params, tx)
    state = trainer.initial_state(params)
    it = input_pipeline.train_iterator(task.sources["train"], c.batch_size,
                                       c.data_seed)
    losses = []
    for _ in range(STEPS):
      state, sums = trainer.train_step(state, trainer.global_batch(next(it)))
      losses.append(float(sums["loss"] / sums["count"]))
    saved[f"{model}/losses"] = np.array(losses)
    # Each device's rows of a training batch.
    batch = trainer.global_batch(next(it))
    info[f"{model}/batch_rows"] = sorted(
        s.data.shape[0] for s in batch["inputs"].addressable_shards)
    saved[f"{model}/eval_loss"] = np.array(
        trainer.evaluate(state["params"], "val")["val_loss"])
    # An eval batch the data axis does not divide: rounded up, the same
    # loss (each example counted once).
    odd = tiny_config(data_dir, **{"mesh.model": model,
                                   "eval_batch_size": 6})
    train.check_config(odd)
    odd = train.Trainer(odd, task, graphdef, params, tx)
    saved[f"{model}/eval_loss_odd"] = np.array(
        odd.evaluate(state["params"], "val")["val_loss"])
    info[f"{model}/odd_eval_batch"] = odd.eval_batch_size
    for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
      saved[f"{model}/params{jax.tree_util.keystr(path)}"] = np.asarray(x)
    attn = state["params"]["encoder"]["blocks"][0]["attn"]
    mu = state["opt_state"][0][0].mu["encoder"]["blocks"][0]
    info[str(model)] = {
        "mesh": dict(trainer.mesh.shape),
        "query": str(attn["query"]["kernel"][...].sharding.spec),
        "out": str(attn["out"]["kernel"][...].sharding.spec),
        "mu_fc1": str(mu["mlp"]["fc1"]["kernel"][...].sharding.spec),
        "mu_fc2": str(mu["mlp"]["fc2"]["kernel"][...].sharding.spec),
        "ln": str(state["params"]["encoder"]["ln"]["scale"][...]
                  .sharding.spec),
        "query_shard": list(attn["query"]["kernel"][...]
                            .addressable_shards[0].data.shape),
    }
  info["errors"] = {}
  for name, overrides in {"heads": {"mesh.model": 4, "model.mlp_dim": 64},
                          "mlp": {"mesh.model": 2, "model.mlp_dim": 33},
                          "devices": {"mesh.model": 3},
                          "batch": {"mesh.model": 2, "batch_size": 7}}.items():
    try:
      train.check_config(tiny_config(data_dir, **overrides))
      info["errors"][name] = None
    except ValueError as e:
      info["errors"][name] = str(e)
  np.savez(out + ".npz", **saved)
  with open(out + ".json", "w") as f:
    json.dump(info, f)


def kernels_worker(data_dir, out):
  """Pallas (interpret) attention over meshes of 4 devices vs one device,
  and a training step that uses it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from htransformer.attention import hierarchical_attention  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((4, 64, 2, 16)), jnp.float32)
             for _ in range(3))
  mask = jnp.asarray(np.arange(64)[None] < np.array([[64], [50], [9], [33]]))

  def attn(q, k, v, mask, rate=0.0):
    return hierarchical_attention(q, k, v, block_size=16, mask=mask,
                                  implementation="pallas_interpret",
                                  dropout_rate=rate,
                                  dropout_rng=jax.random.PRNGKey(5))

  def grads(q, k, v, mask, rate=0.0):
    return jax.grad(lambda *a: jnp.sum(attn(*a, mask, rate) ** 2),
                    argnums=(0, 1, 2))(q, k, v)

  info = {}
  for name, kind, spec, rate in (
      ("data2_model2", "Auto", P("data", None, "model"), 0.0),
      ("explicit", "Explicit", P("data", None, "model"), 0.0),
      # Each device drops the weights an unsplit call drops.
      ("dropout", "Auto", P("data", None, "model"), 0.3)):
    ref = [np.asarray(g) for g in jax.jit(grads, static_argnums=4)(
        q, k, v, mask, rate)]
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(
        getattr(jax.sharding.AxisType, kind),) * 2)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
    args = [put(x, spec) for x in (q, k, v)] + [put(mask, P("data"))]
    # The gradients hold the forward too.
    compiled = jax.jit(functools.partial(grads, rate=rate)).lower(
        *args).compile()
    got = [np.asarray(g) for g in compiled(*args)]
    info[name] = {
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(got, ref)),
        "all_gathers": compiled.as_text().count("all-gather")}
  # Full attention with a mask on the cuDNN path: a branch on whether the
  # mask is suffix padding, which must run per device too. cuDNN is not on
  # this machine: its call is replaced by the XLA attention it computes
  # (keys masked by length), so what is checked is the sharding around it.
  from htransformer.attention import api  # pylint: disable=g-import-not-at-top
  from htransformer.attention import full_attention  # pylint: disable=g-import-not-at-top

  def cudnn_on_cpu(q, k, v, causal, lengths, scale_dim=None):
    m = None if lengths is None else (
        jnp.arange(q.shape[1])[None] < lengths[:, None])
    return api._xla(q, k, v, causal, m, scale_dim=scale_dim)

  api._cudnn = cudnn_on_cpu
  holes = jnp.asarray(rng.random((4, 64)) < 0.5).at[:, 0].set(True)
  for label, m in (("full_suffix", mask), ("full_holes", holes)):
    def fgrads(q, k, v, m, impl):
      f = lambda *a: jnp.sum(full_attention(*a, mask=m, causal=True,
                                            implementation=impl) ** 2)
      return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    want = [np.asarray(g) for g in jax.jit(
        functools.partial(fgrads, impl="xla"))(q, k, v, m)]
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(
        jax.sharding.AxisType.Auto,) * 2)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
    spec = P("data", None, "model")
    args = [put(x, spec) for x in (q, k, v)] + [put(m, P("data"))]
    compiled = jax.jit(functools.partial(fgrads, impl="cudnn")).lower(
        *args).compile()
    got = [np.asarray(g) for g in compiled(*args)]
    info[label] = {
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(got, want)),
        "all_gathers": compiled.as_text().count("all-gather")}
  # The training step of a model with these kernels, data parallel over 4
  # (tensor parallelism has all-gathers of its own).
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from htransformer import input_pipeline, optim, tasks, train  # pylint: disable=g-import-not-at-top,g-multiple-import
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config(data_dir, **{"model.block_size": 16,
                               "model.implementation": "pallas_interpret"})
  task = tasks.get_task(c)
  graphdef, params = nnx.split(train.build_model(c, task), nnx.Param)
  tx, _ = optim.make_optimizer(c.optimizer, c.num_train_steps)
  trainer = train.Trainer(c, task, graphdef, params, tx)
  it = input_pipeline.train_iterator(task.sources["train"], c.batch_size,
                                     c.data_seed)
  step = trainer.train_step.lower(trainer.initial_state(params),
                                  trainer.global_batch(next(it))).compile()
  info["train_step"] = {"max_diff": 0.0, "all_gathers":
                        step.as_text().count("all-gather")}
  with open(out, "w") as f:
    json.dump(info, f)


def test_kernels_run_per_device_on_a_mesh(tiny_data, tmp_path):
  out = tmp_path / "kernels.json"
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "kernels",
                      tiny_data, str(out)], cwd=ROOT, env=_env(4),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  info = json.load(open(out))
  assert set(info) == {"data2_model2", "explicit", "dropout", "full_suffix",
                       "full_holes", "train_step"}
  for name, row in info.items():
    assert row["max_diff"] < 1e-5, (name, row)
    # Without shard_map the compiler gathers the batch onto every device.
    assert row["all_gathers"] == 0, (name, row)


def test_meshes_match_one_device(tiny_data, tmp_path):
  runs = {"one": (1, "1"), "four": (4, "1,2")}
  procs = {
      name: subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "steps", tiny_data,
           models, str(tmp_path / name)],
          cwd=ROOT, env=_env(n), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True)
      for name, (n, models) in runs.items()}
  try:
    for name, p in procs.items():
      out, _ = p.communicate(timeout=300)
      assert p.returncode == 0, f"{name}:\n{out[-3000:]}"
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  one = np.load(tmp_path / "one.npz")
  four = np.load(tmp_path / "four.npz")
  info = json.load(open(tmp_path / "four.json"))
  assert json.load(open(tmp_path / "one.json"))["devices"] == 1
  assert info["devices"] == 4
  assert info["1"]["mesh"] == {"data": 4, "model": 1}
  assert info["2"] == {
      "mesh": {"data": 2, "model": 2},
      "query": "P(None, 'model')",
      "out": "P('model', None)",
      "mu_fc1": "P(None, 'model')",
      "mu_fc2": "P('model', None)",
      "ln": "P()",
      "query_shard": [32, 16]}  # emb 32 x qkv 32, split over 2.
  assert info["1/odd_eval_batch"] == 8 and info["2/odd_eval_batch"] == 6
  # The batch of 8 is split over the data axis, not copied to each device.
  assert info["1/batch_rows"] == [2] * 4
  assert info["2/batch_rows"] == [4] * 4
  for model in ("1", "2"):
    np.testing.assert_allclose(four[f"{model}/eval_loss_odd"],
                               four[f"{model}/eval_loss"], rtol=1e-6)
  errors = info["errors"]
  assert "num_heads (2) must be divisible by mesh.model (4)" in errors["heads"]
  assert "mlp_dim (33) must be divisible by mesh.model (2)" in errors["mlp"]
  assert "mesh.model (3) must be >= 1 and divide the number of devices (4)" in (
      errors["devices"])
  assert "batch_size 7 must be divisible by the size of the mesh's data axis" \
      " (2 = 4 devices / mesh.model 2)" in errors["batch"]
  ref = {k[2:]: one[k] for k in one.files}
  for model in ("1", "2"):
    got = {k[len(model) + 1:]: four[k] for k in four.files
           if k.startswith(model + "/")}
    assert got.keys() == ref.keys()
    assert len(ref["losses"]) == STEPS
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"mesh.model={model}: {k}")


# ----------------------------------------------------------------------------
# Two processes through htransformer.main.


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _main_args(data_dir, workdir, steps):
  return [sys.executable, "-m", "htransformer.main",
          "--config=configs/listops.py:quick", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", "--config.max_length=40",
          "--config.model.num_layers=1", "--config.model.emb_dim=32",
          "--config.model.qkv_dim=32", "--config.model.mlp_dim=32",
          "--config.model.num_heads=2", "--config.model.block_size=4",
          "--config.batch_size=8", "--config.eval_batch_size=16",
          "--config.optimizer.schedule=constant",
          "--config.optimizer.warmup_steps=4",
          f"--config.num_train_steps={steps}", "--config.log_every=4",
          "--config.eval_every=4", "--config.checkpoint_every=4"]


def _run_two_processes(args, logdir, timeout=300):
  """Runs ``args`` as processes 0 and 1; returns their outputs.

  If one fails, the other (which would wait for it) is killed at once.
  """
  port = _free_port()
  logs = [open(os.path.join(logdir, f"process_{i}.log"), "w+")
          for i in range(2)]
  procs = [subprocess.Popen(
      args + [f"--coordinator_address=localhost:{port}",
              "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(1), stdout=log, stderr=subprocess.STDOUT, text=True)
           for i, log in enumerate(logs)]
  deadline = time.time() + timeout
  try:
    while (any(p.poll() is None for p in procs) and time.time() < deadline
           and not any(p.poll() for p in procs)):
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} (rc {p.returncode}):\n{out[-3000:]}"
  return outs


def _latest_params(workdir):
  """(step, {path: numpy array}) of the latest checkpoint, on one device.

  The checkpoint may come from another topology (two processes), so the
  target names this process's device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  path = os.path.join(ckpt_dir, str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        meta)
    state = ckptr.restore(path, target)
  flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_two_processes_match_one(tiny_data, tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  ref = subprocess.Popen(_main_args(tiny_data, single, 12), cwd=ROOT,
                         env=_env(1), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  try:
    # Two processes: 8 steps, then relaunched to 12 (resumes from step 8).
    first = _run_two_processes(_main_args(tiny_data, multi, 8), tmp_path)
    assert "Final:" in first[0] and "Final:" not in first[1]
    assert "step 4/8" in first[0] and "step 4/8" not in first[1]
    second = _run_two_processes(_main_args(tiny_data, multi, 12), tmp_path)
    assert "Resuming from step 8" in second[0]
    out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out[-3000:]
  finally:
    if ref.poll() is None:
      ref.kill()
      ref.wait()

  step_a, a = _latest_params(str(single))
  step_b, b = _latest_params(str(multi))
  assert step_a == step_b == 12
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)

  # Only process 0 wrote: every row once.
  rows = _rows(str(multi))
  assert [r["step"] for r in rows if "train_loss" in r] == [4, 8, 12]
  assert [r["step"] for r in rows if "eval_accuracy" in r] == [4, 8, 12]
  # The first launch's final test row went when the run trained on.
  assert [r["step"] for r in rows if "test_accuracy" in r] == [12]
  ref_rows = _rows(str(single))
  ref_train = [r["train_loss"] for r in ref_rows if "train_loss" in r]
  np.testing.assert_allclose(
      [r["train_loss"] for r in rows if "train_loss" in r], ref_train,
      rtol=1e-5)
  ref_test = [r for r in ref_rows if "test_accuracy" in r][-1]
  got_test = [r for r in rows if "test_accuracy" in r][-1]
  assert got_test["test_accuracy"] == pytest.approx(
      ref_test["test_accuracy"], abs=1e-6)
  results = json.load(open(multi / "results.json"))
  assert results["test_accuracy"] == got_test["test_accuracy"]


if __name__ == "__main__":
  if sys.argv[1] == "kernels":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    kernels_worker(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "steps":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    steps_worker(sys.argv[2], [int(m) for m in sys.argv[3].split(",")],
                 sys.argv[4])
