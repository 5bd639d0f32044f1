"""Checkpoints with orbax: training state plus the data iterator's position.

``WORKDIR/checkpoints`` holds the latest training states (model parameters,
optimizer state, step) together with the input iterator's state (and the
best validation value up to that step), so a run that is killed resumes
exactly where its last checkpoint left it.
``WORKDIR/best`` holds the parameters with the best validation accuracy.

With several processes, every process calls save and restore (orbax's
multi-process mode; WORKDIR must be on a shared filesystem), and each writes
its own shards of the arrays. Restoring takes the shardings from the abstract
target, so a run may resume on another mesh or process count. The data
iterator's state is its position in the process's own slice of the batches,
the same on every process, so the one JSON written by process 0 serves all.

Both folders must be writable folders (checked when the Checkpointer is
made). A checkpoint that cannot be written (a full disk) or read (a run
copied in part, a file cut short) is a ``CheckpointError`` that names its
folder and what to do.
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath

from htransformer import config_utils


class CheckpointError(ValueError):
  """A checkpoint that cannot be written or read; the message says which
  and what to do."""


def _cause(e: Exception) -> str:
  """The error under ``e`` (orbax wraps TensorStore's) as ``Type: first
  line``: they run to many lines."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  text = lines[0] if lines else ""
  if len(text) > 300:
    text = text[:300] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _writable_folder(path: str) -> str:
  try:
    return config_utils.make_workdir(path)
  except ValueError as e:
    raise CheckpointError(f"Checkpoint folder {path}: {e}.") from None


def _step_before(manager, step: int):
  """The step of ``manager``'s checkpoint before ``step``, or None."""
  return max((s for s in manager.all_steps() if s < step), default=None)


def _without_closed_loop_errors(hook):
  """``hook`` (a ``sys.unraisablehook``) less the "Event loop is closed"
  errors of a failed restore: TensorStore's reads still under way complete
  into orbax's event loop, closed by then, and each printed a traceback
  (dozens, around and after the one-line error)."""
  if getattr(hook, "drops_closed_loop", False):
    return hook

  def without(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and
            str(e) == "Event loop is closed"):
      hook(unraisable)

  without.drops_closed_loop = True
  return without


@contextlib.contextmanager
def _reading(folder, step: int, remedy: str):
  """Turns a failure to read the checkpoint of ``step`` in ``folder`` into a
  CheckpointError that names the folder, the cause and ``remedy``. Errors of
  the device (out of memory) are not the checkpoint's and pass. While it
  reads, and for the rest of the process after a failure (the reads under
  way end after it), ``_without_closed_loop_errors``."""
  previous = sys.unraisablehook
  sys.unraisablehook = _without_closed_loop_errors(previous)
  try:
    yield
  except jax.errors.JaxRuntimeError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"The checkpoint of step {step} in {folder} cannot be read "
        f"({_cause(e)}). {remedy}.") from e
  sys.unraisablehook = previous


class Checkpointer:
  """Latest training state + iterator state, and the best-on-validation."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    workdir = os.path.abspath(workdir)
    # Refused before any training, not at the first save.
    folders = [_writable_folder(os.path.join(workdir, name))
               for name in ("checkpoints", "best")]
    # Several processes save synchronously: orbax's asynchronous finalize
    # could validate the array metadata before every process had written
    # its part (seen with two CPU processes).
    async_save = jax.process_count() == 1
    # Step folders are made in save(), so one that cannot be made (a full
    # disk) raises there; made in orbax's background threads, the failure
    # left threads waiting that held the process for 5 minutes at exit.
    async_options = ocp.AsyncOptions(create_directories_asynchronously=False)
    # A save that a kill cut short leaves its step's temporary folder
    # (STEP.orbax-checkpoint-tmp, arrays written in part); orbax replaces
    # it only if that step is saved again, so those of steps the run does
    # not save again (a stop's step, one of another checkpoint_every) are
    # removed when the run starts. The workdir's lock keeps another run out.
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save, async_options=async_options)
    self.latest = ocp.CheckpointManager(
        folders[0], options=opts, item_names=("state", "data"))
    self.best = ocp.CheckpointManager(
        folders[1],
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            async_options=async_options),
        item_names=("params", "info"))

  def latest_step(self):
    return self.latest.latest_step()

  def step_before(self, step: int):
    """The step of the checkpoint before ``step``, or None."""
    return _step_before(self.latest, step)

  def _reading(self, manager, step: int):
    """``_reading`` with the remedy for this run's folders: go on without
    best/, or resume from the checkpoint before ``step``."""
    folder = manager.directory / str(step)
    if manager is self.best:
      remedy = (f"Delete {folder} to go on without the best-on-validation "
                "parameters (the next better evaluation saves them again)")
    else:
      before = _step_before(manager, step)
      remedy = (f"Delete {folder} to resume from step {before}, the "
                "checkpoint before it" if before is not None else
                f"Delete {folder} to start the run again from step 0")
    return _reading(folder, step, remedy + ", or use a new --workdir")

  def mismatch(self, step: int, abstract_state) -> list[str]:
    """How the checkpoint of ``step`` differs from ``abstract_state``
    (arrays only in one of them or of another shape; empty if it fits),
    read from the checkpoint's metadata without restoring anything."""
    with self._reading(self.latest, step):
      return _mismatch(self.latest.directory / str(step), abstract_state)

  @contextlib.contextmanager
  def _writing(self, manager):
    """Turns a failure to write a checkpoint (this one, or the one before
    it finishing in the background) into a CheckpointError."""
    try:
      yield
    except (jax.errors.JaxRuntimeError,
            ocp.checkpoint_manager.StepAlreadyExistsError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      try:
        self.latest.reload()  # the steps on disk, not the ones begun
        last = self.latest.latest_step()
      except Exception:  # pylint: disable=broad-except
        last = None
      raise CheckpointError(
          f"Could not write a checkpoint in {manager.directory} "
          f"({_cause(e)}). Free disk space or fix the folder, then launch "
          "the same command again: it resumes from "
          + (f"step {last}." if last is not None else
             "step 0 (no checkpoint was saved).")) from e

  def save(self, step: int, state, data_state: dict):
    """Saves the training state of ``step``. The best-on-validation
    parameters saved before it are written first: a checkpoint of step N
    implies that everything up to step N, its evaluation included, is."""
    with self._writing(self.best):
      self.best.wait_until_finished()
    with self._writing(self.latest):
      self.latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state)))

  def restore(self, abstract_state):
    """Restores (state, data_state) of the latest step, or None."""
    step = self.latest.latest_step()
    if step is None:
      return None
    with self._reading(self.latest, step):
      r = self.latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore()))
    return r.state, r.data

  def save_best(self, step: int, params, info: dict):
    """Saves the best-on-validation parameters of ``step``. Those of the
    same step saved before are replaced: a run killed after them and
    resumed from an earlier checkpoint evaluates that step again, and the
    evaluation may come out better (other float rounding: another mesh or
    eval_batch_size, a GPU's nondeterminism)."""
    with self._writing(self.best):
      if step in self.best.all_steps():
        self.best.delete(step)
      self.best.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          info=ocp.args.JsonSave(info)), force=True)

  def drop_best(self):
    """Removes the best-on-validation parameters; returns their step, or
    None where there were none."""
    steps = self.best.all_steps()
    with self._writing(self.best):
      for step in steps:
        self.best.delete(step)
    return max(steps, default=None)

  def best_info(self):
    step = self.best.latest_step()
    if step is None:
      return None
    with self._reading(self.best, step):
      return self.best.restore(step, args=ocp.args.Composite(
          info=ocp.args.JsonRestore())).info

  def restore_best(self, abstract_params):
    step = self.best.latest_step()
    if step is None:
      return None
    with self._reading(self.best, step):
      return self.best.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params))).params

  def wait(self):
    with self._writing(self.latest):
      self.latest.wait_until_finished()
    with self._writing(self.best):
      self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def _shapes(tree) -> dict:
  """{"a/b/0/c": shape} of the arrays in ``tree`` (checkpoint metadata or
  ShapeDtypeStructs; keys of dicts, sequences and attributes alike)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(x, "shape"):
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(
          k, "name", k)))) for k in path)
      out[name.removesuffix("/value")] = tuple(x.shape)
  return out


def _mismatch(step_dir, abstract_state, item: str = "state") -> list[str]:
  handler = ocp.StandardCheckpointHandler()
  try:
    stored = handler.metadata(epath.Path(step_dir) / item)
  finally:
    handler.close()
  have, want = _shapes(stored), _shapes(abstract_state)
  show = lambda shapes, path: str(shapes.get(path, "absent"))
  return [f"{p}: checkpoint {show(have, p)}, this config {show(want, p)}"
          for p in sorted(have.keys() | want.keys(),
                          key=lambda p: (not p.startswith("params"), p))
          if have.get(p) != want.get(p)]


def first_mismatch(mismatch: list[str]) -> str:
  """The first of ``mismatch``'s lines and how many more there are."""
  more = f"; and {len(mismatch) - 1} more" if len(mismatch) > 1 else ""
  return mismatch[0] + more


def mismatch(workdir: str, step: int, abstract_state) -> list[str]:
  """``Checkpointer.mismatch`` of WORKDIR's checkpoint of ``step``, creating
  nothing (a dry run's check); CheckpointError if it cannot be read."""
  folder = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  with _reading(folder, step, f"Delete {folder}, or use a new --workdir"):
    return _mismatch(folder, abstract_state)


def latest_step(workdir: str):
  """The step of the latest checkpoint in ``workdir``, or None; creates
  nothing."""
  folder = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(folder):
    return None
  mngr = ocp.CheckpointManager(
      folder, options=ocp.CheckpointManagerOptions(create=False),
      item_names=("state", "data"))
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) describing ``tree``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      tree)


def restore_params(workdir: str, abstract_state, best: bool = False):
  """(step, parameters) of a run's latest checkpoint, or of its
  best-on-validation one, on one device: for reading a finished run
  (sampling, inspection), not for resuming it. ``abstract_state``: the
  training state's structure (``train.abstract_state``)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  on_device = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      tree)
  # orbax takes absolute paths only; users type relative ones.
  folder = os.path.join(os.path.abspath(workdir),
                        "best" if best else "checkpoints")
  items = ("params", "info") if best else ("state", "data")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"No checkpoint in {folder}: no such folder.")
  mngr = ocp.CheckpointManager(
      folder, options=ocp.CheckpointManagerOptions(create=False),
      item_names=items)
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {folder}.")
    step_folder = os.path.join(folder, str(step))
    before = _step_before(mngr, step)
    remedy = "Copy the run's folder again in full" + (
        f", or delete {step_folder} to read step {before}"
        if before is not None else "")
    with _reading(step_folder, step, remedy):
      item, target = (("params", abstract_state["params"]) if best else
                      ("state", abstract_state))
      mismatch = _mismatch(step_folder, target, item)
    if mismatch:
      raise ValueError(
          f"The model that {os.path.join(workdir, 'config.json')} describes "
          f"does not fit the checkpoint of step {step} in {folder} "
          f"({first_mismatch(mismatch)}): the config is not the run's (was it "
          "edited?). The checkpoint is as the run left it.")
    with _reading(step_folder, step, remedy):
      if best:
        return step, mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(
                on_device(abstract_state["params"])))).params
      return step, mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(
              on_device(abstract_state)))).state["params"]
  finally:
    mngr.close()
