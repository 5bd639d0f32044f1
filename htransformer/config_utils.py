"""Config helpers: loading a config file by path (as ``--config=path[:arg]``
does), preparing a workdir and reading the config a run wrote into it,
setting dotted fields, and the fields every experiment config has."""

import importlib.util
import json
import os
import sys
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


def field_problem(config, key: str, source: str = "") -> str | None:
  """Why the dotted ``key`` is not a field of ``config`` (naming the fields
  of the group where it goes wrong), or None if it is one. ``source``
  (e.g. the flag it came from) is named after the key."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node.keys():
      known = (", ".join(sorted(node.keys())) if hasattr(node, "keys")
               else "(not a group)")
      where = f" (from {source})" if source else ""
      return (f"unknown config field {key!r}{where}; fields of "
              f"{'.'.join(parts[:i]) or 'config'}: {known}.")
    node = node[part]
  return None


def _read_override(config, key: str, text: str):
  """(value, None) of ``--config.KEY=TEXT`` as main.py reads it, or (None,
  why it would be refused: an unknown field, a group of fields, or a value
  the field's type does not read)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  problem = field_problem(config, key)
  if problem:
    return None, problem
  *path, last = key.split(".")
  node = config
  for name in path:
    node = node[name]
  kind = node.get_type(last) if hasattr(node, "get_type") else type(
      node[last])
  if isinstance(kind, type) and issubclass(kind, ml_collections.ConfigDict):
    return None, (f"{key} is a group of fields "
                  f"({', '.join(sorted(node[last]))}), not a value: set one "
                  "of them.")
  parser, what = {bool: (flags.BooleanParser(), "true or false"),
                  int: (flags.IntegerParser(), "an integer"),
                  float: (flags.FloatParser(), "a number")}.get(
                      kind, (None, ""))
  if parser is None:
    return text, None
  try:
    return parser.parse(text), None
  except ValueError:
    return None, (f"{key}={text}: {key} takes {what} (the config has "
                  f"{node[last]!r}).")


def override_problem(config, key: str, text: str) -> str | None:
  """Why ``--config.KEY=TEXT`` would be refused (an unknown field, a group
  of fields, or a value the field's type does not read), or None."""
  return _read_override(config, key, text)[1]


def with_overrides(config, overrides):
  """``config`` with each ``(key, text)`` of ``overrides`` set as
  ``--config.KEY=TEXT`` would set it; ValueError naming the first one
  main.py would refuse."""
  config = config.copy_and_resolve_references()
  for key, text in overrides:
    value, problem = _read_override(config, key, text)
    if problem:
      raise ValueError(problem)
    set_fields(config, **{key: value})
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


# The command line of main.py and of scripts that take the same --config.


def config_spec(argv) -> str | None:
  """The value of the last --config flag in ``argv`` (``--config=X`` or
  ``--config X``)."""
  spec = None
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a == "--":
      break
    if a in ("--config", "-config") and i + 1 < len(args):
      spec = args[i + 1]
    elif a.startswith(("--config=", "-config=")):
      spec = a.split("=", 1)[1]
  return spec


def config_file_problem(spec: str | None) -> str | None:
  """Why the config file of ``spec`` (``path[:arg]``) cannot be read."""
  if spec is None:
    return None
  path = spec.split(":", 1)[0]
  if not path:
    return f"--config={spec}: no config file named."
  if not os.path.exists(path):
    return (f"--config={spec}: no such config file: {path} (relative to "
            f"{os.getcwd()}).")
  if not os.path.isfile(path):
    return f"--config={spec}: {path} is not a file."
  if not os.access(path, os.R_OK):
    return f"--config={spec}: {path} is not readable."
  return None


def override_flag_problem(argv) -> str | None:
  """Why the first ``--config.FIELD[=VALUE]`` of ``argv`` would be refused
  (an unknown field, a group of fields, a value of the wrong type), in one
  line; None if they are all fine or the config does not load."""
  spec = config_spec(argv)
  if spec is None or config_file_problem(spec):
    return None
  try:
    config = load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return None
  for a in argv[1:]:
    if a == "--":
      break
    if not a.startswith(("--config.", "-config.")):
      continue
    field, eq, text = a.split("config.", 1)[1].partition("=")
    problem = field_problem(config, field, source=a)
    if problem:
      return f"{problem[0].upper()}{problem[1:]}"
    if eq:
      problem = override_problem(config, field, text)
      if problem:
        return problem
  return None


def _one_line(e: Exception) -> str:
  """``e`` as ``Type: message`` on one line."""
  text = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def parse_config_flags(argv):
  """absl flag parsing for a program with a ``config`` flag
  (``config_flags.DEFINE_config_file``): a config file that cannot be read
  or an override it refuses is one line, "Error: ...", and exit status 2.
  Use as ``app.run(main, flags_parser=config_utils.parse_config_flags)``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  problem = config_file_problem(config_spec(argv))
  if problem:
    print(f"Error: {problem}", file=sys.stderr)
    sys.exit(2)
  try:
    rest = flags.FLAGS(argv)
    # config_flags defers a config file that failed to load (an IOError)
    # until the config is read.
    flags.FLAGS.config.keys()  # pylint: disable=pointless-statement
    return rest
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if "Traceback (most recent call last):" in lines:  # Config file raised.
      lines = [lines[0].rstrip(":"), lines[-1]]
    message = override_flag_problem(argv) or ": ".join(lines)
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    message = (override_flag_problem(argv) or
               f"Could not load the config: {_one_line(e)}")
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(2)


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a.b.c": leaf} for a nested dict (a config as JSON)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out
