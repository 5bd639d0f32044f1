"""Checkpoints with orbax: training state plus the data iterator's position.

``WORKDIR/checkpoints`` holds the latest training states (model parameters,
optimizer state, step) together with the input iterator's state, so a run
that is killed resumes exactly where its last checkpoint left it.
``WORKDIR/best`` holds the parameters with the best validation accuracy.

With several processes, every process calls save and restore (orbax's
multi-process mode; WORKDIR must be on a shared filesystem), and each writes
its own shards of the arrays. Restoring takes the shardings from the abstract
target, so a run may resume on another mesh or process count. The data
iterator's state is its position in the process's own slice of the batches,
the same on every process, so the one JSON written by process 0 serves all.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Latest training state + iterator state, and the best-on-validation."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    workdir = os.path.abspath(workdir)
    # Several processes save synchronously: orbax's asynchronous finalize
    # could validate the array metadata before every process had written
    # its part (seen with two CPU processes).
    async_save = jax.process_count() == 1
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=opts,
        item_names=("state", "data"))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True,
            enable_async_checkpointing=async_save),
        item_names=("params", "info"))

  def latest_step(self):
    return self.latest.latest_step()

  def mismatch(self, step: int, abstract_state) -> list[str]:
    """How the checkpoint of ``step`` differs from ``abstract_state``
    (arrays only in one of them or of another shape; empty if it fits),
    read from the checkpoint's metadata without restoring anything."""
    handler = ocp.StandardCheckpointHandler()
    try:
      stored = handler.metadata(self.latest.directory / str(step) / "state")
    finally:
      handler.close()
    have, want = _shapes(stored), _shapes(abstract_state)
    show = lambda shapes, path: str(shapes.get(path, "absent"))
    return [f"{p}: checkpoint {show(have, p)}, this config {show(want, p)}"
            for p in sorted(have.keys() | want.keys(),
                            key=lambda p: (not p.startswith("params"), p))
            if have.get(p) != want.get(p)]

  def save(self, step: int, state, data_state: dict):
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)))

  def restore(self, abstract_state):
    """Restores (state, data_state) of the latest step, or None."""
    step = self.latest.latest_step()
    if step is None:
      return None
    r = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return r.state, r.data

  def save_best(self, step: int, params, info: dict):
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), info=ocp.args.JsonSave(info)),
        force=True)

  def best_info(self):
    step = self.best.latest_step()
    if step is None:
      return None
    return self.best.restore(step, args=ocp.args.Composite(
        info=ocp.args.JsonRestore())).info

  def restore_best(self, abstract_params):
    step = self.best.latest_step()
    if step is None:
      return None
    return self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params

  def wait(self):
    self.latest.wait_until_finished()
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
  mngr = ocp.CheckpointManager(folder, item_names=items)
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {folder}.")
    if best:
      return step, mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(
              on_device(abstract_state["params"])))).params
    return step, mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(
            on_device(abstract_state)))).state["params"]
  finally:
    mngr.close()
