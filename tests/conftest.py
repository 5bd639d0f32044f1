"""Shared pytest setup.

Makes the repository root importable, so that `pytest tests/` works as well as
`python -m pytest tests/` (the package is not installed into the venv).

jax_enable_x64 is deliberately NOT enabled globally: the attention tests
compute their references in numpy float64, and tests that need float64 inside
JAX use the `jax.enable_x64(True)` context manager locally.
"""

import os
import shutil
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# One persistent XLA compilation cache per test run, shared by the pytest
# workers and the processes the tests start (they inherit the environment):
# many tests compile the same small models and kernels, and a computation
# compiled once is read back instead of compiled again. Set before JAX is
# imported; a cache the caller set is kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:  # The workers inherit the first process's.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="htransformer-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# The suite runs on the CPU wherever it runs, a GPU host included: its
# exact comparisons and interpreted kernels are written for XLA's CPU. The
# checks that need an accelerator (tests/test_gpu.py) run where the caller
# asks for it, HTRANSFORMER_TEST_ACCELERATOR=1 (`make test-gpu`), or names
# the platforms (JAX_PLATFORMS).
if not os.environ.get("HTRANSFORMER_TEST_ACCELERATOR"):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
  # Several pytest workers (`-n`) share one GPU: each takes memory as it
  # needs it, instead of JAX's default of most of the card for the first
  # process (the others then fail to start, and every test with them). A
  # caller's choice is kept.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # On an accelerator the rest of the suite still compares float32 results
  # with the float64 definition to 2e-5, which needs float32 products in
  # full: JAX's default on recent NVIDIA GPUs is TF32 (1e-3 off). It asks
  # for them there (its workers and child processes inherit it) unless the
  # caller chose a precision; tests/test_gpu.py goes back to JAX's default,
  # since its checks are of what users run.
  if "JAX_DEFAULT_MATMUL_PRECISION" not in os.environ:
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    os.environ["HTRANSFORMER_TEST_SET_PRECISION"] = "1"

# Most of the suite's time on a CPU is XLA compiling (the interpreted
# kernels, the small models of many tests), not running: LLVM without
# optimisation compiles them about a third faster, and XLA's CPU code built
# without its fusion emitters (where this XLA has the flag: an unknown flag
# stops XLA, so a child process tries it first) a third faster again, in
# this process, its workers and the processes they start. Tests that run
# long computations ask for optimised code (tests/scripts_helper.py,
# child_env). Only on the CPU (the flags would reach a GPU compiler too),
# and not when the caller chose a level.
from tests.scripts_helper import FUSION_FLAG, OPT_FLAG  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _xla_takes(flag: str) -> bool:
  """Whether this XLA starts with ``flag`` in XLA_FLAGS."""
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  probe = "import jax; jax.numpy.ones(2).block_until_ready()"
  return subprocess.run([sys.executable, "-c", probe], env=env,
                        capture_output=True, timeout=120).returncode == 0


if (os.environ.get("JAX_PLATFORMS") == "cpu"
    and OPT_FLAG not in os.environ.get("XLA_FLAGS", "")):
  _fast = [f"{OPT_FLAG}=0"]
  if FUSION_FLAG not in os.environ.get("XLA_FLAGS", "") and _xla_takes(
      f"{FUSION_FLAG}=false"):
    _fast.append(f"{FUSION_FLAG}=false")
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", "")] + _fast).strip()


import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small ListOps dataset in the LRA layout (400/64/64, 5-40 tokens)."""
    from htransformer.data import listops  # pylint: disable=g-import-not-at-top
    d = str(tmp_path_factory.mktemp("listops_tiny"))
    listops.generate(d, num_train=400, num_val=64, num_test=64, seed=0,
                     min_length=5, max_length=40, workers=1)
    return d


def pytest_sessionfinish(session):
    """The run's compilation cache goes with the run (the first process's
    finish: not a worker's)."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"],
                      ignore_errors=True)
