"""Shared pytest setup.

Makes the repository root importable, so that `pytest tests/` works as well as
`python -m pytest tests/` (the package is not installed into the venv).

jax_enable_x64 is deliberately NOT enabled globally: the attention tests
compute their references in numpy float64, and tests that need float64 inside
JAX use the `jax.enable_x64(True)` context manager locally.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
