"""Compilation: the layers under one scan, each function compiled once per shape bucket, the persistent cache.

Compile *counts* come from jax's own jit caches (``_cache_size()`` of the compiled functions), not from Python
trace counters. Compile *times* live in the benchmark (bench/bench_compile.py), not here.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import checkpoint, generate
from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_loader import save_hf_checkpoint
from gptoss_jax.model import GptOss, params_of
from gptoss_jax.params import QuantSpec


def _compiles():
    return {"prefill": generate._prefill._cache_size(), "decode": generate._decode._cache_size()}


def _delta(before):
    now = _compiles()
    return {k: now[k] - before[k] for k in now}


@pytest.fixture(scope="module")
def config():
    return GptOssConfig.from_preset("tiny").replace(num_hidden_layers=4, layer_types=())


@pytest.mark.parametrize("kind", ["hf", "int4"])
def test_decode_compiles_once_and_batch_sizes_share_buckets(tmp_path, config, rng, kind):
    """A converted int4 checkpoint and a HF folder: one generate compiles prefill and decode exactly once (not twice
    as when the loop arguments changed from uncommitted to committed), and a batch of 3 after a batch of 4 (same
    bucket) compiles nothing."""
    if kind == "hf":
        module = GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(1))
        save_hf_checkpoint(params_of(module), config, tmp_path / "m")
        model = gptoss_jax.load(tmp_path / "m", dtype="float32", max_seq_len=96, tokenizer=False)
    else:
        quant = QuantSpec(group_size=32, symmetric=False)
        module = GptOss(config, dtype=jnp.bfloat16, quant=quant, rngs=nnx.Rngs(2))
        checkpoint.save_params(tmp_path / "m", params_of(module), config, dtype="bfloat16", quant=quant)
        model = gptoss_jax.load(tmp_path / "m", max_seq_len=96, tokenizer=False)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 9, 3, 7)]
    before = _compiles()
    out = model.generate(prompts, max_new_tokens=40, temperature=0)
    assert all(len(r.tokens) >= 1 for r in out)
    assert _delta(before) == {"prefill": 1, "decode": 1}  # several decode chunks, one compilation
    before = _compiles()
    again = model.generate(prompts[:3], max_new_tokens=40, temperature=0)
    assert _delta(before) == {"prefill": 0, "decode": 0}
    # the padded batch row changes nothing for the real rows
    assert [r.tokens for r in again] == [r.tokens for r in out[:3]]


def test_batch_bucket():
    assert [generate.batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert generate.batch_bucket(3, multiple=2) == 4 and generate.batch_bucket(1, multiple=4) == 4
    assert generate.batch_bucket(5, multiple=6) == 12


_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
    import gptoss_jax
    model = gptoss_jax.load(sys.argv[1], dtype="float32", max_seq_len=64, tokenizer=False)
    out = model.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)
    print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits), "tokens": out[0].tokens}))
""")


@pytest.mark.slow
def test_persistent_compilation_cache_makes_a_second_process_warm(tmp_path, config):
    module = GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(4))
    save_hf_checkpoint(params_of(module), config, tmp_path / "m")
    env = {**os.environ, "GPTOSS_JAX_COMPILATION_CACHE": str(tmp_path / "xla-cache"), "JAX_PLATFORMS": "cpu"}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(tmp_path / "m")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["dir"] == str(tmp_path / "xla-cache")
    assert any((tmp_path / "xla-cache").iterdir())  # the first process wrote executables
    assert runs[1]["hits"] > runs[0]["hits"]  # the second process loaded them instead of compiling
    assert runs[0]["tokens"] == runs[1]["tokens"]
    np.testing.assert_array_less(0, len(runs[1]["tokens"]))


def test_compilation_cache_can_be_turned_off(monkeypatch):
    from gptoss_jax import compilation
    monkeypatch.setenv(compilation.ENV, "off")
    import jax
    configured = jax.config.jax_compilation_cache_dir  # the suite's own cache (conftest.py), or the environment's
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert compilation.enable_compilation_cache() is None
        assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)
