"""Bad input for gptoss-convert: every case fails with a message naming the file and tensor, exit code != 0, and
leaves nothing loadable at DST. Also `inspect`, --force and interruption."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_jax.convert import cli
from gptoss_jax.testing import writers
from gptoss_jax.convert.converter import ConvertError, convert, inspect
from gptoss_jax import checkpoint, testing
from gptoss_jax.config import GptOssConfig, default_layer_types
from gptoss_jax.safetensors_io import CheckpointError

CONFIG = GptOssConfig.from_preset("tiny").replace(num_hidden_layers=2, layer_types=default_layer_types(2))
LAYER1_Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def good_sources(tmp_path_factory):
    """A sharded compressed-tensors source and a small MXFP4 source, written once and copied per test."""
    root = tmp_path_factory.mktemp("sources")
    writers.write_source(CONFIG, testing.random_hf_model(CONFIG, seed=7), root / "ct", "compressed-tensors",
                         group=64, symmetric=False, max_shard_bytes=600_000)
    writers.write_source(CONFIG, testing.random_hf_model(CONFIG, seed=8), root / "mxfp4", "mxfp4")
    return root


@pytest.fixture
def src(good_sources, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(good_sources / "ct", path)
    return path


def shard_of(src: Path, tensor: str) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"][tensor]


def rewrite_shard(src: Path, tensor: str, edit) -> Path:
    """Loads the shard holding `tensor`, applies edit(dict) and writes it back (index updated for new names)."""
    path = shard_of(src, tensor)
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != path.name}
    index["weight_map"].update({k: path.name for k in tensors})
    index_path.write_text(json.dumps(index))
    return path


def set_quant_config(src: Path, edit) -> None:
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg["quantization_config"])
    (src / "config.json").write_text(json.dumps(cfg))


def convert_fails(src, dst, *needles, **kw) -> str:
    with pytest.raises((ConvertError, CheckpointError)) as info:
        convert(src, dst, **kw)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in error: {message}"
    assert not Path(dst).exists()
    assert not list(Path(dst).parent.glob(Path(dst).name + ".tmp-*")), "temporary folder left behind"
    return message


def test_good_source_converts(src, tmp_path):
    convert(src, tmp_path / "dst")
    assert checkpoint.read_metadata(tmp_path / "dst")["complete"]


def test_missing_shard(src, tmp_path):
    shard = shard_of(src, LAYER1_Q + ".weight_packed")
    shard.unlink()
    convert_fails(src, tmp_path / "dst", "model.safetensors.index.json", shard.name)


def test_truncated_header(src, tmp_path):
    shard = shard_of(src, LAYER1_Q + ".weight_packed")
    data = shard.read_bytes()
    shard.write_bytes(data[: 8 + struct.unpack("<Q", data[:8])[0] // 2])
    convert_fails(src, tmp_path / "dst", str(shard), "truncated")


def test_corrupted_header(src, tmp_path):
    shard = shard_of(src, LAYER1_Q + ".weight_packed")
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    convert_fails(src, tmp_path / "dst", str(shard), "corrupted")


def test_truncated_data(src, tmp_path):
    shard = shard_of(src, LAYER1_Q + ".weight_packed")
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    convert_fails(src, tmp_path / "dst", str(shard))


def test_missing_and_unexpected_tensors_are_listed(src, tmp_path):
    def edit(t):
        del t[LAYER1_Q + ".weight_scale"]
        t["model.layers.1.mlp.extra_thing"] = torch.zeros(3)
    rewrite_shard(src, LAYER1_Q + ".weight_scale", edit)
    convert_fails(src, tmp_path / "dst", "missing", LAYER1_Q + ".weight_scale", "unexpected",
                  "model.layers.1.mlp.extra_thing")


def test_shape_mismatch_against_config(src, tmp_path):
    name = "model.layers.0.mlp.experts.3.down_proj.weight_scale"
    rewrite_shard(src, name, lambda t: t.__setitem__(name, torch.ones(256, 3, dtype=torch.bfloat16)))
    convert_fails(src, tmp_path / "dst", name, "shape (256, 3)", "(256, 4)", str(shard_of(src, name)))


def test_dtype_mismatch(src, tmp_path):
    name = "model.layers.0.input_layernorm.weight"
    rewrite_shard(src, name, lambda t: t.__setitem__(name, torch.ones(256, dtype=torch.int32)))
    convert_fails(src, tmp_path / "dst", name, "dtype int32")


def test_config_shape_mismatch(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    convert_fails(src, tmp_path / "dst", "config.json implies", "model.layers.0.mlp.experts.0.gate_proj")


@pytest.mark.parametrize("edit,needle", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8), "unsupported bits 8"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "unsupported strategy 'tensor'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=48), "group size 48 does not divide"),
    (lambda q: q.update(format="float-quantized") or q["config_groups"]["group_0"].pop("format", None),
     "format 'float-quantized'"),
    (lambda q: q.update(quant_method="quanto"), "quant_method 'quanto' is not supported"),
])
def test_unsupported_scheme(src, tmp_path, edit, needle):
    set_quant_config(src, edit)
    convert_fails(src, tmp_path / "dst", needle, "config.json")
    assert any(needle in p for p in inspect(src)["problems"])


def test_awq_unsupported_bits_and_version(tmp_path):
    path = tmp_path / "awq"
    writers.write_source(CONFIG, testing.random_hf_model(CONFIG, seed=2), path, "awq", group=128)
    set_quant_config(path, lambda q: q.update(bits=8, version="gemv"))
    convert_fails(path, tmp_path / "dst", "bits 8", "version 'gemv'")


def test_rtn_group_size_must_divide(good_sources, tmp_path):
    convert_fails(good_sources / "mxfp4", tmp_path / "dst", "--group-size 96 does not divide", group_size=96)


def test_quantized_source_rejects_rtn_flags(src, tmp_path):
    convert_fails(src, tmp_path / "dst", "already quantized", group_size=32)


def test_non_finite_scales(src, tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight_scale"

    def edit(t):
        s = t[name].clone()
        s[3, 1] = float("inf")
        t[name] = s
    rewrite_shard(src, name, edit)
    convert_fails(src, tmp_path / "dst", name, "non-finite", str(shard_of(src, name)))


def test_non_finite_mxfp4_scales(good_sources, tmp_path):
    path = tmp_path / "mx"
    shutil.copytree(good_sources / "mxfp4", path)
    name = "model.layers.0.mlp.experts.down_proj_scales"
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name][1, 2, 0] = 255
    save_file(tensors, str(path / "model.safetensors"))
    convert_fails(path, tmp_path / "dst", name, "non-finite")


def test_dst_exists_needs_force(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(ConvertError, match="already exists"):
        convert(src, dst)
    assert (dst / "keep.txt").exists()
    assert cli.main([str(src), str(dst), "--quiet"]) == cli.EXIT_ERROR
    # --force never deletes a folder that is not a previous gptoss-jax checkpoint (docs/RELIABILITY.md)
    assert cli.main([str(src), str(dst), "--quiet", "--force"]) == cli.EXIT_ERROR
    assert (dst / "keep.txt").read_text() == "user data"
    (dst / "keep.txt").unlink()  # an empty folder, or a previous checkpoint, is replaced
    assert cli.main([str(src), str(dst), "--quiet", "--force"]) == 0
    assert checkpoint.read_metadata(dst)["complete"]
    assert cli.main([str(src), str(dst), "--quiet", "--force"]) == 0


def test_interruption_leaves_nothing_and_rerun_succeeds(src, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "dst"
    real_write = checkpoint.CheckpointWriter.write_item
    calls = []

    def interrupted_write(self, name, tree):
        calls.append(name)
        if name == "layers.1":
            raise KeyboardInterrupt  # Ctrl-C in the middle of the conversion
        return real_write(self, name, tree)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_item", interrupted_write)
    assert cli.main([str(src), str(dst), "--quiet"]) == cli.EXIT_INTERRUPTED
    assert "layers.0" in calls
    assert not dst.exists()
    assert not list(tmp_path.glob("dst*")), "partial output left behind"
    with pytest.raises(CheckpointError):
        checkpoint.read_metadata(dst)
    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_item", real_write)
    assert cli.main([str(src), str(dst), "--quiet"]) == 0
    assert checkpoint.read_metadata(dst)["complete"]


def test_inspect_good_source(src, capsys):
    report = inspect(src)
    assert report["format"] == "compressed-tensors"
    assert report["scheme"] == "int4 group 64, asymmetric, scales bfloat16; split experts"
    assert report["problems"] == []
    assert report["tensors"] > 100 and report["files"] > 1
    assert report["parameters"] == sum(int(np.prod(s)) for s in _hf_shapes())
    assert 0 < report["estimated_bytes_out"] and report["bytes_in"] > 0
    assert cli.main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    for word in ("compressed-tensors", "group 64", "parameters", "bytes in", "estimated bytes out", "problems"):
        assert word in out


def _hf_shapes():
    model = testing.random_hf_model(CONFIG, seed=0)
    return [tuple(p.shape) for p in model.parameters()]


def test_inspect_reports_problems(src, capsys):
    def edit(t):
        del t[LAYER1_Q + ".weight_scale"]
    rewrite_shard(src, LAYER1_Q + ".weight_scale", edit)
    set_quant_config(src, lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8))
    report = inspect(src)
    assert any("unsupported bits 8" in p for p in report["problems"])
    assert any(LAYER1_Q + ".weight_scale" in p for p in report["problems"])
    assert cli.main(["inspect", str(src), "--json"]) == cli.EXIT_ERROR
    assert json.loads(capsys.readouterr().out)["problems"] == report["problems"]


def test_inspect_mxfp4_and_entry_point(good_sources):
    """The installed `gptoss-convert` script runs (subprocess) and inspect detects MXFP4."""
    exe = Path(sys.executable).parent / "gptoss-convert"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gptoss_jax.convert.cli"]
    result = subprocess.run([*cmd, "inspect", str(good_sources / "mxfp4"), "--json"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "mxfp4" and report["problems"] == []
    assert report["requantized"] == ["attention projections", "experts"]
    plan = {r["group"]: r for r in report["modules"]}
    assert list(plan) == ["embed", "attention", "router", "experts", "norms", "lm_head"]
    assert plan["experts"]["source"] == "MXFP4 (experts); bf16 biases"
    assert plan["experts"]["conversion"].startswith("dequantized exactly, then round-to-nearest int4")
    assert plan["embed"]["conversion"] == "kept as is (lossless)" and report["dtype"] == "bfloat16"
    text = subprocess.run([*cmd, "inspect", str(good_sources / "mxfp4"), "--dtype", "fp32"], capture_output=True,
                          text=True, timeout=300).stdout
    assert "embed" in text and "cast to fp32 (--dtype)" in text and "MXFP4 (experts)" in text


def test_cli_usage_errors(src, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main([str(src), str(tmp_path / "d"), "--format", "gguf"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([str(src), str(tmp_path / "d"), "--group-size", "abc"])
    assert cli.main([str(tmp_path / "nowhere"), str(tmp_path / "d"), "--quiet"]) == cli.EXIT_ERROR


# `python -m gptoss_jax.convert.cli` with each source item read at a big model's pace: the conversion is still
# running, most of its items unread, when the test signals it, even if the test process is scheduled late (unpaced,
# the 1-second conversion of this tiny model once finished before the signal on the loaded 2-core machine).
_PACED_CONVERT = """
import os, runpy, signal, sys, time
# Ctrl-C as in a terminal: a test run started in the background by a non-interactive shell inherits SIGINT ignored,
# and Python then installs no KeyboardInterrupt handler (the conversion would run to the end and exit 0).
signal.signal(signal.SIGINT, signal.default_int_handler)
import gptoss_jax.convert.sources as s
real = s.Source.read_item
marker = os.environ["PACE_MARKER"]
# From layer 2 on, each read first drops a marker file (the test's cue that the conversion is under way, whatever
# the writer's file layout) and then sleeps, so seconds of work remain for the SIGINT to land in however loaded the
# machine is.
def paced(self, name):
    if name.startswith("layers.") and int(name.split(".")[1]) >= 2:
        open(marker, "a").close()
        time.sleep(1.0)
    return real(self, name)
s.Source.read_item = paced
sys.argv[0] = "gptoss-convert"
runpy.run_module("gptoss_jax.convert.cli", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_in_a_real_process(tmp_path):
    """SIGINT to a running `gptoss-convert`: exit code 130, no DST and no temporary folder; a rerun succeeds."""
    import signal
    import time

    config = CONFIG.replace(num_hidden_layers=8, layer_types=default_layer_types(8))
    src, dst = tmp_path / "src", tmp_path / "dst"
    writers.synthetic_source(config, src, group=32, symmetric=False)
    marker = tmp_path / "reading-late-layers"
    cmd = [sys.executable, "-c", _PACED_CONVERT, str(src), str(dst), "--quiet", "--no-hash"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PACE_MARKER": str(marker)})
    deadline = time.monotonic() + 240
    sent = False
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.exists():
            proc.send_signal(signal.SIGINT)
            sent = True
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert sent, f"the conversion ended (exit {proc.returncode}) before reading layer 2: {err[-2000:]}"
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    assert "interrupted" in err
    assert not dst.exists()
    assert not list(tmp_path.glob("dst*")), list(tmp_path.glob("dst*"))
    assert cli.main([str(src), str(dst), "--quiet", "--no-hash"]) == 0
    assert checkpoint.read_metadata(dst)["complete"]


def test_thread_count_does_not_change_the_output(good_sources, tmp_path):
    outputs = []
    for threads in (1, 3):
        dst = tmp_path / f"t{threads}"
        convert(good_sources / "mxfp4", dst, threads=threads, hash_files=False)
        outputs.append(checkpoint.load_params(dst)[2])
    import jax
    for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
