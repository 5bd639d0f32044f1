"""Config helpers: loading a config file by path (as ``--config=path[:arg]``
does), preparing a workdir and reading the config a run wrote into it,
setting dotted fields, and the fields every experiment config has."""

import importlib.util
import json
import os
import tempfile


def load_config(spec: str):
  """``path[:arg]`` -> the ConfigDict of ``get_config(arg)`` in that file."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def make_workdir(workdir: str) -> str:
  """Creates ``workdir`` if needed; its absolute path.

  Raises ValueError saying what is wrong (to be prefixed with the path)
  when it is empty, cannot be created or is not a writable folder.
  """
  if not workdir or not workdir.strip():
    raise ValueError("empty: name the folder for checkpoints and metrics")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError("exists and is not a folder")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    parent = path
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise ValueError(f"cannot create it: {parent} is not a folder") from None
    raise ValueError(f"cannot create it: {e.strerror or e}") from None
  try:
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ValueError(f"cannot write into it: {e.strerror or e}") from None
  return path


def read_run_config(workdir: str):
  """The resolved config a run wrote into its workdir (``config.json``)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config.json in {workdir}: not a run's "
                            "workdir.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def set_fields(config, **fields):
  """Sets dotted fields, e.g. ``set_fields(c, **{"model.num_layers": 2})``.

  Unknown fields raise (a locked config's own error names them).
  """
  for key, value in fields.items():
    node = config
    *path, last = key.split(".")
    for name in path:
      node = node[name]
    node[last] = value
  return config


def parse_variants(arg: str, allowed, config_file: str) -> set:
  """The comma-separated variants in ``arg``; an unknown one is named."""
  variants = {v for v in arg.split(",") if v}
  unknown = variants - set(allowed)
  if unknown:
    raise ValueError(f"Unknown variant(s) {sorted(unknown)} of {config_file}: "
                     f"use '' or a comma-separated subset of {tuple(allowed)}.")
  return variants


def experiment_config(task: str, *, max_length: int, model: dict,
                      optimizer: dict, batch_size: int, eval_batch_size: int,
                      num_train_steps: int, log_every: int, eval_every: int,
                      checkpoint_every: int, data: dict | None = None):
  """The fields every experiment config has, with the project's defaults.

  ``model`` and ``optimizer`` hold each experiment's own values; unless they
  say otherwise, the model uses hierarchical attention (block_size 16,
  implementation chosen automatically), dropout 0.1, no attention dropout
  (``model.attention_dropout_rate``, LRA's code used 0.1), bfloat16 and a GELU
  between the classifier head's two layers (LRA's code had a ReLU there;
  ``model.head_activation``), and Adam
  has b1 0.9, b2 0.98, eps 1e-9 and no gradient clipping. Data come from
  ``data_dir`` (empty: generated or downloaded into ``cache_dir``); the mesh
  is data parallel (``mesh.model`` = 1); seeds are 0.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.task = task
  c.data_dir = ""
  c.cache_dir = ""
  if data is not None:
    c.data = ml_collections.ConfigDict(data)
  c.max_length = max_length
  c.model = ml_collections.ConfigDict({
      "attention": "hierarchical", "block_size": 16, "implementation": "",
      "dropout_rate": 0.1, "attention_dropout_rate": 0.0, "dtype": "bfloat16",
      "head_activation": "gelu",
      **model})
  # Device mesh: (data, model) = (devices / mesh.model, mesh.model).
  c.mesh = ml_collections.ConfigDict(dict(model=1))
  c.optimizer = ml_collections.ConfigDict({
      "b1": 0.9, "b2": 0.98, "eps": 1e-9, "grad_clip": 0.0, **optimizer})
  c.batch_size = batch_size
  c.eval_batch_size = eval_batch_size
  c.num_train_steps = num_train_steps
  c.log_every = log_every
  c.eval_every = eval_every
  c.checkpoint_every = checkpoint_every
  c.seed = 0
  c.data_seed = 0
  c.dry_run = False
  return c
