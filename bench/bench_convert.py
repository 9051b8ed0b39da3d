"""Memory and speed of gptoss-convert (run from the repo root; CPU only).

    python bench/bench_convert.py rss          # peak RSS vs number of layers (L, 2L, 4L): must stay flat
    python bench/bench_convert.py throughput   # MB/s of input per source format, 120b estimate
    python bench/bench_convert.py 120b-layer   # one full-width gpt-oss-120b layer (+ embeddings / lm_head)
    python bench/bench_convert.py plan         # the 8 GB memory plan for gpt-oss-120b, from the parameter specs
    python bench/bench_convert.py all

Every conversion runs in a fresh child process; its peak resident set (``ru_maxrss`` from ``wait4``) is reported
next to the RSS it had after importing everything and before converting, so the growth attributable to converting
is visible. Sources are random synthetic checkpoints (gptoss_jax.testing.writers.synthetic_source) written under
$BENCH_DIR (default /tmp/gptoss_bench) and deleted afterwards. Results go to stdout and $OUT/bench_convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptoss_jax.config import GptOssConfig, default_layer_types  # noqa: E402
from gptoss_jax.params import QuantSpec, iter_specs, param_specs  # noqa: E402

BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/tmp/gptoss_bench"))
OUT = Path(os.environ.get("OUT") or ROOT / "bench_out")

# Peak RSS is read from /proc/self/status (VmHWM: high-water mark of this process's own address space). ru_maxrss
# would not do: Linux carries the parent's high-water mark across fork + exec.
CHILD = r"""
import json, os, sys, time
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from gptoss_jax.convert.converter import convert
before = hwm_kb()
src, dst, fmt, group, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
group = None if group == "default" else group if group == "channel" else int(group)
t = time.perf_counter()
convert(src, dst, fmt=fmt, group_size=group if fmt in ("hf", "mxfp4") else None, force=True, hash_files=False,
        threads=None if threads == "default" else int(threads))
print(json.dumps({"seconds": time.perf_counter() - t, "rss_after_imports_kb": before, "peak_kb": hwm_kb()}))
"""


def medium_config(layers: int, hidden: int = 2048, experts: int = 16) -> GptOssConfig:
    return GptOssConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=experts,
                        num_experts_per_tok=4, layer_types=default_layer_types(layers))


def source_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_conversion(src: Path, dst: Path, fmt: str, group="default", threads="default") -> dict:
    """Converts in a child process; returns seconds, peak RSS and the RSS after imports (MB)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), fmt, str(group), str(threads)], cwd=ROOT,
                          capture_output=True, text=True)
    out, err = proc.stdout, proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"conversion of {src} failed:\n{err[-3000:]}")
    child = json.loads(out.strip().splitlines()[-1])
    size = source_bytes(src)
    return {"format": fmt, "threads": threads, "source_MB": round(size / 1e6, 1), "seconds": round(child["seconds"], 2),
            "MB_per_s": round(size / 1e6 / child["seconds"], 1),
            "peak_rss_MB": round(child["peak_kb"] / 1024, 1),
            "rss_after_imports_MB": round(child["rss_after_imports_kb"] / 1024, 1),
            "output_MB": round(sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 1e6, 1)}


WRITER = r"""
import json, sys
from gptoss_jax.testing.writers import synthetic_source
from gptoss_jax.config import GptOssConfig
config = GptOssConfig.from_hf_dict(json.loads(sys.argv[1]))
synthetic_source(config, sys.argv[2], fmt=sys.argv[3], **json.loads(sys.argv[4]))
"""


def make_source(config: GptOssConfig, fmt: str, name: str, **kw) -> Path:
    path = BENCH_DIR / name
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", WRITER, json.dumps(config.to_hf_dict()), str(path), fmt, json.dumps(kw)],
                   cwd=ROOT, check=True)
    print(f"  wrote {name}: {source_bytes(path) / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def bench_rss(base_layers: int = 2) -> list[dict]:
    rows = []
    for mult in (1, 2, 4):
        layers = base_layers * mult
        config = medium_config(layers)
        src = make_source(config, "compressed-tensors", f"rss-{layers}", group=64, symmetric=False)
        row = {"layers": layers, **run_conversion(src, BENCH_DIR / f"rss-{layers}-out", "compressed-tensors")}
        print("  ", row, flush=True)
        rows.append(row)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(BENCH_DIR / f"rss-{layers}-out", ignore_errors=True)
    return rows


def bench_throughput(formats=("compressed-tensors", "awq", "mxfp4", "hf"), layers: int = 4) -> list[dict]:
    rows = []
    for fmt in formats:
        config = medium_config(layers, hidden=1536 if fmt in ("hf", "mxfp4") else 2048)
        src = make_source(config, fmt, f"tp-{fmt}", group=64, symmetric=False)
        row = run_conversion(src, BENCH_DIR / f"tp-{fmt}-out", fmt, 64)
        print("  ", row, flush=True)
        rows.append(row)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(BENCH_DIR / f"tp-{fmt}-out", ignore_errors=True)
    return rows


def bench_120b_layer(fmt: str = "compressed-tensors", experts: int = 128, threads=("default",)) -> list[dict]:
    """One decoder layer of gpt-oss-120b at full width (2880 hidden, `experts` experts) plus its real-size
    embeddings and lm_head. With 128 experts these are the largest items the 36-layer conversion writes, so its peak
    RSS is the 120b conversion's peak. Fewer experts isolate the per-thread RTN working set (hf / mxfp4)."""
    config = GptOssConfig.from_preset("gpt-oss-120b")
    config = config.replace(num_hidden_layers=1, layer_types=default_layer_types(1), num_local_experts=experts)
    src = make_source(config, fmt, f"120b-layer-{fmt}", group=32, symmetric=True)
    rows = []
    for t in threads:
        row = run_conversion(src, BENCH_DIR / "120b-layer-out", fmt, 32, t)
        row["what"] = f"gpt-oss-120b widths, 1 layer, {experts} experts, {fmt}"
        print("  ", row, flush=True)
        rows.append(row)
        shutil.rmtree(BENCH_DIR / "120b-layer-out", ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    return rows


def plan_120b() -> dict:
    """Worst-case resident bytes of converting gpt-oss-120b, by construction of the streaming converter: one output
    item at a time (checkpoint.item_names), Orbax holding about two more copies of it while writing, plus the RTN
    working set of the threads (hf / mxfp4 sources only) while the expert item is being built."""
    from gptoss_jax import checkpoint
    config = GptOssConfig.from_preset("gpt-oss-120b")
    quant = QuantSpec(group_size=32, symmetric=False, scale_dtype="bfloat16")  # the largest scheme we expect
    specs = param_specs(config, quant=quant)
    items = {name: sum(s.nbytes for _, s in iter_specs(checkpoint.select_item(specs, name)))
             for name in ("embed", "layers.0", "layers.0.gate_up", "layers.0.down", "head")}
    largest = max(items.values())
    h, i = config.hidden_size, config.intermediate_size
    rtn_thread = 4 * h * 2 * i * 8  # measured: ~0.55 GB per thread ≈ 4 float64 copies of one expert's gate_up
    imports = 0.17e9
    total = sum(s.nbytes for _, s in iter_specs(specs))
    return {"output_total_GB": round(total / 1e9, 2),
            "items_GB": {k: round(v / 1e9, 3) for k, v in items.items()},
            "write_phase_peak_GB": round((imports + 3 * largest) / 1e9, 2),
            "rtn_phase_peak_GB_4_threads": round((imports + items["layers.0.gate_up"] + 4 * rtn_thread) / 1e9, 2),
            "budget_GB": 8}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("rss", "throughput", "120b-layer", "plan", "all"))
    ap.add_argument("--formats", default="compressed-tensors,awq,mxfp4,hf")
    ap.add_argument("--format", default="compressed-tensors", help="120b-layer: source format")
    ap.add_argument("--experts", type=int, default=128, help="120b-layer: number of experts")
    ap.add_argument("--threads", default="default", help="120b-layer: comma-separated thread counts to try")
    args = ap.parse_args(argv)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}
    if args.what in ("plan", "all"):
        results["plan_120b"] = plan_120b()
        print("plan:", json.dumps(results["plan_120b"], indent=2))
    if args.what in ("rss", "all"):
        print("peak RSS vs layers:")
        results["rss"] = bench_rss()
    if args.what in ("throughput", "all"):
        print("throughput:")
        results["throughput"] = bench_throughput(tuple(args.formats.split(",")))
        for row in results["throughput"]:
            row["est_120b_minutes_for_60GB"] = round(60e3 / row["MB_per_s"] / 60, 1)
    if args.what in ("120b-layer", "all"):
        print("120b-shaped layer:")
        results["120b_layer"] = bench_120b_layer(args.format, args.experts, tuple(args.threads.split(",")))
    (OUT / "bench_convert.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
