"""Helpers shared by the tests: the scripts of scripts/ as modules, and the
environment of the processes the tests start."""

import importlib.util
import os

from htransformer import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU code optimisation; the suite turns it off (tests/conftest.py)
# except in the processes that run many steps (child_env(optimised=True)).
OPT_FLAG = "--xla_backend_optimization_level"
# XLA's CPU fusion emitters; the suite turns them off where this XLA knows
# the flag (their code takes about twice as long to build), with OPT_FLAG.
FUSION_FLAG = "--xla_cpu_use_fusion_emitters"
# The least compile time for which XLA keeps a computation in the
# persistent cache (tests/conftest.py: 0.2 s in the suite's processes).
MIN_COMPILE_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def load_script(name: str):
  """scripts/<name>.py, executed as a module named ``name``."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def child_env(*, optimised: bool = False, drop_xla_flags=(),
              add_xla_flags=(), **variables):
  """This process's environment for a child process run from ROOT.

  The repository goes first on PYTHONPATH, ahead of what was there (a
  machine whose packages come through PYTHONPATH keeps them). ``variables``
  are set as given (e.g. JAX_PLATFORMS="cpu"). XLA_FLAGS loses the flags
  named in ``drop_xla_flags`` (OPT_FLAG and FUSION_FLAG too when
  ``optimised``: the child builds XLA's default optimised code) and gains
  ``add_xla_flags``.

  The child keeps every computation it compiles in the persistent cache
  (MIN_COMPILE_TIME 0, unless ``variables`` set it): the processes the
  tests start mostly compile the same small programs (the tiny models'
  steps, their evaluation, the checkpoint's), each under the suite's 0.2 s
  (about 35 of them, ~1 s, in every run of the tiny ListOps job), and the
  next process reads them back instead.
  """
  variables.setdefault(MIN_COMPILE_TIME, "0")
  env = launch.env_with_path(ROOT, **variables)
  drop = set(drop_xla_flags) | ({OPT_FLAG, FUSION_FLAG} if optimised
                                else set())
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if f.split("=")[0] not in drop]
  env["XLA_FLAGS"] = " ".join(flags + list(add_xla_flags))
  return env


def jaxpr_equations(jaxpr, skip=("pallas_call",)):
  """The equations of ``jaxpr`` and of the jaxprs inside them (jit, custom
  VJP, loops...), depth first; the bodies of the primitives named in
  ``skip`` (the fused kernels') are not entered."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name in skip:
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from jaxpr_equations(sub, skip)
