"""``gptoss-jax bench``: latency / throughput of the public generate path, with the decode roofline.

    gptoss-jax bench --preset gpt-oss-120b --random-weights --group-size 32 --asymmetric \\
        --batch 1,64,256 --prompt-len 1024 --gen-len 64 --json bench.json
    gptoss-jax bench --preset gpt-oss-20b --random-weights --batch 1 --bf16-baseline   # int4 gain as a ratio
    gptoss-jax bench --preset gpt-oss-120b --random-weights --runs 1x2048x1,1x8192x1 --max-seq-len 131072
    gptoss-jax bench CKPT --batch 1,8 --prompt-len 512                                # a converted checkpoint
    gptoss-jax bench --preset tiny --random-weights --profile                          # CPU: what the tests run

Like vLLM's ``benchmark_latency`` / ``benchmark_throughput`` with dummy weights: the model is either a preset
(``configs/``) with **random weights generated on the device** straight into their shardings, one layer at a time
into the stacked model tree (never the whole model on the host, never a whole stacked leaf generated at once), or a
checkpoint folder (``gptoss_jax.load``). Every number comes from the public path, :meth:`InferenceModel.generate`
(token-id prompts, greedy, no stop tokens, so every row generates exactly ``gen_len`` tokens) and its
:class:`~gptoss_jax.generate.GenerationStats`.

Per run (batch B, prompt length P, generated tokens G):

* ``compile_s``: first call's wall time minus the steady call's (prefill + decode compilation of the shape; the
  persistent compilation cache is off unless ``--compilation-cache``, so this is real compiling).
* ``ttft_s`` (time to first token): the steady call's prefill: host padding, the jitted prefill, sampling the first
  token and copying it to the host. ``prefill_tokens_per_s`` = B·P / ttft_s.
* ``tpot_ms`` (time per output token = one decode step, every row advances one token): steady decode time / steps,
  where the decode time is the sum of the decode calls (``chunk_size`` steps each, tokens copied to the host after
  each call). ``decode_tokens_per_s`` = B / tpot.
* ``memory``: ``device.memory_stats()['peak_bytes_in_use']`` (max over the devices used) after the run. XLA keeps one
  high-water mark per process and jax offers no reset, so the run's own peak is known only when the mark rose during
  the run (``peak_set_by_this_run``: then ``run_peak_bytes`` is that peak); otherwise the run peaked at or below the
  earlier mark (``run_peak_bytes`` null; order runs by growing size to attribute each). None on backends without
  memory statistics (CPU).
* ``roofline``: the bytes one decode step must read (:func:`decode_step_bytes`: the touched experts' weights — the
  expected number of distinct experts for B tokens under uniform top-k routing —, every other layer weight
  (attention int4 projections, biases, sinks, norms, router), the lm_head, the embedding rows and the filled KV cache
  slots, averaged over the G - 1 decode steps) divided by the same-run copy bandwidth (``copy_bandwidth``: a jitted
  ``x + 1`` over a large array, bytes read + written / median time): ``floor_ms`` and ``pct_of_roofline`` =
  floor / tpot. On a mesh each data replica reads the weights once for its rows, spread evenly over its
  expert × tensor devices (optimistic).
* ``profile`` (``--profile`` for every run, ``--profile 1,64`` for those batch sizes; put it after a checkpoint
  path): one more steady call under ``jax.profiler.trace(create_perfetto_trace=True)``; device
  kernel events of the decode program (``hlo_module`` of the jitted decode) per decode step, their busy time per
  step and the top kernels. On CPU the "kernels" are XLA:CPU thunks (the same accounting, no GPU).

``--bf16-baseline`` repeats every run with random 16-bit weights of the same shape (the ``--dtype``), and
``comparison`` gives the int4 / 16-bit ratios. Output: a table on stdout (device, jax version, date in its header),
progress on stderr, ``--json FILE`` (rewritten after every run, ``"complete": true`` at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
from typing import Any, Sequence

SCHEMA = "gptoss-jax-bench/1"


def _cli():
    from gptoss_jax import cli
    return cli


def _error(msg: str):
    return _cli().CliError(msg)


# ------------------------------------------------------------------------------------------------------ arguments
def _size(text: str) -> int:
    """A token count: 1024, 8k (8192), 128K (131072)."""
    t = text.strip().lower()
    mult = 1024 if t.endswith("k") else 1
    t = t[:-1] if t.endswith("k") else t
    try:
        value = int(t, 10) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer (or Nk), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {text}")
    return value


def _size_list(text: str) -> list[int]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return [_size(p) for p in parts]


def _runs_list(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        fields = part.lower().split("x")
        if len(fields) != 3:
            raise argparse.ArgumentTypeError(f"each run is BATCHxPROMPTxGEN (e.g. 1x1024x64), got {part!r}")
        out.append(tuple(_size(f) for f in fields))
    if not out:
        raise argparse.ArgumentTypeError(f"expected BATCHxPROMPTxGEN[,...], got {text!r}")
    return out


def _profile_arg(text: str):
    return "all" if text == "all" else set(_size_list(text))


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``bench`` on the gptoss-jax subcommand parser (argparse only: nothing heavy is imported)."""
    int_type = _cli()._int_type
    b = sub.add_parser("bench", help="latency / throughput of generate with the decode roofline (random weights "
                                     "of a preset, or a checkpoint)",
                       description="Benchmark the public generate path: compile time, time to first token, prefill "
                                   "tokens/s, decode ms/token and tokens/s, peak device memory, copy bandwidth and "
                                   "the decode roofline. See docs/BENCHMARKS.md.")
    b.add_argument("checkpoint", nargs="?", default=None, help="checkpoint folder (or use --preset --random-weights)")
    b.add_argument("--preset", default=None, help="a preset of configs/ (gpt-oss-120b, gpt-oss-20b, tiny, ...)")
    b.add_argument("--random-weights", action="store_true",
                   help="random weights generated on the device (needed with --preset)")
    b.add_argument("--layers", type=int_type(1), default=None, help="use only this many layers of the preset")
    b.add_argument("--group-size", type=int_type(8), default=None,
                   help="int4 group size of the random weights (default 32)")
    sym = b.add_mutually_exclusive_group()
    b.set_defaults(symmetric=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="random int4 weights with zero points (default)")
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", help="random int4 weights without zeros")
    b.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 (default) or float32")
    b.add_argument("--mesh", default=None, metavar="DATA,EXPERT,TENSOR", help="device mesh, e.g. 1,4,2")
    b.add_argument("--batch", type=_size_list, default=None, help="batch sizes, e.g. 1,64,256 (default 1)")
    b.add_argument("--prompt-len", type=_size_list, default=None,
                   help="prompt lengths in tokens, e.g. 1024,8k (default 1024)")
    b.add_argument("--gen-len", type=int_type(1), default=64, help="tokens generated per row (default 64)")
    b.add_argument("--runs", type=_runs_list, default=None, metavar="BxPxG,...",
                   help="explicit runs instead of --batch × --prompt-len, e.g. 1x2048x1,1x64kx64 (in this order)")
    b.add_argument("--max-seq-len", type=int_type(1), default=None,
                   help="context the model is loaded with (default: the longest prompt + gen)")
    b.add_argument("--chunk-size", type=int_type(1), default=None, help="decode tokens per compiled call")
    b.add_argument("--repeats", type=int_type(1), default=1, help="steady calls per run; medians reported")
    b.add_argument("--bf16-baseline", action="store_true",
                   help="also run every shape with random 16-bit (--dtype) weights: int4 gain as a ratio")
    b.add_argument("--profile", nargs="?", const="all", default=None, type=_profile_arg, metavar="BATCHES",
                   help="one more call per run under jax.profiler: kernels and busy time per decode step (all runs, "
                        "or only those of the given batch sizes, e.g. --profile 1)")
    b.add_argument("--copy-mib", type=int_type(1), default=None,
                   help="array size of the copy-bandwidth measurement (default 2048 on accelerators, 64 on CPU)")
    b.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="skip the runs that would start after this many seconds (recorded as skipped)")
    b.add_argument("--seed", type=int_type(0, 2**31 - 1), default=0, help="seed of the random weights and prompts")
    b.add_argument("--json", default=None, metavar="FILE", help="write the results here (a new file)")
    b.add_argument("--force", action="store_true", help="replace an existing --json file")
    b.add_argument("--compilation-cache", action="store_true",
                   help="use the persistent compilation cache (then compile_s may measure cache loads)")
    b.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of a checkpoint's files")
    return b


@dataclasses.dataclass(frozen=True)
class Run:
    batch: int
    prompt_len: int
    gen_len: int


def plan_runs(args) -> list[Run]:
    """The runs in order: --runs as given, else --batch × --prompt-len (prompt length outer, batch inner)."""
    if args.runs is not None:
        if args.batch is not None or args.prompt_len is not None:
            raise _error("--runs cannot be combined with --batch / --prompt-len (it names each run's batch and "
                         "prompt length)")
        return [Run(*r) for r in args.runs]
    return [Run(b, p, args.gen_len) for p in (args.prompt_len or [1024]) for b in (args.batch or [1])]


def check_args(args):
    """Argument checks that need no model: raises CliError naming the option. Returns (config, runs, max_seq_len)."""
    from gptoss_jax.config import GptOssConfig
    if (args.checkpoint is None) == (args.preset is None):
        raise _error("give a checkpoint folder or --preset NAME --random-weights (exactly one)")
    if args.preset is not None and not args.random_weights:
        raise _error(f"--preset {args.preset} has no weights: add --random-weights")
    if args.checkpoint is not None and args.random_weights:
        raise _error("--random-weights goes with --preset, not with a checkpoint")
    if args.checkpoint is not None:
        given = [o for o, v in (("--layers", args.layers), ("--group-size", args.group_size),
                                ("--symmetric/--asymmetric", args.symmetric)) if v is not None]
        if given:
            raise _error(f"{given[0]} goes with --preset --random-weights (a checkpoint has its own weights)")
    else:
        args.group_size = 32 if args.group_size is None else args.group_size
        args.symmetric = bool(args.symmetric)
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        raise _error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    from gptoss_jax.api import parse_dtype
    try:
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        raise _error(f"--dtype: {e}") from None
    if dtype.name not in ("bfloat16", "float32", "float16"):
        raise _error(f"--dtype must be bfloat16, float16 or float32, got {args.dtype}")
    if args.preset is not None:
        config = GptOssConfig.from_preset(args.preset)  # ConfigError names the known presets
        if args.layers is not None:
            if args.layers > config.num_hidden_layers:
                raise _error(f"--layers {args.layers}: the preset has {config.num_hidden_layers} layers")
            config = config.replace(num_hidden_layers=args.layers, layer_types=config.layer_types[:args.layers])
        for name, dim in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                          ("q_dim", config.q_dim)):
            if dim % args.group_size:
                raise _error(f"--group-size {args.group_size} does not divide the preset's {name} ({dim})")
    else:
        from gptoss_jax.fsutil import user_path
        path = user_path(args.checkpoint)
        if not path.is_dir():
            raise _error(f"{args.checkpoint}: no such checkpoint folder")
        if not (path / "config.json").is_file():
            raise _error(f"{args.checkpoint}: no config.json (not a checkpoint folder)")
        config = GptOssConfig.from_json(path / "config.json")
    runs = plan_runs(args)
    longest = max(r.prompt_len + r.gen_len for r in runs)
    limit = config.max_position_embeddings
    max_seq_len = args.max_seq_len if args.max_seq_len is not None else longest
    if max_seq_len > limit:
        raise _error(f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings ({limit})"
                     if args.max_seq_len is not None else
                     f"prompt + gen of {longest} tokens exceeds the model's max_position_embeddings ({limit})")
    for r in runs:
        if r.prompt_len + r.gen_len > max_seq_len:
            raise _error(f"prompt length {r.prompt_len} + gen length {r.gen_len} exceeds --max-seq-len "
                         f"{max_seq_len}")
    if args.mesh is not None:
        from gptoss_jax import sharding
        sharding.parse_mesh_arg(args.mesh)  # ShardingError names --mesh
    return config, runs, max_seq_len


# ------------------------------------------------------------------------------------------------------ roofline
def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts hit by `tokens` tokens that each pick `top_k` distinct experts uniformly
    at random: E·(1 − (1 − k/E)^T) (each expert is missed by one token with probability 1 − k/E). What random
    weights give; a trained router's skew touches at most this many in expectation for the same T."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_step_bytes(config, *, dtype, quant, batch: int, context: int, cache_dtype=None) -> dict[str, float]:
    """Bytes one decode step must read (the floor of a memory-bound step), by component.

    batch: rows decoding one token each; context: slots each row's attention reads (the new token included).
    Components (bytes, float because the expert count is an expectation):

    * ``experts``: per layer, :func:`expected_experts_touched` (B tokens, top-k of E) × one expert's weights
      (gate_up + down: int4 packed words + scales + zero points, or 16-bit; plus their biases);
    * ``layer_other``: every other per-layer tensor, read once per step (attention q/k/v/o int4 or 16-bit with
      biases, sinks, the two RMSNorm scales, the router weight and bias);
    * ``lm_head``: the whole [hidden, vocab] head and the final norm; ``embed``: B rows of the embedding;
    * ``kv_cache``: per layer and row, k and v ([kv_heads, head_dim] each, ``cache_dtype``) and the int32 position of
      every filled slot: ``context`` slots on full-attention layers, min(context, window) on sliding ones.

    Activations, the logits and the new token's cache writes are left out (≪ 1 % at these shapes). Sizes come from
    :func:`gptoss_jax.params.param_specs` (the storage layout of :mod:`gptoss_jax.kernels.int4_layout`).
    """
    import jax.numpy as jnp

    from gptoss_jax.params import iter_specs, param_specs
    specs = param_specs(config.replace(num_hidden_layers=1, layer_types=config.layer_types[:1]), dtype=dtype,
                        quant=quant)
    expert_bytes = other_bytes = 0
    for path, spec in iter_specs(specs["layers"][0]):
        if path[:2] == ("mlp", "experts"):
            expert_bytes += spec.nbytes / config.num_local_experts
        else:
            other_bytes += spec.nbytes
    layers = config.num_hidden_layers
    touched = expected_experts_touched(config.num_local_experts, config.num_experts_per_tok, batch)
    cache_item = jnp.dtype(cache_dtype or dtype).itemsize
    slot_bytes = 2 * config.num_key_value_heads * config.head_dim * cache_item + 4  # k, v, int32 position
    slots = sum(min(context, config.sliding_window) if config.is_sliding(i) else context for i in range(layers))
    head = specs["lm_head"]["weight"]
    head_bytes = (head.nbytes if hasattr(head, "nbytes") else sum(s.nbytes for _, s in iter_specs(head)))
    head_bytes += specs["norm"]["scale"].nbytes
    embed = specs["embed"]["embedding"]
    out = {
        "experts": layers * touched * expert_bytes,
        "layer_other": float(layers * other_bytes),
        "lm_head": float(head_bytes),
        "embed": float(batch * embed.nbytes / embed.shape[0]),
        "kv_cache": float(batch * slots * slot_bytes),
    }
    out["total"] = float(sum(out.values()))
    out["experts_touched_per_layer"] = touched
    out["expert_bytes"] = float(expert_bytes)
    return out


def run_roofline(config, *, dtype, quant, run: Run, cache_dtype, bandwidth: float | None, n_devices: int = 1,
                 data_parallel: int = 1, tpot_s: float | None) -> dict[str, Any] | None:
    """The decode floor of a run: :func:`decode_step_bytes` averaged over its G − 1 decode steps (step j reads
    P + j slots), / bandwidth; None for G = 1 (no decode step).

    On a mesh of `n_devices` with `data_parallel` replicas, each replica decodes ceil(B / data) rows with the weights
    split evenly over its n_devices / data devices (an optimistic split): floor = bytes(ceil(B / data) rows) /
    (bandwidth × n_devices / data). ``bytes_per_step`` is the whole batch's (B rows on one device)."""
    steps = run.gen_len - 1
    if steps < 1:
        return None

    def mean_bytes(batch):
        per_step = [decode_step_bytes(config, dtype=dtype, quant=quant, batch=batch, context=run.prompt_len + j,
                                      cache_dtype=cache_dtype) for j in range(1, steps + 1)]
        return {k: sum(d[k] for d in per_step) / steps for k in per_step[0]}

    mean = mean_bytes(run.batch)
    model_parallel = max(n_devices // max(data_parallel, 1), 1)
    replica_rows = -(-run.batch // max(data_parallel, 1))
    replica = mean if replica_rows == run.batch else mean_bytes(replica_rows)
    out: dict[str, Any] = {"bytes_per_step": mean, "mean_context": run.prompt_len + (steps + 1) / 2,
                           "devices": n_devices, "data_parallel": data_parallel, "model_parallel": model_parallel,
                           "replica_bytes_per_step": replica["total"]}
    if bandwidth:
        floor = replica["total"] / (bandwidth * model_parallel)
        out["floor_ms"] = 1e3 * floor
        out["floor_tokens_per_s"] = run.batch / floor
        out["pct_of_roofline"] = None if not tpot_s else 100.0 * floor / tpot_s
    return out


# ------------------------------------------------------------------------------------------------- measurements
def copy_bandwidth(nbytes: int, *, device=None, repeats: int = 10) -> dict[str, Any]:
    """Same-run memory bandwidth: a jitted ``x + 1`` over a bf16 array of `nbytes` (read + write = 2·nbytes per
    call), median of `repeats` timed calls after a warm-up. A lower bound of what the memory can do (a fused
    elementwise op, not a tuned copy)."""
    import jax
    import jax.numpy as jnp
    device = device or jax.devices()[0]
    n = max(nbytes // 2, 1)
    x = jax.device_put(jnp.zeros((n,), jnp.bfloat16), device)
    f = jax.jit(lambda a: a + jnp.ones((), a.dtype))
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    del x
    med = statistics.median(times)
    return {"array_bytes": 2 * n, "bytes_moved": 4 * n, "median_s": med, "gb_per_s": 4 * n / med / 1e9,
            "bytes_per_s": 4 * n / med, "repeats": repeats, "device": str(device),
            "method": "jit(x + 1) on a bf16 array: bytes read + written / median time"}


def memory_stats(devices) -> dict[str, int] | None:
    """bytes_in_use / peak_bytes_in_use / bytes_limit, max over `devices`; None where not reported (CPU)."""
    out: dict[str, int] = {}
    for d in devices:
        try:
            s = d.memory_stats()
        except Exception:  # noqa: BLE001 — some backends raise instead of returning None
            s = None
        if not s:
            return None
        for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
            if k in s:
                out[k] = max(out.get(k, 0), int(s[k]))
    return out or None


def parse_trace(trace_dir: str, *, module_hint: str = "decode", host_marker: str = "_decode_impl"
                ) -> dict[str, Any] | None:
    """Device kernel events of a ``jax.profiler.trace(create_perfetto_trace=True)`` folder, and those of one program.

    Kernels: on a GPU/TPU trace the events of the device processes (``/device:...``), on CPU the XLA thunks (events
    with an ``hlo_op`` argument); memcpy / memset events and CPU "end:" markers are left out. The program's kernels
    are those whose ``hlo_module`` argument contains `module_hint`; where kernels carry no module name, those that
    start at or after the first host event named with `host_marker` (jax's ``PjitFunction(...)`` dispatch of the
    decode: generate blocks on the prefill's first token before it, so everything later is decode). Returns counts,
    busy microseconds (summed over events: overlapping events, e.g. CPU threads, can exceed wall time), the
    attribution used and the program's top kernels; None when the trace holds no kernel events."""
    import collections
    import glob
    import gzip
    import json
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        return None
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e.get("pid"): (e.get("args") or {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in names.items() if str(n).startswith("/device:")}

    def is_kernel(e) -> bool:
        if e.get("ph") != "X":
            return False
        name = str(e.get("name", ""))
        if name.startswith("end: ") or "memcpy" in name.lower() or "memset" in name.lower():
            return False
        if device_pids:
            return e.get("pid") in device_pids
        return "hlo_op" in (e.get("args") or {})

    kernels = [e for e in events if is_kernel(e)]
    if not kernels:
        return None
    if any("hlo_module" in (e.get("args") or {}) for e in kernels):
        attribution = "hlo_module"
        chosen = [e for e in kernels if module_hint in str((e.get("args") or {}).get("hlo_module", ""))]
    else:
        starts = [float(e["ts"]) for e in events if e.get("ph") == "X" and e.get("pid") not in device_pids
                  and host_marker in str(e.get("name", "")) and "ts" in e]
        attribution = "after the first host dispatch of " + host_marker
        chosen = [e for e in kernels if starts and float(e.get("ts", -1)) >= min(starts)]
    top = collections.defaultdict(lambda: [0, 0.0])
    for e in chosen:
        t = top[str(e.get("name"))[:120]]
        t[0] += 1
        t[1] += float(e.get("dur", 0.0))
    return {"kernels": len(kernels), "busy_us": sum(float(e.get("dur", 0.0)) for e in kernels),
            "module_kernels": len(chosen), "module_busy_us": sum(float(e.get("dur", 0.0)) for e in chosen),
            "attribution": attribution, "source": "device" if device_pids else "host (XLA:CPU thunks)",
            "top": sorted(([n, c, us] for n, (c, us) in top.items()), key=lambda x: -x[2])[:80]}


# ------------------------------------------------------------------------------------------------ random weights
def _random_leaf(key, name: str, shape, dtype):
    """One random tensor of a gpt-oss parameter: uniform 4-bit codes in the packed int32 words, zero points near the
    middle of [0, 15], positive scales (weights of std ≈ 0.02 either way), RMSNorm scales 1, the rest N(0, 0.02)."""
    import jax
    import jax.numpy as jnp
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "packed":
        return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint32), jnp.int32)
    if leaf == "zeros":
        return jax.random.randint(key, shape, 6, 10, jnp.int32).astype(jnp.uint8)
    if leaf == "scales":  # codes minus ~8 have std ~4.6
        return (0.0045 * jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5)).astype(dtype)
    if leaf == "perm":
        raise ValueError("random weights are never act-order")
    if leaf == "scale":  # RMSNorm
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


_RANDOM_FNS: dict = {}


def random_model_params(config, *, dtype, quant, sharding_of, seed: int = 0) -> dict:
    """The model tree (layers stacked, :func:`gptoss_jax.params.model_specs`) with random weights, generated on the
    devices straight into their shardings.

    sharding_of(model_path, spec) -> Sharding of each stacked leaf (e.g. :func:`gptoss_jax.sharding.sharding_rule`).
    The stacked leaves are allocated once (zeros, in their shardings); then one jitted call per layer generates that
    layer's tensors and writes them into the layer's slice of the donated stacked leaves (in place on accelerators),
    so at most one layer's tensors exist besides the model (a 36-layer 120b gate_up is 38 GB: generating it whole
    would need twice that). Three compilations whatever the model size (the same job as
    :class:`gptoss_jax.params.StackedTreeBuilder`, whose one call per tensor costs a compilation per tensor shape).
    Values depend on the seed and layer, not on the sharding (jax's threefry is partitionable).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.params import iter_specs, model_specs, path_str
    flat = [(path_str(p), p, s) for p, s in iter_specs(model_specs(config, dtype=dtype, quant=quant))]
    shard = {name: sharding_of(p, s) for name, p, s in flat}
    stacked = [(name, s) for name, p, s in flat if p[0] == "layers"]
    other = [(name, s) for name, p, s in flat if p[0] != "layers"]

    def layer_slice(sh):
        if isinstance(sh, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
        return None

    stacked_sh = {n: shard[n] for n, _ in stacked}
    cache_key = (tuple((n, s.shape, jnp.dtype(s.dtype).name) for n, _, s in flat), tuple(shard.items()))
    fns = _RANDOM_FNS.get(cache_key)
    if fns is None:
        def fill(tree, base, i):
            key = jax.random.fold_in(jax.random.fold_in(base, 1), i)
            out = {}
            for j, (n, s) in enumerate(stacked):
                v = _random_leaf(jax.random.fold_in(key, j), n, s.shape[1:], s.dtype)
                sl = layer_slice(shard[n])
                if sl is not None:
                    v = jax.lax.with_sharding_constraint(v, sl)
                out[n] = jax.lax.dynamic_update_index_in_dim(tree[n], v, i, 0)
            return out

        def rest(base):
            return {n: _random_leaf(jax.random.fold_in(jax.random.fold_in(base, 2), j), n, s.shape, s.dtype)
                    for j, (n, s) in enumerate(other)}

        fns = (jax.jit(lambda: {n: jnp.zeros(s.shape, s.dtype) for n, s in stacked}, out_shardings=stacked_sh),
               jax.jit(fill, donate_argnums=0, out_shardings=stacked_sh),
               jax.jit(rest, out_shardings={n: shard[n] for n, _ in other}))
        _RANDOM_FNS.clear()  # one model's functions at a time: they hold its shardings
        _RANDOM_FNS[cache_key] = fns
    zeros, fill, rest = fns
    base = jax.random.key(seed)
    tree = zeros()
    for i in range(config.num_hidden_layers):
        tree = fill(tree, base, np.int32(i))
    rest_values = rest(base)
    out: dict = {}
    for name, path, _ in flat:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = tree[name] if path[0] == "layers" else rest_values[name]
    return out


def random_model(config, *, dtype, quant, mesh, max_seq_len: int, chunk_size: int | None, seed: int, label: str):
    """An InferenceModel of `config` with random weights (see :func:`random_model_params`)."""
    import jax

    from gptoss_jax import sharding
    from gptoss_jax.api import InferenceModel, _cache_constraint
    from gptoss_jax.generate import DEFAULT_CHUNK_SIZE
    from gptoss_jax.model import build_model
    from gptoss_jax.moe_parallel import MoEParallel
    if mesh is not None:
        sharding.validate_mesh_shape(config, dict(mesh.shape), sharding.RULES)
        sharding_of = sharding.sharding_rule(mesh)
        moe_par = MoEParallel.from_rules(mesh, sharding.RULES)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_of, moe_par = (lambda path, spec: device), None
    params = random_model_params(config, dtype=dtype, quant=quant, sharding_of=sharding_of, seed=seed)
    module = build_model(config, params, dtype=dtype, quant=quant, moe_parallel=moe_par)
    del params
    return InferenceModel(module, max_seq_len=max_seq_len, mesh=mesh, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                          cache_constraint=_cache_constraint(mesh), source=label, source_format="random weights")


# ----------------------------------------------------------------------------------------------------- one run
def _prompts(run: Run, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng([seed, run.batch, run.prompt_len])
    return rng.integers(0, vocab, (run.batch, run.prompt_len)).tolist()


def _call(model, prompts, gen_len: int, chunk_size):
    t = time.perf_counter()
    results, stats = model.generate(prompts, max_new_tokens=gen_len, temperature=0.0, stop_token_ids=(),
                                    chunk_size=chunk_size, return_stats=True)
    wall = time.perf_counter() - t
    if any(len(r.tokens) != gen_len for r in results):  # no stop tokens: every row must run to gen_len
        raise RuntimeError(f"generate returned {[len(r.tokens) for r in results]} tokens, expected {gen_len} per row")
    return wall, stats


def _devices_of(model):
    import jax
    return list(model.mesh.devices.flat) if model.mesh is not None else [jax.devices()[0]]


def measure(model, run: Run, *, repeats: int, chunk_size, profile: bool, seed: int, log) -> dict[str, Any]:
    """One (batch, prompt length, gen length) through ``model.generate``: a first call (compiles), `repeats` steady
    calls (medians), optionally a profiled call. Memory statistics around the first and steady calls."""
    import tempfile

    import jax
    prompts = _prompts(run, model.config.vocab_size, seed)
    devices = _devices_of(model)
    mem_before = memory_stats(devices)
    first_wall, first = _call(model, prompts, run.gen_len, chunk_size)
    log(f"  first call {first_wall:.2f}s (prefill compiled: {first.prefill_compiled}, "
        f"decode compile calls {first.compile_decode_s:.2f}s)")
    steady = [_call(model, prompts, run.gen_len, chunk_size) for _ in range(repeats)]
    mem_after = memory_stats(devices)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    wall = med([w for w, _ in steady])
    ttft = med([s.time_to_first_token_s for _, s in steady])
    steps = [s.decode_tokens / run.batch for _, s in steady]
    tpot = med([s.decode_s / n for (_, s), n in zip(steady, steps) if n > 0]) if all(n > 0 for n in steps) else None
    out: dict[str, Any] = {
        "batch": run.batch, "prompt_len": run.prompt_len, "gen_len": run.gen_len,
        "cache_len": _cache_len(model, run),
        "first_call_s": first_wall, "steady_call_s": wall, "compile_s": first_wall - wall,
        "compile_prefill_s": first.time_to_first_token_s - ttft,
        "prefill_compiled": bool(first.prefill_compiled), "decode_compiled": bool(first.compile_decode_s > 0),
        "ttft_s": ttft, "prefill_tokens_per_s": run.batch * run.prompt_len / ttft,
        "decode_steps": steps[0], "tpot_ms": None if tpot is None else 1e3 * tpot,
        "decode_tokens_per_s": None if tpot is None else run.batch / tpot,
        "repeats": repeats,
    }
    out["compile_decode_s"] = out["compile_s"] - out["compile_prefill_s"]
    mem: dict[str, Any] | None = None
    if mem_after is not None:
        rose = mem_before is None or mem_after.get("peak_bytes_in_use", 0) > mem_before.get("peak_bytes_in_use", 0)
        mem = {"bytes_in_use_before": None if mem_before is None else mem_before.get("bytes_in_use"),
               "peak_bytes_in_use": mem_after.get("peak_bytes_in_use"), "bytes_limit": mem_after.get("bytes_limit"),
               "peak_set_by_this_run": bool(rose),
               "run_peak_bytes": mem_after.get("peak_bytes_in_use") if rose else None}
    out["memory"] = mem
    if profile:
        try:
            with tempfile.TemporaryDirectory(prefix="gptoss-bench-trace-") as d:
                with jax.profiler.trace(d, create_perfetto_trace=True):
                    _, st = _call(model, prompts, run.gen_len, chunk_size)
                trace = parse_trace(d, module_hint="decode")
        except Exception as e:  # noqa: BLE001 — a profiler that cannot start (no CUPTI ...) costs only the profile
            out["profile"] = {"error": f"profiler failed: {type(e).__name__}: {str(e)[:300]}"}
            return out
        n = st.decode_tokens / run.batch
        if trace is None or not trace["module_kernels"] or n <= 0:
            out["profile"] = {"error": "no decode step (gen_len 1)" if n <= 0 else
                              "no device kernel events of the decode in the trace",
                              "trace": trace and {k: trace[k] for k in ("kernels", "busy_us", "source")}}
        else:
            out["profile"] = {"kernels_per_step": trace["module_kernels"] / n,
                              "busy_ms_per_step": trace["module_busy_us"] / n / 1e3,
                              "decode_steps": n, "source": trace["source"], "attribution": trace["attribution"],
                              "all_kernels": trace["kernels"], "all_busy_ms": trace["busy_us"] / 1e3,
                              "top_kernels": [{"name": name, "per_step": c / n, "us_per_step": us / n}
                                              for name, c, us in trace["top"]]}
    return out


def _cache_len(model, run: Run) -> int:
    from gptoss_jax.generate import length_bucket
    gen = model.generator
    return length_bucket(run.prompt_len + run.gen_len, minimum=gen.min_bucket, cap=gen.max_seq_len)


# ------------------------------------------------------------------------------------------------------- output
def _fmt(x, spec: str, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x * scale, spec)


TABLE_COLUMNS = ("weights", "batch", "prompt", "gen", "compile s", "TTFT ms", "prefill tok/s", "TPOT ms",
                 "decode tok/s", "floor ms", "% roofline", "peak GB", "kernels/step")


def table(report: dict) -> str:
    """The results as a Markdown table with a header naming the device, jax version and date."""
    dev = report["device"]
    bw = report.get("copy_bandwidth") or {}
    source = (report.get("model") or {}).get("source", "?")
    lines = [f"gptoss-jax bench — {source} — {dev['kind']} × {dev['count']} ({dev['backend']}), "
             f"jax {report['jax']}, {report['date']}"
             + ("" if report.get("complete") else " — INCOMPLETE (interrupted)"),
             f"copy bandwidth {_fmt(bw.get('gb_per_s'), '.1f')} GB/s; kernels: {report.get('kernel_implementation')}; "
             f"max_seq_len {report['max_seq_len']}", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in report["runs"]:
        roof = r.get("roofline") or {}
        mem = r.get("memory") or {}
        peak = mem.get("run_peak_bytes")
        peak_s = _fmt(peak, ".1f", 1e-9) if peak is not None else (
            f"≤{_fmt(mem.get('peak_bytes_in_use'), '.1f', 1e-9)}" if mem.get("peak_bytes_in_use") else "-")
        prof = r.get("profile") or {}
        lines.append("| " + " | ".join([
            r["weights"], str(r["batch"]), str(r["prompt_len"]), str(r["gen_len"]), _fmt(r["compile_s"], ".1f"),
            _fmt(r["ttft_s"], ".1f", 1e3), _fmt(r["prefill_tokens_per_s"], ".0f"), _fmt(r["tpot_ms"], ".2f"),
            _fmt(r["decode_tokens_per_s"], ".1f"), _fmt(roof.get("floor_ms"), ".3f"),
            _fmt(roof.get("pct_of_roofline"), ".1f"), peak_s, _fmt(prof.get("kernels_per_step"), ".0f")]) + " |")
    for c in report.get("comparison", []):
        lines.append(f"int4 vs 16-bit, batch {c['batch']} prompt {c['prompt_len']}: decode tokens/s × "
                     f"{_fmt(c['decode_speedup'], '.2f')}, TTFT × {_fmt(c['ttft_ratio'], '.2f')} "
                     f"(16-bit / int4)")
    for s in report.get("skipped", []):
        lines.append(f"skipped: {s}")
    for e in report.get("errors", []):
        lines.append(f"failed: {e['run']}: {e['error']}")
    return "\n".join(lines)


def _weights_label(quant, dtype) -> str:
    import jax.numpy as jnp
    if quant is None:
        return jnp.dtype(dtype).name
    g = "ch" if quant.group_size is None else quant.group_size
    return f"int4 g{g} {'sym' if quant.symmetric else 'asym'}"


# ---------------------------------------------------------------------------------------------------------- main
def cmd_bench(args) -> int:
    """The ``gptoss-jax bench`` command (see the module docstring). Exit status as the other commands."""
    cli = _cli()
    config, runs, max_seq_len = check_args(args)
    cli._check_output(args.json, args.force)
    if not args.compilation_cache:
        os.environ.setdefault("GPTOSS_JAX_COMPILATION_CACHE", "0")  # compile_s must measure compiling
    else:
        from gptoss_jax.compilation import enable_compilation_cache
        enable_compilation_cache()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        cli._err(f"[bench {time.perf_counter() - t_start:7.1f}s] {msg}")

    import jax

    from gptoss_jax import __version__, api
    from gptoss_jax.kernels import default_implementation
    from gptoss_jax.params import QuantSpec
    dtype = api.parse_dtype(args.dtype)
    mesh = api.resolve_mesh(args.mesh, config)
    n_devices = int(mesh.devices.size) if mesh is not None else 1
    dev0 = jax.devices()[0]
    report: dict[str, Any] = {
        "schema": SCHEMA, "tool": "gptoss-jax bench", "version": __version__,
        "args": {k: v for k, v in vars(args).items() if k != "command"},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": {"backend": jax.default_backend(), "kind": dev0.device_kind, "count": n_devices,
                   "platform_version": getattr(getattr(dev0, "client", None), "platform_version", None)},
        "jax": jax.__version__, "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "kernel_implementation": default_implementation(), "max_seq_len": max_seq_len,
        "runs": [], "skipped": [], "errors": [], "complete": False,
    }
    log(f"{report['device']['kind']} × {n_devices} ({report['device']['backend']}), jax {jax.__version__}")

    def save():
        if args.json:
            import json
            cli._write_atomic(args.json, json.dumps(report, indent=1, default=str) + "\n")

    copy_mib = args.copy_mib or (64 if jax.default_backend() == "cpu" else 2048)
    report["copy_bandwidth"] = copy_bandwidth(copy_mib * 2**20, device=_devices_for(mesh)[0])
    log(f"copy bandwidth {report['copy_bandwidth']['gb_per_s']:.1f} GB/s ({copy_mib} MiB array)")
    save()

    def build(what: str, make):
        """Builds a model; a failure (e.g. out of memory) is recorded in the JSON before it ends the command."""
        t = time.perf_counter()
        try:
            model = make()
            jax.block_until_ready(model.generator.state_leaves)
        except Exception as e:  # noqa: BLE001 — recorded, then handled by the CLI (one line, exit status)
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            report["errors"].append({"run": what, "error": f"{type(e).__name__}: {msg}"})
            save()
            raise
        log(f"{what} in {time.perf_counter() - t:.1f}s")
        return model, time.perf_counter() - t

    def model_info(model, quant):
        info = model.info()
        return {"source": info["source"], "format": info["format"], "preset": args.preset,
                "config": info["config"], "dtype": info["dtype"], "quantization": info["quantization"],
                "weights": _weights_label(quant, dtype), "weight_bytes": info["bytes"], "mesh": info["mesh"],
                "compilation_cache": jax.config.jax_compilation_cache_dir or None}

    def run_all(model, quant, label: str) -> list[dict]:
        out = []
        for run in runs:
            elapsed = time.perf_counter() - t_start
            what = f"{label} batch {run.batch} prompt {run.prompt_len} gen {run.gen_len}"
            if args.time_budget is not None and elapsed > args.time_budget:
                log(f"skip {what}: past --time-budget ({elapsed:.0f}s > {args.time_budget:.0f}s)")
                report["skipped"].append(what)
                save()
                continue
            log(f"run {what}")
            profile = args.profile == "all" or (args.profile is not None and run.batch in args.profile)
            try:
                r = measure(model, run, repeats=args.repeats, chunk_size=args.chunk_size, profile=profile,
                            seed=args.seed, log=log)
            except Exception as e:  # noqa: BLE001 — e.g. out of memory at one shape: record it, go on
                import traceback
                msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                log(f"  FAILED: {type(e).__name__}: {msg}")
                report["errors"].append({"run": what, "error": f"{type(e).__name__}: {msg}",
                                         "traceback": traceback.format_exc()[-4000:]})
                save()
                continue
            r["weights"] = label
            r["roofline"] = run_roofline(model.config, dtype=model.dtype, quant=model.quant, run=run,
                                         cache_dtype=model.generator.cache_dtype,
                                         bandwidth=report["copy_bandwidth"]["bytes_per_s"], n_devices=n_devices,
                                         data_parallel=int(dict(mesh.shape).get("data", 1)) if mesh is not None else 1,
                                         tpot_s=None if r["tpot_ms"] is None else r["tpot_ms"] / 1e3)
            log(f"  TTFT {r['ttft_s'] * 1e3:.1f} ms, TPOT {_fmt(r['tpot_ms'], '.3f')} ms, "
                f"{_fmt(r['decode_tokens_per_s'], '.1f')} tok/s, "
                f"{_fmt((r['roofline'] or {}).get('pct_of_roofline'), '.1f')}% of roofline")
            out.append(r)
            report["runs"].append(r)
            save()
        return out

    if args.preset is not None:
        quant = QuantSpec(group_size=args.group_size, symmetric=args.symmetric)
        label = f"random {args.preset}" + (f" ({config.num_hidden_layers} layers)" if args.layers else "")
        model, load_s = build(f"random {_weights_label(quant, dtype)} weights generated", lambda: random_model(
            config, dtype=dtype, quant=quant, mesh=mesh, max_seq_len=max_seq_len, chunk_size=args.chunk_size,
            seed=args.seed, label=label))
    else:
        model, load_s = build(f"loaded {args.checkpoint}", lambda: api.load(
            args.checkpoint, mesh=mesh, dtype=dtype, max_seq_len=max_seq_len, tokenizer=False,
            verify=not args.no_verify))
        quant = model.quant
    report["model"] = {**model_info(model, quant), "load_s": load_s}
    main_label = _weights_label(quant, dtype)
    main_runs = run_all(model, quant, main_label)

    if args.bf16_baseline:
        del model  # the quantized weights leave the device before the 16-bit ones arrive
        import gc
        gc.collect()
        base_label = _weights_label(None, dtype)
        elapsed = time.perf_counter() - t_start
        if args.time_budget is not None and elapsed > args.time_budget:
            log(f"skip the {base_label} baseline: past --time-budget")
            report["skipped"].append(f"{base_label} baseline (every run)")
        else:
            base, load_s = build(f"random {base_label} weights generated", lambda: random_model(
                config, dtype=dtype, quant=None, mesh=mesh, max_seq_len=max_seq_len, chunk_size=args.chunk_size,
                seed=args.seed, label=f"random {args.preset or 'checkpoint'} shape, 16-bit"))
            report["baseline_model"] = {**model_info(base, None), "load_s": load_s}
            base_runs = run_all(base, None, base_label)
            report["comparison"] = compare(main_runs, base_runs)
            del base
    report["complete"] = True
    report["total_s"] = time.perf_counter() - t_start
    save()
    print(table(report), flush=True)
    if report["errors"]:
        cli._err(f"gptoss-jax bench: error: {len(report['errors'])} run(s) failed: {report['errors'][0]['error']}")
        return cli.EXIT_ENVIRONMENT
    return 0


def _devices_for(mesh):
    import jax
    return list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]


def compare(quantized: Sequence[dict], baseline: Sequence[dict]) -> list[dict]:
    """int4 vs 16-bit for every (batch, prompt, gen) measured both ways: decode_speedup = int4 decode tokens/s /
    16-bit's (> 1: int4 faster), ttft_ratio = 16-bit TTFT / int4 TTFT (> 1: int4 faster)."""
    key = lambda r: (r["batch"], r["prompt_len"], r["gen_len"])  # noqa: E731
    base = {key(r): r for r in baseline}
    out = []
    for r in quantized:
        b = base.get(key(r))
        if b is None:
            continue
        ds = (r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
              if r["decode_tokens_per_s"] and b["decode_tokens_per_s"] else None)
        out.append({"batch": r["batch"], "prompt_len": r["prompt_len"], "gen_len": r["gen_len"],
                    "quantized": r["weights"], "baseline": b["weights"], "decode_speedup": ds,
                    "ttft_ratio": b["ttft_s"] / r["ttft_s"],
                    "tpot_ms": [r["tpot_ms"], b["tpot_ms"]]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gptoss_jax.bench FILE.json ...``: the table of saved results (e.g. of an interrupted run)."""
    import json
    files = list(sys.argv[1:] if argv is None else argv)
    if not files:
        print("usage: python -m gptoss_jax.bench RESULTS.json ...", file=sys.stderr)
        return 2
    for i, f in enumerate(files):
        try:
            with open(f, encoding="utf-8") as fh:
                report = json.load(fh)
            print(("\n" if i else "") + table(report))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"{f}: not a gptoss-jax bench result ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
