import os

os.environ.setdefault("JAX_PLATFORMS", "cpu") if os.environ.get("GPTOSS_TEST_GPU") is None else None

# Tests compile many tiny shapes: keep them out of the user's persistent compilation cache (test_compile.py turns it
# on explicitly in a subprocess with its own folder).
os.environ.setdefault("GPTOSS_JAX_COMPILATION_CACHE", "0")

import numpy as np
import pytest


def pytest_configure(config):
    """One persistent compilation cache for the whole run, in a fresh temporary folder (never the user's): the
    suite compiles the same small programs again and again — every GptOss random init compiles one random-normal
    program per parameter shape, tests build their own jit wrappers around the same model, and the autouse fixture
    below drops jax's in-memory caches after each module — so a program compiled once is read back from disk
    afterwards instead of recompiled (same executable: jax keys the cache by the program, compile options, backend
    and versions). Only in this process: subprocesses keep their own environment (test_compile checks the cache
    a subprocess configures). GPTOSS_TEST_COMPILATION_CACHE=0 turns it off."""
    if os.environ.get("GPTOSS_TEST_COMPILATION_CACHE", "").strip().lower() in {"0", "off", "false", "no"}:
        return
    import tempfile

    import jax
    if jax.config.jax_compilation_cache_dir:  # configured by the caller: leave it
        return
    folder = tempfile.mkdtemp(prefix="gptoss-test-xla-cache-")
    config._gptoss_xla_cache = folder
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    folder = getattr(config, "_gptoss_xla_cache", None)
    if folder:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


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
