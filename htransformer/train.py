"""The training loop: one readable function, ``train_and_evaluate``.

All devices form one ``jax.make_mesh`` mesh with axes ``("data", "model")``
of sizes ``(devices / config.mesh.model, config.mesh.model)``. Batches are
split over ``data``; parameters are placed by their sharding annotations
(models.py: attention heads and MLP hidden units split over ``model``, the
rest replicated) and the optimizer state follows them. Each process feeds
its own part of the global batch (``jax.make_array_from_process_local_data``)
and only process 0 writes files other than checkpoints. A training step is a
pure function of (state, batch): dropout keys are ``fold_in(seed, step)``, so
a resumed run computes exactly what an uninterrupted one would, and the
result does not depend on the mesh beyond float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from htransformer import checkpoint as ckpt_lib
from htransformer import config_utils
from htransformer import input_pipeline
from htransformer import metrics as metrics_lib
from htransformer import models
from htransformer import optim
from htransformer import tasks
from htransformer.attention import api as attention_api

try:
  import fcntl  # POSIX: the workdir's lock (_only_run_in)
except ImportError:  # e.g. Windows: runs go unlocked
  fcntl = None


class NonFiniteLossError(RuntimeError):
  """Raised when the training or validation loss becomes NaN or inf."""


class TrainingStopped(RuntimeError):
  """Raised after SIGTERM or SIGINT stopped training and a checkpoint of the
  step reached was saved (``signum``: the signal)."""

  def __init__(self, message, signum):
    super().__init__(message)
    self.signum = signum


class _StopSignals:
  """SIGTERM and SIGINT (preemption, Ctrl-C, ``timeout``) ask the loop to
  stop after the current step; a second signal interrupts at once.

  With several processes the request is shared at log and checkpoint steps
  (every process must save the same step), otherwise seen at every step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      self._restore()
      raise KeyboardInterrupt
    self.signum = signum

  def _restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is threading.main_thread():
      self._old = {sig: signal.signal(sig, self._handle)
                   for sig in self.SIGNALS}
    try:
      yield self
    finally:
      self._restore()

  def requested(self, sync_point: bool) -> bool:
    if jax.process_count() == 1:
      return self.signum is not None
    if not sync_point:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Any process's signal stops them all (0: none).
    signum = int(np.max(multihost_utils.process_allgather(
        np.int32(self.signum or 0))))
    if signum and self.signum is None:
      self.signum = signum
    return bool(signum)


def build_model(config, task: tasks.Task, seed: int = 0) -> nnx.Module:
  """The task's model: a Decoder for language modelling, a two-tower
  DualEncoderClassifier for pairs (LRA Retrieval), else a Classifier."""
  m = config.model
  if task.kind == "lm":
    return models.Decoder(
        vocab_size=task.vocab_size, max_len=task.max_length,
        emb_dim=m.emb_dim, num_layers=m.num_layers, num_heads=m.num_heads,
        qkv_dim=m.qkv_dim, mlp_dim=m.mlp_dim, dropout_rate=m.dropout_rate,
        attention=m.attention, block_size=m.block_size,
        implementation=m.implementation or None, dtype=m.dtype,
        attention_dropout_rate=m.get("attention_dropout_rate", 0.0),
        rngs=nnx.Rngs(params=seed))
  cls = (models.DualEncoderClassifier if task.kind == "pair_classification"
         else models.Classifier)
  unattended = None
  if m.get("mask_black_pixels", False):
    if task.black_pixel_token is None:
      raise ValueError(
          f"config.model.mask_black_pixels applies to the pixel tasks "
          f"(image, pathfinder, pathx), not to {task.name!r}.")
    unattended = task.black_pixel_token
  return cls(
      num_classes=task.num_classes, vocab_size=task.vocab_size,
      max_len=task.max_length, emb_dim=m.emb_dim, num_layers=m.num_layers,
      num_heads=m.num_heads, qkv_dim=m.qkv_dim, mlp_dim=m.mlp_dim,
      dropout_rate=m.dropout_rate, attention=m.attention,
      block_size=m.block_size, pool=m.pool,
      learned_positions=m.learned_positions, unattended_token=unattended,
      head_activation=m.head_activation,
      implementation=m.implementation or None, dtype=m.dtype,
      attention_dropout_rate=m.get("attention_dropout_rate", 0.0),
      rngs=nnx.Rngs(params=seed))


def parameter_overview(params) -> tuple[str, int]:
  """A table of parameter names, shapes and sizes, and the total count."""
  rows, total = [], 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                    for k in path).removesuffix("/.value")
    rows.append((name, str(tuple(x.shape)), int(np.prod(x.shape))))
    total += rows[-1][2]
  w = max([len(r[0]) for r in rows] + [4])
  lines = [f"{'name':<{w}}  {'shape':<16} {'size':>10}"]
  lines += [f"{n:<{w}}  {s:<16} {c:>10,}" for n, s, c in rows]
  return "\n".join(lines), total


def make_mesh(model: int = 1):
  """The (data, model) mesh of all devices: (devices / model, model)."""
  n = jax.device_count()
  if model < 1 or n % model:
    raise ValueError(f"mesh.model ({model}) must be >= 1 and divide the "
                     f"number of devices ({n}).")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((n // model, model), ("data", "model"),
                       axis_types=(auto, auto))


def _loss_and_metrics(logits, targets, weights):
  """Weighted sums; targets and weights are [batch] or [batch, length]."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {"loss": jnp.sum(loss * weights), "correct": jnp.sum(
      correct * weights), "count": jnp.sum(weights)}


def make_steps(graphdef, tx, seed: int):
  """The jitted-to-be train and eval step functions."""
  base_key = jax.random.key(seed)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_key, state["step"])
    # LM items carry per-token weights (0 on padding); labels need none.
    weights = batch.get("weights", jnp.ones(batch["targets"].shape,
                                            jnp.float32))

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      logits = model(batch["inputs"], deterministic=False,
                     rngs=nnx.Rngs(dropout=rng))
      sums = _loss_and_metrics(logits, batch["targets"], weights)
      return sums["loss"] / sums["count"], sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    sums["nonfinite"] = (~jnp.isfinite(loss)).astype(jnp.float32)
    sums["grad_norm"] = optax.tree.norm(grads)
    new_state = {"step": state["step"] + 1, "params": params,
                 "opt_state": opt_state}
    return new_state, sums

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], deterministic=True)
    return _loss_and_metrics(logits, batch["targets"], batch["weights"])

  return train_step, eval_step


def init_state(params, tx) -> dict:
  """The training state at step 0: what a checkpoint's ``state`` holds."""
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(params)}


def abstract_state(params, tx) -> dict:
  """``init_state``'s shapes and dtypes, computing nothing."""
  return jax.eval_shape(lambda p: init_state(p, tx), params)


class Trainer:
  """Holds the mesh, the state's shardings, the jitted steps and helpers.

  ``params`` (from ``nnx.split``) give the state's structure and, through
  their annotations, its shardings; they may be abstract.
  """

  def __init__(self, config, task, graphdef, params, tx):
    self.config = config
    self.task = task
    self.tx = tx
    self.mesh = make_mesh(config.mesh.model)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    # Parameters by their annotations; Adam's moments have the parameters'
    # structure and annotations, so they get the same shardings.
    self.state_sharding = nnx.get_named_sharding(
        abstract_state(params, self.tx), self.mesh)
    train_step, eval_step = make_steps(graphdef, tx, config.seed)
    self.train_step = jax.jit(
        train_step, out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=0)
    self.eval_step = jax.jit(eval_step, out_shardings=self.replicated)
    # Whether every number of a tree (the parameters) is finite.
    self.all_finite = jax.jit(
        lambda tree: jnp.all(jnp.stack([jnp.isfinite(x).all()
                                        for x in jax.tree.leaves(tree)])),
        out_shardings=self.replicated)
    # Evaluation batches are padded with weight-0 rows, so eval_batch_size
    # need not divide by the data axis: it is rounded up to a multiple.
    data = self.mesh.shape["data"]
    self.eval_batch_size = -(-config.eval_batch_size // data) * data

  def describe(self) -> dict:
    """The devices and mesh the run trains on (console and results.json)."""
    return {"devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "processes": jax.process_count(),
            "mesh": dict(self.mesh.shape),
            "eval_batch_size": self.eval_batch_size}

  def initial_state(self, params):
    """Step 0 (given the parameters), placed on the mesh."""
    params = jax.device_put(params, self.state_sharding["params"])
    return jax.jit(lambda p: init_state(p, self.tx),
                   out_shardings=self.state_sharding)(params)

  def global_batch(self, local: dict):
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(v)) for k, v in local.items()}

  def evaluate(self, params, split: str) -> dict:
    totals = None
    for local in input_pipeline.eval_batches(self.task.sources[split],
                                             self.eval_batch_size):
      sums = self.eval_step(params, self.global_batch(local))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals,
                                                        sums)
    if totals is None:
      raise ValueError(f"The {split!r} split has no examples: nothing to "
                       "evaluate.")
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    out = {f"{split}_loss": float(totals["loss"]) / n,
           f"{split}_accuracy": float(totals["correct"]) / n}
    if self.task.kind == "lm":  # Per-token loss over all weighted tokens.
      out[f"{split}_perplexity"] = float(np.exp(out[f"{split}_loss"]))
      out[f"{split}_tokens"] = float(totals["count"])
    return out


# Computation dtypes a model may use (``model.dtype``; parameters stay
# float32).
DTYPES = ("float32", "bfloat16", "float16")


def _check_model_and_optimizer(config):
  """Refuses model and optimizer values that would crash deep inside the
  model or train silently on nonsense, naming the field."""
  m, opt = config.model, config.optimizer
  for name in ("num_layers", "num_heads", "emb_dim", "qkv_dim", "mlp_dim"):
    if m[name] < 1:
      raise ValueError(f"model.{name} must be >= 1, got {m[name]}.")
  if m.qkv_dim % m.num_heads:
    raise ValueError(f"model.qkv_dim ({m.qkv_dim}) must be divisible by "
                     f"model.num_heads ({m.num_heads}).")
  if m.block_size < 2 or m.block_size % 2:
    raise ValueError(f"model.block_size must be an even integer >= 2, got "
                     f"{m.block_size}.")
  choices = {"dtype": DTYPES, "attention": models.ATTENTION_KINDS,
             "pool": models.POOLING,
             "head_activation": tuple(models.HEAD_ACTIVATIONS)}
  for name, allowed in choices.items():
    if name in m and m[name] not in allowed:
      raise ValueError(f"model.{name} must be one of {allowed}, got "
                       f"{m[name]!r}.")
  implementation = m.get("implementation") or None
  if implementation is not None:
    try:
      attention_api.check_settings(m.attention, block_size=m.block_size,
                                   implementation=implementation)
    except ValueError as e:
      raise ValueError(f"model.{e}") from None
  for name in ("dropout_rate", "attention_dropout_rate"):
    if name in m and not 0.0 <= m[name] < 1.0:
      raise ValueError(f"model.{name} must be in [0, 1), got {m[name]}.")
  if not 0.0 < opt.learning_rate < float("inf"):
    raise ValueError(f"optimizer.learning_rate must be a positive number, "
                     f"got {opt.learning_rate}.")
  # The schedule computes in float32: a larger value is inf there (an inf or
  # NaN learning rate), a smaller one is 0.
  # (Compared as Python floats: against numpy's float32 scalars a value
  # past their range was cast, with an overflow warning.)
  f32 = np.finfo(np.float32)
  low, high = float(f32.smallest_subnormal), float(f32.max)
  if not low <= opt.learning_rate <= high:
    raise ValueError(f"optimizer.learning_rate must be in float32's range "
                     f"[{f32.smallest_subnormal}, {f32.max}], got "
                     f"{opt.learning_rate}.")
  if opt.schedule not in optim.SCHEDULES:
    raise ValueError(f"optimizer.schedule must be one of {optim.SCHEDULES}, "
                     f"got {opt.schedule!r}.")
  for name in ("b1", "b2"):
    if not 0.0 <= opt[name] < 1.0:
      raise ValueError(f"optimizer.{name} must be in [0, 1), got "
                       f"{opt[name]}.")
  for name in ("eps", "weight_decay", "grad_clip", "warmup_steps"):
    if not opt[name] >= 0:
      raise ValueError(f"optimizer.{name} must be >= 0, got {opt[name]}.")


def check_settings(config):
  """Raises ValueError naming the first setting of ``config`` no run can use
  on any machine (counts below 1, a model or optimizer field out of range,
  generated-data sizes the generator cannot make): what a sweep checks for
  each of its runs before starting any. The model's implementation is
  checked for its name here, for the machine in ``check_config``."""
  for name in ("batch_size", "eval_batch_size", "num_train_steps",
               "log_every", "eval_every", "checkpoint_every"):
    if config[name] < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}.")
  _check_model_and_optimizer(config)
  if config.max_length < 1:
    raise ValueError(f"max_length must be positive, got {config.max_length}.")
  tasks.check_data_config(config)


def check_config(config):
  """Raises ValueError naming the first setting of ``config`` this run cannot
  use here: ``check_settings``'s, an implementation this machine lacks, a
  mesh that does not fit the devices, batches the data axis does not
  divide."""
  check_settings(config)
  implementation = config.model.get("implementation") or None
  where = {"pallas": "gpu", "cudnn": "gpu"}.get(implementation)
  if where and jax.default_backend() != where:
    raise ValueError(
        f"model.implementation {implementation!r} runs on a GPU; this "
        f"process runs on {jax.default_backend()!r}. Leave it empty (the "
        "best available) or use 'xla'.")
  model = config.mesh.model
  if model < 1 or jax.device_count() % model:
    raise ValueError(f"mesh.model ({model}) must be >= 1 and divide the "
                     f"number of devices ({jax.device_count()}).")
  if jax.local_device_count() % model:
    # Each process feeds its own slice of the batch, so a model-parallel
    # group must not span processes.
    raise ValueError(
        f"mesh.model ({model}) must divide the number of devices of each "
        f"process ({jax.local_device_count()}).")
  for name in ("num_heads", "mlp_dim"):
    if config.model[name] % model:
      raise ValueError(f"model.{name} ({config.model[name]}) must be "
                       f"divisible by mesh.model ({model}).")
  data = jax.device_count() // model
  if config.batch_size % data:
    raise ValueError(
        f"batch_size {config.batch_size} must be divisible by the size of "
        f"the mesh's data axis ({data} = {jax.device_count()} devices / "
        f"mesh.model {model}).")


def _logged_rates(workdir: str, last_step: int) -> list[float]:
  """steps/s of every logged interval up to ``last_step`` in metrics.jsonl,
  across resumptions (a resumed run has dropped the rows after its
  checkpoint, so each logged step has one row)."""
  return [float(row["steps_per_sec"])
          for row in metrics_lib.read_metrics(workdir)
          if "steps_per_sec" in row and row["step"] <= last_step]


def _write_whole(path: str, text: str):
  """Writes ``path`` in one rename: a kill never leaves half a file (that
  a relaunch, or the sweep and reproduce scripts, would misread)."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _say(message: str):
  """``message`` on the console and in the log (a resume's warnings)."""
  logging.info(message)
  print(message, flush=True)


def _write_config(config, workdir: str):
  """WORKDIR/config.json (process 0)."""
  if jax.process_index() == 0:
    _write_whole(os.path.join(workdir, "config.json"),
                 config.to_json_best_effort(indent=2, sort_keys=True))


# Fields a resumed run may change without changing what it trains.
RESUME_FREE_FIELDS = ("num_train_steps", "log_every", "eval_every",
                      "checkpoint_every", "dry_run", "cache_dir",
                      "mesh.model", "eval_batch_size")


def config_changes(config, workdir: str,
                   free=RESUME_FREE_FIELDS) -> list[str] | None:
  """"field old -> new" for the fields of ``config`` that differ from
  WORKDIR/config.json, those in ``free`` left out; None where the workdir
  has no readable config.json."""
  try:
    return [d for d in _changed_fields(config,
                                       os.path.join(workdir, "config.json"))
            if d.split(" ", 1)[0] not in free]
  except (OSError, ValueError):
    return None


def _changed_fields(config, path: str) -> list[str]:
  """"field old -> new" for each field of ``config`` that differs from the
  config file at ``path``; OSError or ValueError if it cannot be read."""
  with open(path) as f:
    old = config_utils.flatten(json.load(f))
  new = config_utils.flatten(json.loads(config.to_json_best_effort()))
  show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
  return [f"{k} {show(old, k)} -> {show(new, k)}"
          for k in sorted(old.keys() | new.keys())
          if show(old, k) != show(new, k)]


def _config_differences(config, workdir: str) -> str:
  """Which fields of ``config`` differ from WORKDIR/config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return f"There is no {path} to compare with."
  try:
    # A dry run's own flag is no difference of the run.
    diffs = [d for d in _changed_fields(config, path)
             if not d.startswith("dry_run ")]
  except (OSError, ValueError) as e:
    return f"{path} could not be read ({e})."
  if not diffs:
    return (f"{path} holds the same values as this config, so it is not the "
            "config of that checkpoint.")
  return (f"Fields that differ from {path} (its value -> this config's): "
          + ", ".join(diffs) + ".")


def _keep_changed_config(workdir: str, step: int, diffs: list[str] | None):
  """A run resumed with other settings than WORKDIR/config.json's
  (``diffs``: ``config_changes``'s): says which on the console and keeps the
  old file as WORKDIR/config.step{step}.json, the config of the steps up to
  ``step``, before config.json takes this one."""
  path = os.path.join(workdir, "config.json")
  if not diffs:  # None: no config of the run (written by process 0)
    return
  kept = os.path.join(workdir, f"config.step{step}.json")
  with open(path) as f:
    _write_whole(kept, f.read())
  message = (f"Warning: resuming from step {step} with settings that differ "
             f"from the run's config (its value -> this one's): "
             f"{', '.join(diffs)}. The steps up to {step} ran with {kept}; "
             f"config.json now holds this config.")
  _say(message)


def _changed_total(config, workdir: str) -> int | None:
  """WORKDIR/config.json's num_train_steps where ``config`` trains to
  another total with a schedule that depends on it
  (``optim.SCHEDULES_OF_THE_TOTAL``: its learning rates change); else
  None."""
  old = (metrics_lib.read_record(workdir, "config.json") or {}).get(
      "num_train_steps")
  if (old is None or old == config.num_train_steps or
      config.optimizer.schedule not in optim.SCHEDULES_OF_THE_TOTAL):
    return None
  return old


def _note_new_total(config, step: int, schedule, old: int | None):
  """A run resumed at ``step`` to train to another num_train_steps than
  the run's ``old`` one (``_changed_total``'s), with a schedule that
  depends on it: says on the console that the learning rates from ``step``
  on follow the new total (a finished run's cosine decay had reached 0 at
  its last step: trained on, its learning rate goes up again)."""
  new = config.num_train_steps
  if old is None or step >= new:
    return
  message = (f"Note: num_train_steps changed from {old} to {new}: from step "
             f"{step} on, the {config.optimizer.schedule} learning-rate "
             f"schedule follows the new total (learning rate "
             f"{float(schedule(step)):.4g} at step {step}).")
  _say(message)


def _refuse_unfit(mismatch: list[str], step: int, config, workdir: str):
  """ValueError if the checkpoint of ``step`` does not fit ``config``
  (``mismatch``: ``Checkpointer.mismatch``'s list)."""
  if mismatch:
    raise ValueError(
        f"{workdir} holds a run whose checkpoint (step {step}) does not fit "
        f"this config ({ckpt_lib.first_mismatch(mismatch)}). "
        f"{_config_differences(config, workdir)} Use a new --workdir or the "
        "run's config.")


def _refuse_past(step: int, config, workdir: str):
  """ValueError if the checkpoint of ``step`` is past ``num_train_steps``."""
  if config.num_train_steps < step:
    raise ValueError(
        f"num_train_steps ({config.num_train_steps}) is below the step of "
        f"the checkpoint in {workdir} ({step}). Use num_train_steps >= "
        f"{step} ({step} only evaluates) or a new --workdir.")


def _restore(ckpt, state, config, workdir: str):
  """(state, data_state) of the latest checkpoint in ``workdir``, or None
  if there is none. A checkpoint this config cannot continue (other
  shapes, or a later step than ``num_train_steps``) is a ValueError,
  raised before anything in the workdir changes."""
  step = ckpt.latest_step()
  if step is None:
    return None
  target = ckpt_lib.abstract(state)
  _refuse_unfit(ckpt.mismatch(step, target), step, config, workdir)
  _refuse_past(step, config, workdir)
  return ckpt.restore(target)


@contextlib.contextmanager
def _only_run_in(workdir: str, enabled: bool = True):
  """Holds ``workdir``'s lock while the run trains: a second launch into
  it while the first still runs (a job thought dead, a relaunched sweep)
  is refused instead of writing the same checkpoints and metrics. Process
  0 holds it (flock on the folder: the system drops it when the process
  dies, even by SIGKILL); where the filesystem or the system (no fcntl)
  has no locks, runs go unlocked."""
  fd, free = None, True
  if enabled and fcntl is None:
    logging.warning("No fcntl on this system: nothing stops a second run "
                    "in %s.", workdir)
  elif enabled and jax.process_index() == 0:
    fd = os.open(workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      free = False
    except OSError as e:
      logging.warning("No lock on %s (%s): nothing stops a second run in "
                      "it.", workdir, e)
    if not free:
      os.close(fd)
      fd = None
  if enabled and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    free = bool(np.min(multihost_utils.process_allgather(np.int32(free))))
  if not free:
    raise ValueError(
        f"Another run is training in {workdir} (it holds the folder's "
        "lock): wait for it to end or stop it, or use a new --workdir.")
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; returns the final metrics.

  Resumes from the latest checkpoint in ``workdir`` if there is one.
  WORKDIR/config.json is written once the run starts from step 0 or its
  checkpoint was restored, so a refused relaunch leaves it alone. One run
  at a time trains in a workdir (a dry run does not count).
  """
  check_config(config)
  try:
    workdir = config_utils.make_workdir(workdir)
  except ValueError as e:
    raise ValueError(f"workdir {workdir!r}: {e}.") from None
  with _only_run_in(workdir, enabled=not config.dry_run):
    return _train_and_evaluate(config, workdir)


def use_compilation_cache(config) -> str | None:
  """Turns on JAX's persistent compilation cache in CACHE/jax (CACHE:
  ``config.cache_dir``, else $HTRANSFORMER_CACHE or ~/.cache/htransformer,
  where generated data goes too), so that a relaunch (a resumed run, a
  sweep's next trial of the same shapes) finds its steps compiled (the
  fused kernels' forward and backward at 65,536 tokens took 45-90 s to
  compile on an H200 host: docs/benchmarks.md).
  Left as it is where a cache is set already ($JAX_COMPILATION_CACHE_DIR)
  or caching is off ($JAX_ENABLE_COMPILATION_CACHE=false). Returns the
  cache folder in use, or None."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update(
        "jax_compilation_cache_dir",
        os.path.join(config.cache_dir or tasks.default_cache_dir(), "jax"))
  return jax.config.jax_compilation_cache_dir


def _dry_run(config, workdir: str, params, total: int) -> dict:
  """``config.dry_run``: what the run would start from, checked. A workdir
  that holds a run keeps that run's config.json, and this config must fit
  its checkpoint, as the real run would check."""
  step = ckpt_lib.latest_step(workdir)
  if step is None:
    _write_config(config, workdir)
  else:
    tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
    _refuse_unfit(ckpt_lib.mismatch(workdir, step,
                                    abstract_state(params, tx)),
                  step, config, workdir)
    _refuse_past(step, config, workdir)
    print(f"{workdir} holds a run at step {step}: this config fits its "
          "checkpoint.", flush=True)
  return {"total_parameters": total}


def _print_devices(trainer: Trainer, config):
  """The ``Devices:`` line: devices, processes, mesh (process 0)."""
  if jax.process_index() != 0:
    return
  d = trainer.describe()
  print(f"Devices: {d['devices']} x {d['device_kind']} in "
        f"{d['processes']} process(es); mesh data {d['mesh']['data']} x "
        f"model {d['mesh']['model']}"
        + (f"; evaluation batches of {d['eval_batch_size']} (eval_batch_size "
           f"{config.eval_batch_size} rounded up to a multiple of the data "
           "axis)" if d["eval_batch_size"] != config.eval_batch_size
           else ""), flush=True)


@dataclasses.dataclass
class _Start:
  """Where a launch starts (``_start``).

  state: the train state, initial or restored; resumed: from a
  checkpoint; best: the best evaluation up to the checkpoint's step (for
  the rows; None: none saved with it); saved: the evaluation whose
  parameters best/ holds (None: none); window: a stop's sums of the steps
  since the last log row (None: none).
  """
  state: dict
  resumed: bool
  best: dict | None
  saved: dict | None
  window: dict | None


def _start(ckpt, state, config, workdir: str, train_iter,
           schedule) -> _Start:
  """Restores the latest checkpoint in ``workdir`` into ``state`` and
  ``train_iter`` if there is one, and puts best/ in order: it loses the
  parameters an earlier start that left no checkpoint saved (a run from
  step 0), or an earlier attempt saved after the checkpoint with other
  settings than this launch's (they belong to a run it no longer
  continues). Says on the console what it did, keeps the run's earlier
  config where this one differs (``_keep_changed_config``) and writes
  this one as config.json. A checkpoint this config cannot continue is a
  ValueError, raised before anything in the workdir changes."""
  restored = _restore(ckpt, state, config, workdir)
  primary = jax.process_index() == 0
  if restored is None:
    dropped = ckpt.drop_best()
    if dropped is not None and primary:
      print(f"Starting from step 0: the best-on-validation parameters of an "
            f"earlier start that left no checkpoint (step {dropped}) are "
            f"removed from {os.path.join(workdir, 'best')}.", flush=True)
    _write_config(config, workdir)
    return _Start(state, False, None, None, None)

  state, data_state = restored
  best = data_state.pop("best_eval", None)  # absent in older ones
  window = data_state.pop("log_window", None)
  train_iter.set_state(data_state)
  step = int(state["step"])
  # How this launch trains otherwise than the run's config.json (read
  # before this config replaces it): other settings (those of
  # RESUME_FREE_FIELDS aside), or another total the schedule follows.
  changes = config_changes(config, workdir)
  old_total = _changed_total(config, workdir)
  saved, later = ckpt.best_info(), None
  if (saved is not None and saved["step"] > step and
      (changes or old_total is not None)):
    later = ckpt.drop_best()
    saved = None
  logging.info("Resuming from step %d.", step)
  if primary:
    print(f"Resuming from step {step}" if step < config.num_train_steps
          else f"The run in {workdir} has trained its {step} steps: "
          "evaluating its parameters again (raise num_train_steps to "
          "train on).", flush=True)
    _note_new_total(config, step, schedule, old_total)
    if later is not None:
      print(f"Resuming with other settings: the best-on-validation "
            f"parameters that an earlier attempt saved after step {step} "
            f"(step {later}) are removed from "
            f"{os.path.join(workdir, 'best')}.", flush=True)
    _keep_changed_config(workdir, step, changes)
  _write_config(config, workdir)
  return _Start(state, True, best, saved, window)


def _train_and_evaluate(config, workdir: str) -> dict:
  """train_and_evaluate in a workdir made and held."""
  cache = use_compilation_cache(config)
  logging.info("Compilation cache: %s", cache)
  task = tasks.get_task(config, workdir)
  logging.info("Task %s: data from %s; %s", task.name, task.data_dir,
               {k: len(v) for k, v in task.sources.items()})
  model = build_model(config, task, config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  overview, total = parameter_overview(params)
  if jax.process_index() == 0:
    print(overview)
    print(f"Total parameters: {total:,}", flush=True)
  if config.dry_run:
    return _dry_run(config, workdir, params, total)

  total_steps = config.num_train_steps
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps)
  trainer = Trainer(config, task, graphdef, params, tx)
  _print_devices(trainer, config)
  ckpt = ckpt_lib.Checkpointer(workdir)
  train_iter = input_pipeline.train_iterator(
      task.sources["train"], config.batch_size, config.data_seed)
  try:
    begin = _start(ckpt, trainer.initial_state(params), config, workdir,
                   train_iter, schedule)
  except ValueError:
    ckpt.close()
    raise
  state, window = begin.state, begin.window
  # The validation metric that picks the best parameters.
  metric, higher = (("eval_perplexity", False) if task.kind == "lm" else
                    ("eval_accuracy", True))
  better = lambda a, b: a > b if higher else a < b
  # best/ holds the parameters of the best evaluation the run has seen
  # since its step 0 (``saved``), those of a killed segment after its
  # checkpoint included (left out where this segment resumed with other
  # settings); the rows and the console report the best up to each step
  # (``best``, saved with every checkpoint), as an unbroken run does.
  none = {metric: -1.0 if higher else float("inf"), "step": -1}
  saved = begin.saved or none
  best = begin.best
  if best is None:  # a run from step 0, or a checkpoint without it
    best = saved if begin.resumed else none

  writer = metrics_lib.MetricWriter(workdir)
  step = start = int(state["step"])
  # metrics.jsonl reads as one run: the rows this segment writes again go.
  # A finished run's test rows at its last step go too: relaunched there it
  # writes them again; trained on, they are no longer the final ones.
  writer.rewind(step, redo_final=True)
  if jax.process_index() == 0:
    # So does results.json, the earlier end's numbers: a run trained on and
    # stopped before its new end is not finished (sweep.py and
    # reproduce_lra.py read results.json as a finished run).
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, "results.json"))
  progress = metrics_lib.Progress(total_steps, step)
  last_saved = last_logged = step
  # Whether the loss of the step after the last checkpoint, the loss of its
  # parameters, was NaN or inf (on the device until asked).
  after_save = None
  sums = None
  if window and window["start"] < step:
    # Stopped between two log steps: the next row averages over the steps
    # since the last one, those before the stop included, as an unbroken
    # run's does.
    last_logged = window["start"]
    sums = {k: np.float32(v) for k, v in window["sums"].items()}
  rates = []  # steps/s per log interval of this segment

  def save(step, sums=None):
    """Checkpoints ``step`` (``sums``: those of the steps since the last log
    row, for a stop's checkpoint). Parameters with a NaN or inf, or such a
    loss among ``sums``, are not saved: the run stops instead."""
    sums = None if sums is None else jax.device_get(sums)
    if sums is not None and sums["nonfinite"] > 0:
      raise diverged(f"Training loss became NaN or inf between steps "
                     f"{last_logged} and {step}")
    if not trainer.all_finite(state["params"]):
      raise diverged(f"Parameters became NaN or inf at step {step}")
    window = {} if sums is None else {"log_window": {
        "start": last_logged,
        "sums": {k: float(v) for k, v in sums.items()}}}
    ckpt.save(step, state, {**train_iter.get_state(), "best_eval": best,
                            **window})

  def diverged(problem: str) -> NonFiniteLossError:
    """The error that stops a run on ``problem`` (a NaN or inf), raised once
    the checkpoint being written is on disk, so that it names the step a
    relaunch resumes from; nothing is left running in the background. A
    last checkpoint whose parameters gave a NaN or inf loss at the next
    step is named as such, with the checkpoint before it."""
    ckpt.wait()
    last = ckpt.latest_step()
    bad = (last is not None and last == last_saved and
           after_save is not None and jax.device_get(after_save) > 0)
    before = ckpt.step_before(last) if bad else None
    writer.close()
    ckpt.close()
    if last is None:
      where = f"no checkpoint was saved yet in {workdir}. "
    elif not bad:
      where = (f"the last good checkpoint is step {last} in {workdir}, which "
               "a relaunch resumes from. ")
    else:
      folder = os.path.join(workdir, "checkpoints", str(last))
      where = (f"the parameters of the last checkpoint, step {last} in "
               f"{workdir}, give a NaN or inf loss at step {last + 1}: "
               f"delete {folder} to "
               + (f"resume from step {before}, the checkpoint before it. "
                  if before is not None else "start again from step 0. "))
    return NonFiniteLossError(
        f"{problem}. Stopping; {where}Lower optimizer.learning_rate or set "
        "optimizer.grad_clip.")

  # SIGTERM / SIGINT: finish the step, save it, stop (TrainingStopped).
  stop, stopped = _StopSignals(), False
  with stop.installed():
    while step < total_steps:
      batch = trainer.global_batch(next(train_iter))
      state, step_sums = trainer.train_step(state, batch)
      if step == last_saved:
        after_save = step_sums["nonfinite"]
      sums = step_sums if sums is None else jax.tree.map(jnp.add, sums,
                                                         step_sums)
      step += 1
      if step == start + 1:
        # This step compiled the step function, and the small computations
        # of a log line (adding steps' sums, the learning rate) and of a
        # checkpoint (the parameters' check) compile at their first use:
        # the rate starts after them.
        jax.block_until_ready((step_sums, schedule(step),
                               jax.tree.map(jnp.add, step_sums, step_sums),
                               trainer.all_finite(state["params"])))
        progress.restart(step)
      is_last = step == total_steps
      log_now = step % config.log_every == 0 or is_last
      eval_now = step % config.eval_every == 0 or is_last
      ckpt_now = step % config.checkpoint_every == 0 or is_last
      if log_now or ckpt_now:
        sums = jax.device_get(sums)
        if sums["nonfinite"] > 0:
          raise diverged(
              f"Training loss became NaN or inf between steps {step - 1} and "
              f"{step} (or earlier since the last log)")
        n = sums["count"]
        scalars = {"train_loss": sums["loss"] / n,
                   "train_accuracy": sums["correct"] / n,
                   "grad_norm": sums["grad_norm"] / (step - last_logged),
                   "learning_rate": float(schedule(step - 1))}
        rate = progress.report(step, scalars)
        if rate is not None:  # None: the segment's first step alone
          scalars["steps_per_sec"] = rate
          rates.append(rate)
        writer.write(step, scalars)
        sums = None
        last_logged = step
      # Evaluation comes before the checkpoint of the same step: a run
      # killed during it resumes from the checkpoint before and evaluates
      # again, rather than from this step with the evaluation lost.
      if eval_now:
        ev = trainer.evaluate(state["params"], "val")
        ev = {"eval" + k[len("val"):]: v for k, v in ev.items()}
        if not np.isfinite(ev["eval_loss"]):
          # Parameters that are no longer of any use: they become neither
          # the best nor a checkpoint, at the last step too.
          writer.write(step, ev)
          raise diverged(f"Validation loss became {ev['eval_loss']} at step "
                         f"{step}")
        if better(ev[metric], best[metric]):
          best = {metric: ev[metric], "step": step}
        if better(ev[metric], saved[metric]):
          saved = {metric: ev[metric], "step": step}
          ckpt.save_best(step, state["params"], saved)
        ev["best_" + metric] = best[metric]
        writer.write(step, ev)
        if jax.process_index() == 0:
          print(f"step {step}: eval {metric[5:]} {ev[metric]:.4f}, "
                f"loss {ev['eval_loss']:.4f} (best "
                f"{best[metric]:.4f} at step {best['step']})",
                flush=True)
      if ckpt_now:
        save(step)
        last_saved = step
      if eval_now:
        progress.restart(step)  # Evaluation time is no training time.
      if stop.requested(sync_point=log_now or ckpt_now):
        stopped = True
        break
  if last_saved != step:
    save(step, sums)
  ckpt.wait()
  if stopped:
    # Also at the last step (the signal came during its evaluation, say):
    # the test evaluation is left to the relaunch, which does only that.
    writer.close()
    ckpt.close()
    raise TrainingStopped(
        f"Stopped by {signal.Signals(stop.signum).name} at step {step} of "
        f"{total_steps}; checkpoint saved in {workdir}. Launch the same "
        "command again to "
        + ("resume." if step < total_steps else "evaluate on the test split."),
        stop.signum)

  # Final evaluation: test with the final and the best-on-val parameters.
  results = trainer.evaluate(state["params"], "test")
  best_params = ckpt.restore_best(ckpt_lib.abstract(state["params"]))
  if best_params is not None:
    b = trainer.evaluate(best_params, "test")
    results.update({f"{k}_best_eval": v for k, v in b.items()
                    if not k.endswith("_tokens")})
    results.update({"best_" + metric: saved[metric],
                    "best_eval_step": saved["step"]})
  writer.write(step, results)
  writer.close()
  ckpt.close()
  results["total_parameters"] = total
  results.update(trainer.describe())
  results["data"] = tasks.data_origin(task.data_dir)
  results["num_train_steps"] = int(config.num_train_steps)
  rates = _logged_rates(workdir, step) or rates
  if rates:
    # The median over the log intervals of every segment of the run (a
    # resumed run's earlier ones too). Compilation is outside them: the
    # clock starts after each segment's first step, and a row of that step
    # alone has no rate.
    results["steps_per_sec"] = float(np.median(rates))
    results["steps_per_sec_intervals"] = len(rates)
    if task.kind == "lm":
      results["tokens_per_sec"] = (results["steps_per_sec"] *
                                   config.batch_size * config.max_length)
  if jax.process_index() == 0:
    _write_whole(os.path.join(workdir, "results.json"),
                 json.dumps(metrics_lib.json_safe(results), indent=2,
                            sort_keys=True))
    print("Final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                f"{k} {v}" for k, v in results.items()
                                if k not in ("data", "mesh", "device_kind")),
          flush=True)
  return results
