import os

os.environ.setdefault("JAX_PLATFORMS", "cpu") if os.environ.get("GPTOSS_TEST_GPU") is None else None

# Tests compile many tiny shapes: keep them out of the user's persistent compilation cache (test_compile.py turns it
# on explicitly in a subprocess with its own folder).
os.environ.setdefault("GPTOSS_JAX_COMPILATION_CACHE", "0")

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A fresh, seeded-by-entropy numpy generator: tests draw new random inputs on every run; the seed is printed
    on failure so a failing draw can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module: drop jax's compiled executables and trace caches and collect garbage. One pytest
    process compiles thousands of tiny programs over the suite; without this its memory only grows (two CI runs
    ended in an XLA abort / segfault while compiling late in the suite)."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
