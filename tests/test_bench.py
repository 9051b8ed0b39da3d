"""`gptoss-jax bench` (gptoss_jax/bench.py): the decode roofline against a hand count, the expected expert count
against simulation, the trace parser on synthetic traces, the random weights, argument errors, and one end-to-end
run on the tiny preset whose JSON must be complete, finite and self-consistent."""

import gzip
import json
import math
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import bench, cli
from gptoss_jax.config import GptOssConfig
from gptoss_jax.params import QuantSpec, iter_specs, model_specs, path_str

TINY = GptOssConfig.from_preset("tiny")  # hidden 256, intermediate 256, 4 layers, 8 experts top-2, 8/2 heads × 32


# ------------------------------------------------------------------------------------------------------ roofline
def test_expected_experts_touched_matches_simulation(rng):
    for experts, k, tokens in [(8, 2, 1), (8, 2, 3), (128, 4, 64), (32, 4, 256), (4, 4, 5)]:
        trials = 1000
        picks = np.argsort(rng.random((trials, tokens, experts)), axis=-1)[..., :k]  # k distinct per token
        hit = np.zeros((trials, experts), bool)
        np.put_along_axis(hit, picks.reshape(trials, -1), True, axis=1)
        counts = hit.sum(1)
        want = bench.expected_experts_touched(experts, k, tokens)
        assert abs(counts.mean() - want) <= 4 * counts.std() / math.sqrt(trials) + 1e-9, (experts, k, tokens)
    assert bench.expected_experts_touched(128, 4, 1) == pytest.approx(4.0)
    assert bench.expected_experts_touched(128, 4, 64) == pytest.approx(111.2, abs=0.1)  # issue 11's "≈111"


def _hand_count(c, *, batch, context, quant):
    """Bytes of one decode step of the tiny config, written out by hand from the int4 layout (packed int32 words of 8
    codes, bf16 scales and uint8 zero points per group of `g` input rows) — independent of param_specs."""
    h, i, e, v = c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def weight(k, n):  # [k, n] weight
        if quant is None:
            return k * n * 2
        g = quant.group_size
        return k // 8 * n * 4 + k // g * n * 2 + (0 if quant.symmetric else k // g * n)

    expert = weight(h, 2 * i) + 2 * i * 2 + weight(i, h) + h * 2  # gate_up + bias, down + bias
    other = (weight(h, q) + q * 2 + 2 * (weight(h, kv) + kv * 2) + weight(q, h) + h * 2  # q, k, v, o + biases
             + c.num_attention_heads * 2 + 2 * h * 2 + h * e * 2 + e * 2)  # sinks, 2 norms, router
    touched = e * (1 - (1 - c.num_experts_per_tok / e) ** batch)
    slots = sum(min(context, c.sliding_window) if c.layer_types[li] == "sliding_attention" else context
                for li in range(c.num_hidden_layers))
    kv_bytes = batch * slots * (2 * c.num_key_value_heads * c.head_dim * 2 + 4)
    return (c.num_hidden_layers * (touched * expert + other) + h * v * 2 + h * 2 + batch * h * 2 + kv_bytes,
            expert, other)


@pytest.mark.parametrize("quant", [QuantSpec(32, symmetric=False), QuantSpec(64, symmetric=True), None],
                         ids=["g32-asym", "g64-sym", "bf16"])
@pytest.mark.parametrize("batch, context", [(1, 5), (3, 40), (64, 1000)])
def test_decode_step_bytes_equals_a_hand_count(quant, batch, context):
    got = bench.decode_step_bytes(TINY, dtype=jnp.bfloat16, quant=quant, batch=batch, context=context)
    total, expert, other = _hand_count(TINY, batch=batch, context=context, quant=quant)
    assert got["expert_bytes"] == expert and got["layer_other"] == TINY.num_hidden_layers * other
    assert got["total"] == pytest.approx(total, rel=1e-12)
    parts = ("experts", "layer_other", "lm_head", "embed", "kv_cache")
    assert got["total"] == pytest.approx(sum(got[p] for p in parts), rel=1e-12)
    assert all(math.isfinite(got[p]) and got[p] > 0 for p in parts)


def test_decode_step_bytes_of_the_120b_shape():
    """Issue 11: a batch-1 step of gpt-oss-120b with int4 g32 asymmetric weights reads ≈3.66 GiB (4 experts × 36
    layers, int4 attention, bf16 lm_head)."""
    c = GptOssConfig.from_preset("gpt-oss-120b")
    got = bench.decode_step_bytes(c, dtype=jnp.bfloat16, quant=QuantSpec(32, symmetric=False), batch=1, context=1)
    assert got["total"] / 2**30 == pytest.approx(3.6, abs=0.1)
    assert got["lm_head"] == pytest.approx(2880 * 201088 * 2 + 2880 * 2)


def test_run_roofline_averages_the_decode_steps():
    run = bench.Run(batch=2, prompt_len=10, gen_len=5)  # 4 decode steps reading 11, 12, 13, 14 slots
    r = bench.run_roofline(TINY, dtype=jnp.bfloat16, quant=None, run=run, cache_dtype=jnp.bfloat16, bandwidth=1e9,
                           n_devices=2, tpot_s=0.01)
    steps = [bench.decode_step_bytes(TINY, dtype=jnp.bfloat16, quant=None, batch=2, context=10 + j)["total"]
             for j in range(1, 5)]
    assert r["bytes_per_step"]["total"] == pytest.approx(np.mean(steps))
    assert r["floor_ms"] == pytest.approx(1e3 * np.mean(steps) / (1e9 * 2))
    assert r["pct_of_roofline"] == pytest.approx(100 * r["floor_ms"] / 10.0)
    assert r["floor_tokens_per_s"] == pytest.approx(2 / (r["floor_ms"] / 1e3))
    # a mesh (data 2) × (expert 2): each replica decodes 1 of the 2 rows with the weights split over 2 devices
    m = bench.run_roofline(TINY, dtype=jnp.bfloat16, quant=None, run=run, cache_dtype=jnp.bfloat16, bandwidth=1e9,
                           n_devices=4, data_parallel=2, tpot_s=0.01)
    one_row = [bench.decode_step_bytes(TINY, dtype=jnp.bfloat16, quant=None, batch=1, context=10 + j)["total"]
               for j in range(1, 5)]
    assert m["bytes_per_step"] == r["bytes_per_step"] and m["model_parallel"] == 2
    assert m["floor_ms"] == pytest.approx(1e3 * np.mean(one_row) / (1e9 * 2))
    assert bench.run_roofline(TINY, dtype=jnp.bfloat16, quant=None, run=bench.Run(1, 10, 1), cache_dtype=None,
                              bandwidth=1e9, n_devices=1, tpot_s=None) is None


# ------------------------------------------------------------------------------------------------------ traces
def _write_trace(folder, events):
    d = folder / "plugins" / "profile" / "run1"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def _meta(pid, name):
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def test_parse_trace_counts_device_kernels_of_the_decode_program(tmp_path):
    ev = [_meta(1, "/host:CPU"), _meta(7, "/device:GPU:0 (NVIDIA H200)"),
          {"ph": "X", "pid": 1, "ts": 0, "dur": 5, "name": "PjitFunction(_decode_impl)"}]
    for i in range(12):
        ev.append({"ph": "X", "pid": 7, "ts": 10 + i, "dur": 2.0, "name": f"fusion_{i % 3}",
                   "args": {"hlo_module": "jit__decode_impl", "hlo_op": f"fusion_{i % 3}"}})
    ev += [{"ph": "X", "pid": 7, "ts": 1, "dur": 7.0, "name": "gemm", "args": {"hlo_module": "jit__prefill_impl"}},
           {"ph": "X", "pid": 7, "ts": 30, "dur": 3.0, "name": "MemcpyD2H", "args": {"hlo_module": "jit__decode_impl"}},
           {"ph": "X", "pid": 1, "ts": 3, "dur": 9.0, "name": "host work", "args": {}}]
    _write_trace(tmp_path, ev)
    r = bench.parse_trace(str(tmp_path))
    assert r["kernels"] == 13 and r["busy_us"] == pytest.approx(31.0) and r["source"] == "device"
    assert r["module_kernels"] == 12 and r["module_busy_us"] == pytest.approx(24.0) and r["attribution"] == "hlo_module"
    assert [t[:2] for t in r["top"]] == [["fusion_0", 4], ["fusion_1", 4], ["fusion_2", 4]]


def test_parse_trace_without_module_names_uses_the_decode_dispatch(tmp_path):
    ev = [_meta(1, "/host:CPU"), _meta(7, "/device:GPU:0"),
          {"ph": "X", "pid": 1, "ts": 100, "dur": 5, "name": "PjitFunction(_decode_impl)"},
          {"ph": "X", "pid": 1, "ts": 200, "dur": 5, "name": "PjitFunction(_decode_impl)"}]
    ev += [{"ph": "X", "pid": 7, "ts": t, "dur": 1.0, "name": "k"} for t in (10, 20, 101, 150, 210)]
    _write_trace(tmp_path, ev)
    r = bench.parse_trace(str(tmp_path))
    assert r["kernels"] == 5 and r["module_kernels"] == 3 and "after the first host dispatch" in r["attribution"]
    empty = tmp_path / "empty"
    _write_trace(empty, [_meta(1, "/host:CPU"), {"ph": "X", "pid": 1, "ts": 0, "dur": 1, "name": "python"}])
    assert bench.parse_trace(str(empty)) is None
    assert bench.parse_trace(str(tmp_path / "nothing")) is None


# ------------------------------------------------------------------------------------------------ random weights
def test_random_weights_fill_the_stacked_tree_with_valid_int4():
    c = TINY.replace(num_hidden_layers=2, layer_types=())
    quant = QuantSpec(32, symmetric=False)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = bench.random_model_params(c, dtype=jnp.bfloat16, quant=quant, sharding_of=lambda p, s: dev, seed=3)
    specs = dict(iter_specs(model_specs(c, dtype=jnp.bfloat16, quant=quant)))
    flat = {".".join(str(k.key) for k in kp): a for kp, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(flat) == {path_str(p) for p in specs}
    for p, s in specs.items():
        chex.assert_shape(flat[path_str(p)], s.shape)
        chex.assert_type(flat[path_str(p)], s.dtype)
    gate = params["layers"]["mlp"]["experts"]["gate_up"]
    zeros, scales = np.asarray(gate["zeros"]), np.asarray(gate["scales"], np.float32)
    assert zeros.min() >= 6 and zeros.max() <= 9 and (scales > 0).all() and np.isfinite(scales).all()
    codes = (np.asarray(gate["packed"]).view(np.uint32)[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    assert set(np.unique(codes)) == set(range(16))  # all 16 codes occur
    assert not np.array_equal(np.asarray(gate["packed"][0]), np.asarray(gate["packed"][1]))  # layers differ
    norm = np.asarray(params["layers"]["input_norm"]["scale"], np.float32)
    np.testing.assert_array_equal(norm, 1.0)
    emb = np.asarray(params["embed"]["embedding"], np.float32)
    assert 0.01 < emb.std() < 0.03 and np.isfinite(emb).all()
    again = bench.random_model_params(c, dtype=jnp.bfloat16, quant=quant, sharding_of=lambda p, s: dev, seed=3)
    np.testing.assert_array_equal(np.asarray(again["layers"]["attn"]["q_proj"]["weight"]["packed"]),
                                  np.asarray(params["layers"]["attn"]["q_proj"]["weight"]["packed"]))


@pytest.mark.slow
@pytest.mark.multidevice
def test_random_weights_on_a_mesh_equal_one_device(tmp_path):
    """Generated straight into the mesh shardings (4 virtual CPU devices, own process): every leaf has its rule's
    sharding and the values of a one-device generation; then the command runs on that mesh."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from gptoss_jax import bench, sharding
        from gptoss_jax.config import GptOssConfig
        from gptoss_jax.params import QuantSpec
        c = GptOssConfig.from_preset("tiny").replace(num_hidden_layers=2, layer_types=())
        q = QuantSpec(32, symmetric=True)
        mesh = sharding.make_mesh(1, 4, 1, config=c)
        rule = sharding.sharding_rule(mesh)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        a = bench.random_model_params(c, dtype=jnp.bfloat16, quant=q, sharding_of=rule)
        b = bench.random_model_params(c, dtype=jnp.bfloat16, quant=q, sharding_of=lambda p, s: dev)
        w = a["layers"]["mlp"]["experts"]["gate_up"]["packed"]
        assert len({s.device for s in w.addressable_shards}) == 4 and w.addressable_shards[0].data.shape[1] == 2
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        # the command on a (data 2, expert 2) mesh: a batch of 1 padded to the data axis, profiled
        import json, sys
        from gptoss_jax import cli
        out = sys.argv[1] + "/mesh.json"
        assert cli.main(["bench", "--preset", "tiny", "--random-weights", "--layers", "2", "--mesh", "2,2,1",
                         "--prompt-len", "8", "--gen-len", "4", "--profile", "--copy-mib", "8", "--json", out]) == 0
        r = json.load(open(out))
        [x] = r["runs"]
        assert r["device"]["count"] == 4 and r["model"]["mesh"] == {"data": 2, "expert": 2, "tensor": 1}
        assert x["decode_steps"] == 3 and x["roofline"]["model_parallel"] == 2 and x["tpot_ms"] > 0
        assert x["profile"]["kernels_per_step"] > 0
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("argv, match", [
    (["bench"], "give a checkpoint folder or --preset"),
    (["bench", "--preset", "tiny"], "add --random-weights"),
    (["bench", "{tmp}", "--preset", "tiny", "--random-weights"], "exactly one"),
    (["bench", "{tmp}", "--random-weights"], "goes with --preset"),
    (["bench", "{tmp}"], "no config.json"),
    (["bench", "{tmp}", "--symmetric"], "--symmetric/--asymmetric goes with --preset --random-weights"),
    (["bench", "{tmp}", "--group-size", "64"], "--group-size goes with --preset"),
    (["bench", "{tmp}", "--layers", "2"], "--layers goes with --preset"),
    (["bench", "{tmp}/none"], "no such checkpoint folder"),
    (["bench", "--preset", "nope", "--random-weights"], "unknown preset 'nope'"),
    (["bench", "--preset", "tiny", "--random-weights", "--group-size", "48"], "--group-size 48 does not divide"),
    (["bench", "--preset", "tiny", "--random-weights", "--layers", "9"], "--layers 9: the preset has 4 layers"),
    (["bench", "--preset", "tiny", "--random-weights", "--prompt-len", "100", "--gen-len", "64",
      "--max-seq-len", "128"], "prompt length 100 + gen length 64 exceeds --max-seq-len 128"),
    (["bench", "--preset", "tiny", "--random-weights", "--max-seq-len", "9000"], "max_position_embeddings (8192)"),
    (["bench", "--preset", "tiny", "--random-weights", "--prompt-len", "8k"], "max_position_embeddings (8192)"),
    (["bench", "--preset", "tiny", "--random-weights", "--runs", "1x8x4", "--batch", "2"], "--runs cannot be"),
    (["bench", "--preset", "tiny", "--random-weights", "--dtype", "int8"], "--dtype"),
    (["bench", "--preset", "tiny", "--random-weights", "--mesh", "1,x,1"], "mesh"),
    (["bench", "--preset", "tiny", "--random-weights", "--json", "{tmp}/exists.json"], "exists; pass --force"),
    (["bench", "--preset", "tiny", "--random-weights", "--time-budget", "-1"], "--time-budget"),
])
def test_bad_arguments_are_one_line_errors(argv, match, tmp_path, capsys):
    (tmp_path / "exists.json").write_text("{}")
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptoss-jax bench: error: ") and match in lines[0], err
    assert (tmp_path / "exists.json").read_text() == "{}"


@pytest.mark.parametrize("argv, option", [
    (["--runs", "1x8"], "--runs"), (["--runs", "0x8x2"], "--runs"), (["--batch", "1,a"], "--batch"),
    (["--prompt-len", "-5"], "--prompt-len"), (["--gen-len", "0"], "--gen-len"), (["--repeats", "0"], "--repeats"),
    (["--group-size", "4"], "--group-size"),
])
def test_numeric_options_are_checked_when_parsed(argv, option, capsys):
    assert cli.main(["bench", "--preset", "tiny", "--random-weights", *argv]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err, err


def test_plan_runs_and_sizes():
    args = cli.build_parser().parse_args(["bench", "--preset", "tiny", "--random-weights", "--batch", "1,4",
                                          "--prompt-len", "1k,2K", "--gen-len", "8"])
    assert bench.plan_runs(args) == [bench.Run(1, 1024, 8), bench.Run(4, 1024, 8), bench.Run(1, 2048, 8),
                                     bench.Run(4, 2048, 8)]
    args = cli.build_parser().parse_args(["bench", "--preset", "tiny", "--random-weights", "--runs", "2x4kx1,1x8x3"])
    assert bench.plan_runs(args) == [bench.Run(2, 4096, 1), bench.Run(1, 8, 3)]
    config, runs, max_seq_len = bench.check_args(args)
    assert max_seq_len == 4097 and config.num_hidden_layers == 4


# ------------------------------------------------------------------------------------------------------ end to end
def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_bench_end_to_end_json_is_complete_and_consistent(tmp_path, capsys):
    """The tiny preset (2 layers) on CPU: int4 and the 16-bit baseline at batch 3 (padded to the bucket 4), profiled."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--random-weights", "--layers", "2", "--batch", "3", "--prompt-len", "12",
            "--gen-len", "6", "--chunk-size", "2", "--profile", "--bf16-baseline", "--copy-mib", "8",
            "--json", str(out)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["complete"] and r["skipped"] == [] and r["jax"] == jax.__version__ and r["date"] in stdout
    assert r["device"]["backend"] == "cpu" and r["device"]["count"] == 1 and f"jax {jax.__version__}" in stdout
    bw = r["copy_bandwidth"]
    assert bw["bytes_moved"] == 2 * bw["array_bytes"] == 2 * 8 * 2**20
    assert bw["gb_per_s"] == pytest.approx(bw["bytes_moved"] / bw["median_s"] / 1e9)
    assert r["model"]["weights"] == "int4 g32 asym" and r["baseline_model"]["weights"] == "bfloat16"
    assert r["model"]["config"]["num_hidden_layers"] == 2 and r["model"]["weight_bytes"] > 0
    assert [(x["weights"], x["batch"]) for x in r["runs"]] == [("int4 g32 asym", 3), ("bfloat16", 3)]
    for x in r["runs"]:
        for k in ("first_call_s", "steady_call_s", "compile_s", "compile_prefill_s", "compile_decode_s", "ttft_s",
                  "prefill_tokens_per_s", "tpot_ms", "decode_tokens_per_s"):
            assert _finite(x[k]), (k, x[k])
        assert x["decode_steps"] == 5 and x["cache_len"] == 18 and x["memory"] is None  # CPU: no memory stats
        assert x["compile_s"] == pytest.approx(x["first_call_s"] - x["steady_call_s"])
        assert x["compile_s"] == pytest.approx(x["compile_prefill_s"] + x["compile_decode_s"])
        assert x["prefill_tokens_per_s"] == pytest.approx(x["batch"] * 12 / x["ttft_s"])
        assert x["decode_tokens_per_s"] == pytest.approx(x["batch"] / (x["tpot_ms"] / 1e3))
        assert x["ttft_s"] + x["tpot_ms"] / 1e3 * 5 <= x["steady_call_s"] * 1.001
        roof = x["roofline"]
        parts = roof["bytes_per_step"]
        assert parts["total"] == pytest.approx(sum(parts[p] for p in ("experts", "layer_other", "lm_head", "embed",
                                                                      "kv_cache")))
        assert roof["floor_ms"] == pytest.approx(1e3 * parts["total"] / bw["bytes_per_s"])
        assert roof["pct_of_roofline"] == pytest.approx(100 * roof["floor_ms"] / x["tpot_ms"])
        assert roof["mean_context"] == 12 + 3
        prof = x["profile"]
        assert prof["decode_steps"] == 5 and prof["kernels_per_step"] > 10 and _finite(prof["busy_ms_per_step"])
        assert prof["top_kernels"] and prof["attribution"] == "hlo_module"
    int4, bf16 = r["runs"]
    assert int4["roofline"]["bytes_per_step"]["expert_bytes"] < bf16["roofline"]["bytes_per_step"]["expert_bytes"] / 3
    assert r["baseline_model"]["weight_bytes"] > r["model"]["weight_bytes"]
    [c1] = r["comparison"]
    assert c1["batch"] == 3 and c1["quantized"] == "int4 g32 asym" and c1["baseline"] == "bfloat16"
    assert c1["decode_speedup"] == pytest.approx(int4["decode_tokens_per_s"] / bf16["decode_tokens_per_s"])
    assert c1["ttft_ratio"] == pytest.approx(bf16["ttft_s"] / int4["ttft_s"])
    assert "| int4 g32 asym | 3 | 12 | 6 |" in stdout and "int4 vs 16-bit, batch 3" in stdout


def test_time_budget_skips_runs_and_records_them(tmp_path, capsys, monkeypatch):
    """A budget already spent: the model is built, no run starts, each is listed as skipped; the JSON is complete."""
    out = tmp_path / "b.json"
    monkeypatch.setattr(bench, "random_model", lambda *a, **k: _FakeModel())
    argv = ["bench", "--preset", "tiny", "--random-weights", "--batch", "1,2", "--prompt-len", "8", "--gen-len", "2",
            "--copy-mib", "1", "--time-budget", "1e-9", "--json", str(out)]
    assert cli.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["runs"] == [] and len(r["skipped"]) == 2 and "batch 2 prompt 8 gen 2" in r["skipped"][1]
    assert r["complete"] and "skipped: " in capsys.readouterr().out


class _FakeModel:
    """Stands in for an InferenceModel where no run is measured."""
    mesh = None
    generator = type("G", (), {"state_leaves": []})()

    def info(self):
        return {"source": "fake", "format": "random weights", "config": {}, "dtype": "bfloat16",
                "quantization": None, "bytes": 0, "mesh": None}


def test_a_failing_run_is_recorded_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    """One run failing (e.g. out of memory at a shape) is recorded with its error; the next runs still happen; exit
    status 1 (environment), the JSON complete."""
    out = tmp_path / "b.json"
    monkeypatch.setattr(bench, "random_model", lambda *a, **k: _FakeModel())
    calls = []

    def measure(model, run, **kw):
        calls.append(run.batch)
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99 GiB\nmore detail")

    monkeypatch.setattr(bench, "measure", measure)
    argv = ["bench", "--preset", "tiny", "--random-weights", "--batch", "1,2", "--prompt-len", "8", "--gen-len", "2",
            "--copy-mib", "1", "--json", str(out)]
    assert cli.main(argv) == 1
    r = json.loads(out.read_text())
    assert calls == [1, 2] and r["complete"] and r["runs"] == []
    assert [e["run"] for e in r["errors"]] == ["int4 g32 asym batch 1 prompt 8 gen 2",
                                              "int4 g32 asym batch 2 prompt 8 gen 2"]
    assert r["errors"][0]["error"] == "RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99 GiB"
    captured = capsys.readouterr()
    assert "failed: int4 g32 asym batch 1" in captured.out and "2 run(s) failed" in captured.err


def test_profile_selects_batches():
    parse = cli.build_parser().parse_args
    base = ["bench", "--preset", "tiny", "--random-weights"]
    assert parse(base).profile is None and parse(base + ["--profile"]).profile == "all"
    assert parse(base + ["--profile", "1,64"]).profile == {1, 64}


def test_a_model_that_does_not_fit_is_recorded_then_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b.json"

    def oom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 38 GiB")

    monkeypatch.setattr(bench, "random_model", oom)
    argv = ["bench", "--preset", "tiny", "--random-weights", "--copy-mib", "1", "--json", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gptoss-jax bench: error: out of memory") and "Traceback" not in "".join(err)
    r = json.loads(out.read_text())
    assert not r["complete"] and r["errors"][0]["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
    assert "copy_bandwidth" in r


@pytest.mark.parametrize("stage", ["A", "B", "C", "D"])
def test_the_h200_wrapper_stages_are_valid_bench_arguments(stage):
    """bench/run_h200.sh's stage arguments parse and pass the argument checks (presets read, no device)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "bench", "run_h200.sh")
    words = subprocess.run(["bash", "-c", f'source <(sed -n "/^args_of()/,/^}}/p" {script}); args_of {stage}'],
                           capture_output=True, text=True, check=True).stdout.split()
    args = cli.build_parser().parse_args(["bench", *words, "--time-budget", "100"])
    config, runs, max_seq_len = bench.check_args(args)
    assert args.random_weights and args.dtype == "bfloat16" and runs
    if stage == "B":
        assert max_seq_len == 131072 and max(r.prompt_len for r in runs) == 131072 - 64
    if stage == "D":
        assert args.preset == "gpt-oss-20b" and args.bf16_baseline
