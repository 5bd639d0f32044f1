"""Loading a script of scripts/ as a module, for the tests of its functions."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
  """scripts/<name>.py, executed as a module named ``name``."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
