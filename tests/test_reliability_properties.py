"""Property-based tests (hypothesis) of malformed-file handling: random corruptions of safetensors headers, of
model.safetensors.index.json, config.json and gptoss_checkpoint.json give either a clear GptOssError (one line from
the CLI) or a correct result — never another exception, never a partial output."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from gptoss_jax.convert import cli as convert_cli
from gptoss_jax.testing import writers
from gptoss_jax.convert.converter import convert
from gptoss_jax import checkpoint, testing
from gptoss_jax.config import ConfigError, GptOssConfig, default_layer_types
from gptoss_jax.errors import GptOssError
from gptoss_jax.safetensors_io import Checkpoint, CheckpointError, SafetensorsFile

CONFIG = GptOssConfig.from_preset("tiny").replace(
    num_hidden_layers=2, layer_types=default_layer_types(2), hidden_size=128, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
SLOWER = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    """A valid safetensors file of a few tensors of different dtypes (written by the safetensors package)."""
    import ml_dtypes
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_file({"a": rng.standard_normal((3, 4)).astype(np.float32),
               "b": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
               "c": rng.integers(0, 9, (2, 2, 2)).astype(np.int32),
               "empty": np.zeros((0, 3), np.float16)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict | bytes, data: bytes) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def read_all_or_error(path: Path) -> None:
    """The property: a clear CheckpointError naming the file, or every tensor readable with exactly the bytes the
    header declares (shape x itemsize, inside the file)."""
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return
    total = 0
    for name in f.keys():
        a = f.get(name)
        dtype, shape = f.info(name)
        assert a.shape == shape and a.dtype == dtype
        total += a.nbytes
    assert total == f._data_size  # the tensors tile the data exactly
    f.close()


@FAST
@given(data=st.data())
def test_safetensors_header_field_corruptions(small_file, tmp_path, data):
    header, body = split(small_file)
    names = [k for k in header if k != "__metadata__"]
    kind = data.draw(st.sampled_from(["replace-field", "drop-field", "replace-entry", "metadata", "add-entry",
                                      "offsets-shift", "truncate-data", "extra-data"]))
    name = data.draw(st.sampled_from(names))
    if kind == "replace-field":
        key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][key] = data.draw(json_values | st.lists(st.integers(-3, 70), max_size=4)
                                      | st.sampled_from(["F32", "BF16", "I8", "F64", "U8", "BOOL"]))
    elif kind == "drop-field":
        del header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "replace-entry":
        header[name] = data.draw(json_values)
    elif kind == "metadata":
        header["__metadata__"] = data.draw(json_values)
    elif kind == "add-entry":
        header[data.draw(st.text(min_size=1, max_size=6))] = data.draw(json_values)
    elif kind == "offsets-shift":
        b, e = header[name]["data_offsets"]
        d = data.draw(st.integers(-8, 8))
        header[name]["data_offsets"] = [b + d, e + data.draw(st.sampled_from([0, d]))]
    elif kind == "truncate-data":
        body = body[:data.draw(st.integers(0, max(len(body) - 1, 0)))]
    else:
        body = body + data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path / "x.safetensors"
    path.write_bytes(join(header, body))
    read_all_or_error(path)


@FAST
@given(data=st.data())
def test_safetensors_raw_byte_corruptions(small_file, tmp_path, data):
    raw = bytearray(small_file)
    n = struct.unpack("<Q", raw[:8])[0]
    kind = data.draw(st.sampled_from(["flip-header", "length", "truncate"]))
    if kind == "flip-header":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, 8 + n - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes(raw))
    read_all_or_error(path)


@FAST
@given(weight_map=st.dictionaries(st.sampled_from(["a", "b", "c", "empty"]),
                                  st.sampled_from(["x.safetensors", "../x.safetensors", "/tmp/x.safetensors",
                                                   "sub/x.safetensors", "..", "", "y.safetensors"]) | json_values,
                                  max_size=4) | json_values,
       wrap=st.booleans())
def test_index_corruptions(small_file, tmp_path, weight_map, wrap):
    folder = tmp_path / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "sub").mkdir(parents=True)
    for p in (folder / "x.safetensors", folder / "sub" / "x.safetensors", tmp_path / "x.safetensors"):
        p.write_bytes(small_file)
    index = {"metadata": {}, "weight_map": weight_map} if wrap else weight_map
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint(folder)
    except CheckpointError as e:
        assert str(folder) in str(e)
        return
    for shard, f in ckpt.files.items():  # a correct result only reads files of the folder itself
        assert f.path.parent == folder and "/" not in shard
    ckpt.close()


# ------------------------------------------------------------------------------------------- config.json (converter)
@pytest.fixture(scope="module")
def ct_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    writers.write_source(CONFIG, testing.random_hf_model(CONFIG, seed=5), root / "ct", "compressed-tensors",
                         group=64, symmetric=True)
    return root / "ct"


CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
               "layer_types", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta",
               "max_position_embeddings", "swiglu_alpha", "swiglu_limit", "attention_bias", "eos_token_id",
               "pad_token_id", "tie_word_embeddings", "model_type", "quantization_config"]


def mutate(d: dict, data, keys) -> dict:
    d = json.loads(json.dumps(d))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()) and key in d:
            if isinstance(d[key], dict) and d[key] and data.draw(st.booleans()):
                sub = data.draw(st.sampled_from(sorted(d[key])))
                d[key][sub] = data.draw(json_values)
            else:
                del d[key]
        else:
            d[key] = data.draw(json_values | st.integers(-1, 5))
    return d


@FAST
@given(data=st.data())
def test_config_json_corruptions_parse_or_raise_config_error(ct_source, data):
    cfg = json.loads((ct_source / "config.json").read_text())
    bad = mutate(cfg, data, CONFIG_KEYS)
    try:
        config = GptOssConfig.from_hf_dict(bad, source="config.json")
    except ConfigError as e:
        assert str(e).startswith("config.json: ")
        return
    config.validate()
    assert GptOssConfig.from_hf_dict(config.to_hf_dict()) == config


@SLOWER
@given(data=st.data())
def test_convert_with_corrupted_config_one_line_error_or_correct_checkpoint(ct_source, tmp_path, capsys, data):
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ct_source, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(mutate(cfg, data, CONFIG_KEYS)))
    dst = tmp_path / "out"
    shutil.rmtree(dst, ignore_errors=True)
    rc = convert_cli.main([str(src), str(dst), "--quiet", "--no-hash"])
    err = capsys.readouterr().err.strip().splitlines()
    if rc == 0:
        checkpoint.verify_checkpoint(dst)  # a complete, self-consistent checkpoint
    else:
        errors = [line for line in err if line.startswith("gptoss-convert: error: ")]
        assert rc == 1 and len(errors) == 1 and err[-1] == errors[0], err  # one line (after the progress log)
        assert "Traceback" not in "\n".join(err)
        assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["src"], ["out", "src"])  # no DST.tmp-* ever


# ------------------------------------------------------------------------------------------ gptoss_checkpoint.json
@pytest.fixture(scope="module")
def converted(ct_source, tmp_path_factory):
    return convert(ct_source, tmp_path_factory.mktemp("conv") / "ckpt", hash_files=False)


META_KEYS = ["format", "checkpoint_version", "layout_version", "dtype", "quantization", "items", "files", "complete",
             "created", "converter", "source"]


@SLOWER
@given(data=st.data())
def test_metadata_corruptions_raise_checkpoint_error_or_load_the_same(converted, tmp_path, data):
    ckpt = tmp_path / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(converted, ckpt)
    meta_path = ckpt / checkpoint.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    bad = mutate(meta, data, META_KEYS)
    assume(bad != meta)
    meta_path.write_text(json.dumps(bad))
    try:
        checkpoint.verify_checkpoint(ckpt, digests=False)
    except CheckpointError as e:
        assert str(ckpt) in str(e)
        return
    except GptOssError as e:  # pragma: no cover - any other GptOssError would be a wrong class
        pytest.fail(f"wrong error class {type(e).__name__}: {e}")
    # accepted: only fields that do not describe the data changed; the arrays are exactly the original ones
    for key in ("format", "checkpoint_version", "layout_version", "dtype", "quantization", "files", "complete"):
        assert bad.get(key) == meta.get(key), key
    assert sorted(bad["items"]) == sorted(meta["items"])


@pytest.mark.parametrize("edit", [
    lambda m: m.__setitem__("quantization", None),  # int4 codes would load as 16-bit weights
    lambda m: m["quantization"].__setitem__("act_order", None),
    lambda m: m["quantization"].__setitem__("modules", ["q_proj", "mlp"]),
    lambda m: m["quantization"].__setitem__("symmetric", not m["quantization"]["symmetric"]),
])
def test_metadata_that_misdescribes_the_arrays_is_refused(converted, tmp_path, edit):
    """Cases hypothesis found: metadata edits that no longer describe the stored arrays fail verification."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    meta_path = ckpt / checkpoint.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=str(ckpt)):
        checkpoint.verify_checkpoint(ckpt, digests=False)


@SLOWER
@given(data=st.data())
def test_convert_with_corrupted_safetensors_header_one_line_error_or_correct_checkpoint(ct_source, tmp_path, capsys,
                                                                                        data):
    """End to end: a random field of a random tensor's header entry in the source -> one line from gptoss-convert
    and no output, or a complete checkpoint that verifies."""
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ct_source, src)
    header, body = split((src / "model.safetensors").read_bytes())
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    header[name][key] = data.draw(json_values | st.lists(st.integers(0, 300), max_size=3)
                                  | st.sampled_from(["F32", "BF16", "F16", "I32", "U8"]))
    (src / "model.safetensors").write_bytes(join(header, body))
    dst = tmp_path / "out"
    shutil.rmtree(dst, ignore_errors=True)
    rc = convert_cli.main([str(src), str(dst), "--quiet", "--no-hash"])
    err = capsys.readouterr().err.strip().splitlines()
    if rc == 0:
        checkpoint.verify_checkpoint(dst)
    else:
        errors = [line for line in err if line.startswith("gptoss-convert: error: ")]
        assert rc == 1 and len(errors) == 1 and err[-1] == errors[0] and "model.safetensors" in errors[0], err
        assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["src"], ["out", "src"])
