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


import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small ListOps dataset in the LRA layout (400/64/64, 5-40 tokens)."""
    from htransformer.data import listops  # pylint: disable=g-import-not-at-top
    d = str(tmp_path_factory.mktemp("listops_tiny"))
    listops.generate(d, num_train=400, num_val=64, num_test=64, seed=0,
                     min_length=5, max_length=40, workers=1)
    return d
