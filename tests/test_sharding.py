"""Sharding rules, mesh builder, MoE shard_map and sharded restore.

In-process tests use the one CPU device pytest has. The multi-device ones run tests/sharding_worker.py in fresh
processes with XLA_FLAGS=--xla_force_host_platform_device_count=N (jax reads it once, at start-up).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptoss_jax import params as P_
from gptoss_jax import sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import build_model, params_of, shard_model
from gptoss_jax.model import GptOss
from gptoss_jax.moe_parallel import MoEParallel
from gptoss_jax.params import QuantSpec

ROOT = Path(__file__).resolve().parent.parent
E, T, D = sharding.EXPERT, sharding.TENSOR, sharding.DATA


def abstract_mesh(data, expert, tensor):
    return jax.sharding.AbstractMesh((data, expert, tensor), sharding.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)


# ------------------------------------------------------------------------------------------ mesh arg and errors
def test_parse_mesh_arg():
    assert sharding.parse_mesh_arg("1,4,2") == (1, 4, 2)
    assert sharding.parse_mesh_arg(" 2, 2 ,2 ") == (2, 2, 2)
    assert sharding.parse_mesh_arg("expert=4") == (None, 4, None)
    assert sharding.parse_mesh_arg("data=2,tensor=2") == (2, None, 2)
    assert sharding.parse_mesh_arg(None) == sharding.parse_mesh_arg("auto") == (None, None, None)
    for bad in ("1,4", "a,b,c", "1,0,1", "pipeline=2", "1,2,3,4"):
        with pytest.raises(sharding.ShardingError, match="--mesh"):
            sharding.parse_mesh_arg(bad)


def test_make_mesh_defaults_use_all_devices():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == sharding.MESH_AXES
    assert mesh.devices.size == jax.device_count()
    assert dict(mesh.shape) == {D: 1, E: jax.device_count(), T: 1}


def test_impossible_meshes_fail_clearly():
    tiny = GptOssConfig.from_preset("tiny")  # 8 experts, 8 heads, 2 KV heads
    n = jax.device_count()
    with pytest.raises(sharding.ShardingError, match=rf"needs {2 * n} devices but only {n} are present"):
        sharding.make_mesh(1, 2 * n, 1)
    with pytest.raises(sharding.ShardingError, match=r"num_local_experts=8 is not divisible .*expert"):
        sharding.make_mesh(1, 3, 1, config=tiny)
    with pytest.raises(sharding.ShardingError, match=r"num_key_value_heads=2 is not divisible .*tensor"):
        sharding.make_mesh(1, 1, 4, config=tiny)
    only_experts_on_expert = {**sharding.RULES, P_.EXPERTS: E}
    with pytest.raises(sharding.ShardingError, match=r"num_attention_heads=8 is not divisible"):
        sharding.validate_mesh_shape(tiny.replace(num_key_value_heads=1), {D: 1, E: 1, T: 3},
                                     only_experts_on_expert)
    with pytest.raises(sharding.ShardingError, match="positive integer"):
        sharding.make_mesh(0, 1, 1)


def test_rules_table_covers_every_parameter_of_gpt_oss_120b():
    config = GptOssConfig.from_preset("gpt-oss-120b")
    specs = P_.param_specs(config, dtype=jnp.bfloat16, quant=QuantSpec(group_size=32))
    mesh = abstract_mesh(1, 4, 2)
    parts = sharding.param_partition_specs(specs, mesh)
    layer = parts["layers"][0]
    assert parts["embed"]["embedding"] == P((E, T))  # vocab rows
    assert parts["lm_head"]["weight"] == P(None, (E, T))  # vocab columns
    assert layer["attn"]["q_proj"]["weight"]["packed"] == P(None, T)
    assert layer["attn"]["k_proj"]["weight"]["scales"] == P(None, T)
    # params.py gives packed / group dims no logical axis, so int4 o_proj rows stay whole (replicated over tensor)
    assert layer["attn"]["o_proj"]["weight"]["packed"] == P()
    assert layer["attn"]["o_proj"]["bias"] == P()
    assert layer["attn"]["sinks"] == P(T)
    assert layer["mlp"]["router"]["weight"] == P()
    for name in ("gate_up", "down"):
        for part in ("packed", "scales"):
            assert layer["mlp"]["experts"][name][part] == P((E, T))
    assert layer["mlp"]["experts"]["down_bias"] == P((E, T))
    # each of the 8 devices holds 128 / 8 = 16 whole experts: packed [16, 2880/8, 5760]
    shard = jax.sharding.NamedSharding(mesh, layer["mlp"]["experts"]["gate_up"]["packed"])
    assert shard.shard_shape(specs["layers"][0]["mlp"]["experts"]["gate_up"]["packed"].shape) == (16, 360, 5760)


def test_spec_for_divisibility():
    mesh = abstract_mesh(1, 3, 1)
    # vocab not divisible by 3: replicated, not an error
    assert sharding.spec_for((P_.VOCAB, P_.EMBED), (1024, 64), mesh) == P()
    with pytest.raises(sharding.ShardingError, match=r"layers.0.mlp.experts.down_bias: dim 0 \(experts\)"):
        sharding.spec_for((P_.EXPERTS, P_.EXPERT_EMBED), (8, 64), mesh, name="layers.0.mlp.experts.down_bias")
    clash = {**sharding.RULES, P_.MLP: T}
    with pytest.raises(sharding.ShardingError, match="would split both"):
        sharding.spec_for((P_.EXPERTS, P_.EXPERT_EMBED, P_.MLP), (8, 64, 64), abstract_mesh(1, 2, 2), rules=clash)
    with pytest.raises(sharding.ShardingError, match="no entry"):
        sharding.spec_for(("pipeline",))


def test_maybe_initialize_distributed_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(sharding.ShardingError, match="JAX_NUM_PROCESSES"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(sharding.ShardingError, match="outside"):
        sharding.maybe_initialize_distributed()


# ------------------------------------------------------------------------------------- one device, same code path
@pytest.mark.parametrize("strategy", ["replicated", "dispatch"])
def test_shard_model_on_one_device_matches_unsharded(rng, strategy):
    config = GptOssConfig.from_preset("tiny").replace(num_hidden_layers=2, layer_types=())
    base = GptOss(config, dtype=jnp.float32, quant=QuantSpec(group_size=32), rngs=nnx.Rngs(int(rng.integers(99))))
    params = params_of(base)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 5)), jnp.int32)
    forward = nnx.jit(lambda m, t: m(t)[0])
    want = forward(base, tokens)
    model = shard_model(build_model(config, params, dtype=jnp.float32,
                                                   quant=QuantSpec(group_size=32)),
                                 sharding.make_mesh(1, 1, 1), moe_strategy=strategy)
    assert isinstance(model.layers.mlp.parallel, MoEParallel)
    got = forward(model, tokens)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert not np.isnan(np.asarray(got)).any()


# ------------------------------------------------------------------------------------------- 8 virtual devices
def _run_worker(args, devices, extra_env=None, timeout=600):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-m", "tests.sharding_worker", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _json_lines(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.multidevice
def test_meshes_match_one_device():
    """(1,8,1), (2,4,1), (1,4,2), (2,2,2) × both MoE strategies: prefill + decode logits and greedy tokens equal
    the one-device run (fp32 compute ≤ 1e-5 relative; bf16 fed the same tokens ≤ 1e-2), float and int4 experts."""
    results = _json_lines(_run_worker(["equivalence"], 8))
    seen = set()
    for r in results:
        label = f"{r['variant']} mesh={r['mesh']} {r['strategy']} {r['rules']}"
        assert not r["nan"], label
        tol = 1e-2 if "bf16" in r["variant"] else 1e-5
        assert r["prefill_rel_err"] <= tol, (label, r)
        assert r["decode_rel_err"] <= tol, (label, r)
        assert r["tokens_equal"], (label, r["tokens"], r["ref_tokens"])
        n_shards = {"default": r["mesh"][1] * r["mesh"][2], "experts_over_data": 8}[r["rules"]]
        assert r["expert_bias_shard_shapes"] == [[2, 8 // n_shards, 256]], label  # [L, E / n, H]: E / n experts per device
        seen.add((r["variant"], tuple(r["mesh"]), r["strategy"]))
    for mesh in [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]:
        for strategy in ("replicated", "dispatch"):
            assert ("int4-fp32", mesh, strategy) in seen
    assert {v for v, _, _ in seen} == {"int4-fp32", "fp32", "bf16", "int4-bf16"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multidevice
@pytest.mark.parametrize("fmt", ["converter", "tree"])
def test_sharded_restore_reads_only_local_shards(tmp_path, fmt):
    """4 processes × 2 CPU devices (jax.distributed, the multi-host code path) restore a checkpoint onto a (1,8,1)
    mesh — the converter's item-per-layer format through sharding.restore_params, and a plain Orbax tree through
    restore_orbax_tree: every local shard has its expected shape and values, and each process's peak host memory
    grows by less than the checkpoint's size (no process holds a full copy)."""
    ckpt = tmp_path / "ckpt"
    saved = _json_lines(_run_worker(["save", str(ckpt), fmt], 8))[0]
    port = _free_port()
    # glibc's malloc otherwise keeps freed read buffers of earlier items mapped (its dynamic mmap threshold):
    # reusable, but counted in RSS; a fixed threshold makes RSS show the memory actually in use.
    env = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="4", MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="0")
    procs = [_run_worker(["restore", str(ckpt), fmt], 2, {**env, "JAX_PROCESS_ID": str(i)}) for i in range(4)]
    results = [_json_lines(p)[0] for p in procs]
    assert sorted(r["process"] for r in results) == [0, 1, 2, 3]
    for r in results:
        assert r["processes"] == 4 and r["devices"] == 8 and r["local_devices"] == 2
        assert r["checkpoint_bytes"] == saved["nbytes"]
        assert r["bad_shapes"] == [] and r["shards_ok"] > 0, r
        assert r["mismatched_shards"] == 0, r
        assert r["experts_down_shard_shape"] == [2, 512, 256]  # 16 experts / 8 devices
        assert r["hwm_reset"], "kernel without /proc/self/clear_refs: cannot measure the restore's peak"
        assert r["rss_increase_bytes"] < r["checkpoint_bytes"], r
        transient = r["rss_increase_bytes"] - r["local_shard_bytes"]  # host memory beyond what its devices hold
        if fmt == "tree":  # stored chunks = shards: a process reads only its shards
            assert transient < r["checkpoint_bytes"] / 4, r
        else:  # one item (a layer: 1/8 of this checkpoint) at a time, whole stored arrays read and sliced, and
            # written into the stacked arrays: in place where buffers can be donated (GPU/TPU); XLA:CPU cannot
            # donate, so here each layer's write copies that stacked leaf's local part once more (≈ 1/4 of the
            # experts' bytes on this process): a bound of about half the checkpoint, still far below all of it
            assert transient < r["checkpoint_bytes"] * 0.6, r


@pytest.mark.multidevice
def test_two_processes_match_one_device():
    """The multi-host code path on one machine: 2 processes × 4 CPU devices under jax.distributed
    (maybe_initialize_distributed from JAX_* env vars), a (2,2,2) mesh across both — prefill + decode with
    both MoE strategies equal each process's own one-device run."""
    port = _free_port()
    env = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2")
    procs = [_run_worker(["multihost_forward"], 4, {**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    results = [r for p in procs for r in _json_lines(p)]
    assert sorted((r["process"], r["strategy"]) for r in results) == [
        (0, "dispatch"), (0, "replicated"), (1, "dispatch"), (1, "replicated")]
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 8
        assert not r["nan"], r
        assert r["prefill_rel_err"] <= 1e-5 and r["decode_rel_err"] <= 1e-5, r
        assert r["tokens_equal"], r
