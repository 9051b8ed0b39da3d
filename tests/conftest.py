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
