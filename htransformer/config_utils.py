"""Loading a config file by path, as ``--config=path[:arg]`` does."""

import importlib.util


def load_config(spec: str):
  """``path[:arg]`` -> the ConfigDict of ``get_config(arg)`` in that file."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


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
