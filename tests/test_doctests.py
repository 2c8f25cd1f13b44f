"""Every docstring example in the library runs (``>>>`` examples are doctests)."""

import doctest
import importlib
import pkgutil

import pytest

import lowrank_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(lowrank_jax.__path__, "lowrank_jax."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"


def test_the_core_imports_only_what_the_core_needs():
    """``import lowrank_jax`` pulls in none of the application layer's dependencies (``[app]`` extra)."""
    import subprocess
    import sys

    code = ("import sys, lowrank_jax; bad = sorted(m for m in ('tqdm', 'matplotlib', 'tokenizers', 'gguf', 'torch') "
            "if m in sys.modules); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import lowrank_jax imported {out}"
