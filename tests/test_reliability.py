"""Reliability of everything that touches files (docs/RELIABILITY.md, kinds 1-4 and 6, and non-finite tensors):
any path form works; nothing is overwritten or deleted that the command did not create; converted checkpoints carry
per-file digests checked on load; malformed or hostile files get one clear GptOssError naming the file and field;
OS errors and SIGINT / SIGTERM give one line and leave nothing behind.

The cases of ../shared/cases/ this file holds: relative-checkpoint-path, rel-relative-paths,
rel-force-dst-overlaps-src, rel-force-deletes-non-checkpoint, rel-demo-out-overwrites, rel-checkpoint-no-integrity,
rel-convert-malformed-config-traceback, rel-checkpoint-metadata-malformed-traceback, rel-index-path-traversal,
rel-config-huge-layers-dos, rel-nonfinite-16bit-tensors, rel-convert-oserror-traceback, rel-sigint-leaves-tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.convert import cli as convert_cli
from gptoss_jax.testing import writers
from gptoss_jax.convert.converter import convert
from gptoss_jax import checkpoint, fsutil, testing
from gptoss_jax.config import GptOssConfig, default_layer_types
from gptoss_jax.errors import GptOssError
from gptoss_jax.safetensors_io import CheckpointError

CONFIG = GptOssConfig.from_preset("tiny").replace(
    num_hidden_layers=2, layer_types=default_layer_types(2), hidden_size=128, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32)
ST_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A compressed-tensors (asymmetric, group 64) source, an unquantized bf16 HF folder and its conversion."""
    root = tmp_path_factory.mktemp("rel")
    writers.write_source(CONFIG, testing.random_hf_model(CONFIG, seed=3), root / "ct", "compressed-tensors",
                         group=64, symmetric=False)
    testing.save_random_hf_checkpoint(CONFIG, root / "hf", seed=4)
    convert(root / "ct", root / "converted", hash_files=False)
    return root


@pytest.fixture
def ct(sources, tmp_path):
    shutil.copytree(sources / "ct", tmp_path / "ct")
    return tmp_path / "ct"


@pytest.fixture
def converted(sources, tmp_path):
    shutil.copytree(sources / "converted", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_convert_cli(capsys, *argv) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of gptoss-convert in-process."""
    rc = convert_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def assert_one_line_error(rc: int, err: list[str], prog: str = "gptoss-convert", *needles: str) -> None:
    """Exit 1 and the error as one line, the last one (the converter's progress log may precede it)."""
    assert rc == 1, err
    assert "Traceback" not in "\n".join(err), err
    errors = [line for line in err if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], (n, errors[0])


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def flat(tree) -> dict:
    out = {}

    def walk(t, prefix):
        for k, v in t.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = np.asarray(v)
    walk(tree, "")
    return out


# ------------------------------------------------------------------------------------------------------ 0. errors
def test_every_user_error_is_a_gptoss_error_and_keeps_its_builtin_base():
    from gptoss_jax.convert.sources import ConvertError
    from gptoss_jax.api import LoadError, TokenizerMissingError
    from gptoss_jax.config import ConfigError
    from gptoss_jax.generate import GenerationError
    from gptoss_jax.harmony import HarmonyParseError
    from gptoss_jax.sharding import ShardingError
    from gptoss_jax.tokenizer import TokenizerError
    from gptoss_jax.kernels.int4_layout import Int4LayoutError
    for cls, builtin in ((ConfigError, ValueError), (CheckpointError, ValueError), (ConvertError, ValueError),
                         (LoadError, ValueError), (GenerationError, ValueError), (TokenizerError, ValueError),
                         (ShardingError, ValueError), (HarmonyParseError, ValueError),
                         (TokenizerMissingError, RuntimeError), (fsutil.DestinationError, ValueError)):
        assert issubclass(cls, GptOssError) and issubclass(cls, builtin), cls
    assert gptoss_jax.GptOssError is GptOssError
    assert not issubclass(Int4LayoutError, GptOssError)  # standalone kernels package: listed in user_errors instead
    assert set(gptoss_jax.errors.user_errors()) == {GptOssError, Int4LayoutError, OSError}


# -------------------------------------------------------------------------------------------------------- 1. paths
@pytest.mark.parametrize("form", ["relative", "home", "symlink", "trailing-slash"])
def test_convert_and_load_accept_any_path_form(form, sources, tmp_path, monkeypatch, capsys):
    """relative-checkpoint-path, rel-relative-paths: the same conversion and the same arrays whatever the spelling
    of SRC and DST (Orbax itself refuses relative paths)."""
    shutil.copytree(sources / "ct", tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    if form == "symlink":
        (tmp_path / "link").symlink_to(tmp_path / "src")
    spell = {"relative": lambda n: n, "home": lambda n: f"~/{n}", "trailing-slash": lambda n: f"{tmp_path / n}/",
             "symlink": lambda n: str(tmp_path / ("link" if n == "src" else n))}[form]
    rc, err = run_convert_cli(capsys, spell("src"), spell("out"), "--quiet", "--no-hash")
    assert rc == 0, err
    assert (tmp_path / "out" / checkpoint.METADATA_FILE).is_file() and no_temp_left(tmp_path)
    _, _, got = checkpoint.load_params(spell("out"))
    _, _, want = checkpoint.load_params(sources / "converted")
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_api_and_cli_load_relative_paths(sources, tmp_path, monkeypatch, capsys):
    """gptoss_jax.load and `gptoss-jax info` on converted and HF folders given relative (the README's spelling)."""
    from gptoss_jax import cli
    shutil.copytree(sources / "converted", tmp_path / "conv")
    shutil.copytree(sources / "hf", tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    for name in ("conv", "hf/"):
        model = gptoss_jax.load(name, dtype="float32")
        assert model.config.num_hidden_layers == 2
        assert cli.main(["info", name, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["config"]["hidden_size"] == 128


# ------------------------------------------------------------------------ 2. never destroy what you did not create
@pytest.mark.parametrize("case", ["dst-is-src", "dst-holds-src", "dst-is-symlink-to-src", "dst-inside-src",
                                  "not-a-checkpoint", "dst-is-a-file"])
def test_force_never_deletes_what_it_did_not_create(case, sources, tmp_path, capsys):
    """rel-force-dst-overlaps-src, rel-force-deletes-non-checkpoint: --force replaces only a previous gptoss-jax
    checkpoint; every refusal is one line and every file stays byte for byte."""
    models = tmp_path / "models"
    shutil.copytree(sources / "ct", models / "src")
    (models / "notes.txt").write_text("not part of any checkpoint\n")
    src = models / "src"
    if case == "dst-is-src":
        dst = src
    elif case == "dst-holds-src":
        dst = models
    elif case == "dst-is-symlink-to-src":
        dst = tmp_path / "link"
        dst.symlink_to(src)
    elif case == "dst-inside-src":
        dst = src / "inner"
        shutil.copytree(sources / "converted", dst)  # even a checkpoint: it lies inside the source
    elif case == "not-a-checkpoint":
        dst = tmp_path / "documents"
        dst.mkdir()
        (dst / "thesis.tex").write_text("years of work\n")
    else:
        dst = tmp_path / "a_file"
        dst.write_text("x")
    before = tree_digest(tmp_path)
    rc, err = run_convert_cli(capsys, src, dst, "--force", "--quiet", "--no-hash")
    assert_one_line_error(rc, err)
    assert tree_digest(tmp_path) == before


def test_force_replaces_a_previous_checkpoint_and_nothing_else(sources, tmp_path, capsys):
    dst = tmp_path / "out"
    shutil.copytree(sources / "converted", dst)
    (dst / checkpoint.METADATA_FILE).write_text((dst / checkpoint.METADATA_FILE).read_text())  # a checkpoint
    rc, err = run_convert_cli(capsys, sources / "ct", dst, "--quiet", "--no-hash")
    assert_one_line_error(rc, err, "gptoss-convert", "already exists")
    rc, err = run_convert_cli(capsys, sources / "ct", dst, "--force", "--quiet", "--no-hash")
    assert rc == 0, err
    checkpoint.verify_checkpoint(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-* / .tmp-* left


def test_demo_out_never_overwrites(sources, tmp_path, capsys):
    """rel-demo-out-overwrites: `gptoss-jax demo --out` refuses an existing non-empty folder (one line, exit 2)."""
    from gptoss_jax import cli
    model = tmp_path / "my-model"
    shutil.copytree(sources / "hf", model)
    before = tree_digest(model)
    assert cli.main(["demo", "--out", str(model), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an empty folder" in err[0], err
    assert tree_digest(model) == before


def test_demo_out_is_written_through_a_temporary_folder(tmp_path, monkeypatch, capsys):
    """`demo --out` works in a temporary sibling renamed at the end: a failure (here the disk filling up during the
    int4 conversion) leaves nothing behind. (The successful rename: tests/test_cli.py::test_demo.)"""
    from gptoss_jax import cli
    seen = []

    def failing_convert(src, dst, **kw):
        seen.append(Path(dst))
        Path(dst).mkdir(parents=True)
        (Path(dst) / "partial").write_text("x")
        raise OSError(28, "No space left on device", str(Path(dst) / "partial"))
    monkeypatch.setattr("gptoss_jax.convert.converter.convert", failing_convert)
    assert cli.main(["demo", "--out", str(tmp_path / "new")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert seen and seen[0].parent.name.startswith("new.tmp-")
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_folders_of_dead_runs_are_cleaned_and_nothing_else(sources, tmp_path):
    """A SIGKILLed run leaves DST.tmp-*; the next run removes it (owner pid dead), never a folder without our owner
    file nor one of a live process."""
    dst = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "out.tmp-dead0000"
    (stale / "params").mkdir(parents=True)
    (stale / fsutil.OWNER_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    alive = tmp_path / "out.tmp-live0000"
    alive.mkdir()
    (alive / fsutil.OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    foreign = tmp_path / "out.tmp-user0000"
    foreign.mkdir()
    (foreign / "data.txt").write_text("someone else's")
    convert(sources / "ct", dst, hash_files=False)
    assert not stale.exists() and alive.exists() and (foreign / "data.txt").exists()


# ---------------------------------------------------------------------------------------------------- 3. integrity
def data_files(ckpt: Path) -> list[Path]:
    return [p for p in (ckpt / "params").rglob("*") if p.is_file() and p.parent.name == "d"]


def test_metadata_records_size_and_sha256_of_every_file(converted):
    meta = checkpoint.read_metadata(converted)
    on_disk = {p.relative_to(converted).as_posix() for p in converted.rglob("*") if p.is_file()}
    assert set(meta["files"]) == on_disk - {checkpoint.METADATA_FILE}
    for rel, info in meta["files"].items():
        data = (converted / rel).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel


def test_flipped_byte_in_any_data_file_is_refused_naming_it(converted, rng, capsys, monkeypatch):
    """rel-checkpoint-no-integrity: one flipped byte anywhere in array data is refused by load (default verify) and
    by `gptoss-jax verify`, naming the file."""
    from gptoss_jax import cli
    assert cli.main(["verify", str(converted)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    files = data_files(converted)
    assert len(files) >= 2 * CONFIG.num_hidden_layers + 2
    victim = files[rng.integers(len(files))]
    raw = bytearray(victim.read_bytes())
    raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256") as e:
        gptoss_jax.load(converted)
    assert str(victim) in str(e.value)
    assert cli.main(["verify", str(converted)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(victim) in err[0]
    # verify=False skips the digests of large files (here all are small: pretend they are large)
    monkeypatch.setattr(fsutil, "ALWAYS_HASH_BELOW", 0)
    try:
        checkpoint.load_params(converted, verify=False)  # the int4 data still decodes ...
    except CheckpointError as e:  # ... or Orbax cannot decompress the chunk: still a clear error naming the item
        assert str(victim.parents[2]) in str(e)


@pytest.mark.parametrize("damage", ["truncate", "delete", "extra-file", "config-edit", "orbax-metadata-edit"])
def test_structure_sizes_and_small_files_are_checked_even_without_digests(damage, converted):
    """Sizes, presence, no stray files and the digests of the small files that decide how data is read
    (config.json, Orbax metadata) are checked even with verify=False."""
    victim = max(data_files(converted), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    elif damage == "delete":
        victim.unlink()
    elif damage == "extra-file":
        victim = victim.parent / "stray"
        victim.write_bytes(b"x")
    elif damage == "config-edit":  # same size, different model: rms_norm_eps 1e-05 -> 2e-05
        victim = converted / "config.json"
        text = victim.read_text()
        assert "1e-05" in text
        victim.write_text(text.replace("1e-05", "2e-05"))
    else:
        victim = converted / "params" / "head" / "_METADATA"
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_params(converted, verify=False)
    assert str(victim) in str(e.value)


def test_config_metadata_and_arrays_must_agree(converted):
    """A config.json that disagrees with the metadata (layer count) or with the arrays (sizes) is refused, naming
    config.json or the item, even when its recorded digest is updated to match."""
    def edit_config(change):
        cfg = json.loads((converted / "config.json").read_text())
        cfg.update(change)
        (converted / "config.json").write_text(json.dumps(cfg))
        meta = json.loads((converted / checkpoint.METADATA_FILE).read_text())
        data = (converted / "config.json").read_bytes()
        meta["files"]["config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (converted / checkpoint.METADATA_FILE).write_text(json.dumps(meta))

    original = (converted / "config.json").read_text()
    edit_config({"num_hidden_layers": 3, "layer_types": list(default_layer_types(3))})
    with pytest.raises(CheckpointError, match="config.json: num_hidden_layers is 3"):
        checkpoint.load_params(converted)
    (converted / "config.json").write_text(original)
    edit_config({"intermediate_size": 256})
    with pytest.raises(CheckpointError, match=r"params/layers\.0"):
        checkpoint.load_params(converted)


# ------------------------------------------------------------------------------------ 4. malformed or hostile files
CONFIG_EDITS = {
    "layer_types is a number": ("layer_types", 5),
    "eos_token_id is a string": ("eos_token_id", "eos"),
    "eos_token_id is a float": ("eos_token_id", 1.5),
    "hidden_size is a string": ("hidden_size", "128"),
    "hidden_size is true": ("hidden_size", True),
    "rms_norm_eps is a string": ("rms_norm_eps", "1e-5"),
    "attention_bias is a string": ("attention_bias", "yes"),
    "rope_parameters is a list": ("rope_parameters", [1]),
    "rope_parameters.truncate is a string": ("rope_parameters", {"rope_type": "yarn", "truncate": "no"}),
    "quantization_config is a string": ("quantization_config", "awq"),
    "config_groups is a list": ("quantization_config.config_groups", [1]),
    "weights is a string": ("quantization_config.config_groups.group_0.weights", "int4"),
    "num_bits is a string": ("quantization_config.config_groups.group_0.weights.num_bits", "4"),
}


def set_dotted(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d[k]
    d[last] = value


@pytest.mark.parametrize("name", list(CONFIG_EDITS))
def test_malformed_config_json_gives_one_line_naming_file_and_field(name, ct, tmp_path, capsys):
    """rel-convert-malformed-config-traceback: every config.json field of the wrong type -> one line naming
    config.json and the field; nothing written."""
    dotted, value = CONFIG_EDITS[name]
    cfg = json.loads((ct / "config.json").read_text())
    set_dotted(cfg, dotted, value)
    (ct / "config.json").write_text(json.dumps(cfg))
    rc, err = run_convert_cli(capsys, ct, tmp_path / "out", "--quiet", "--no-hash")
    assert_one_line_error(rc, err, "gptoss-convert", "config.json", dotted.split(".")[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


META_EDITS = {
    "metadata is a list": lambda m: [m],
    "quantization is a string": lambda m: m.__setitem__("quantization", "int4"),
    "group_size is a string": lambda m: m["quantization"].__setitem__("group_size", "32"),
    "symmetric is a number": lambda m: m["quantization"].__setitem__("symmetric", 1),
    "dtype unknown": lambda m: m.__setitem__("dtype", "int8"),
    "items is a string": lambda m: m.__setitem__("items", "embed"),
    "items unknown": lambda m: m["items"].append("layers.x"),
    "files missing": lambda m: m.pop("files"),
    "files entry escapes": lambda m: m["files"].__setitem__("../outside", {"size": 1, "sha256": "0" * 64}),
    "files size negative": lambda m: next(iter(m["files"].values())).__setitem__("size", -1),
    "files digest not hex": lambda m: next(iter(m["files"].values())).__setitem__("sha256", "xyz"),
    "complete false": lambda m: m.__setitem__("complete", False),
    "checkpoint_version old": lambda m: m.__setitem__("checkpoint_version", 1),
}


@pytest.mark.parametrize("name", list(META_EDITS))
def test_malformed_metadata_gives_checkpoint_error_naming_the_file(name, converted):
    """rel-checkpoint-metadata-malformed-traceback (metadata half)."""
    meta_path = converted / checkpoint.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta = META_EDITS[name](meta) or meta
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        gptoss_jax.load(converted)
    assert str(meta_path) in str(e.value)


@pytest.mark.parametrize("missing", ["_METADATA", "manifest.ocdbt"])
def test_missing_orbax_files_give_checkpoint_error(missing, converted):
    """rel-checkpoint-metadata-malformed-traceback (Orbax half): a missing item file is named, never an
    AttributeError from Orbax returning None."""
    victim = converted / "params" / "layers.0.gate_up" / missing
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        gptoss_jax.load(converted)
    assert str(victim) in str(e.value)


def split_into_shards(src: Path) -> dict[str, str]:
    """model.safetensors -> shard0/1.safetensors + index (returns the weight map)."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({k: tensors[k] for k in part}, str(src / f"shard{i}.safetensors"))
        weight_map.update({k: f"shard{i}.safetensors" for k in part})
    (src / "model.safetensors").unlink()
    return weight_map


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/shard1.safetensors", "..", ""])
def test_index_entries_must_stay_inside_the_folder(shard, ct, tmp_path, capsys):
    """rel-index-path-traversal: an index naming a file outside the folder (../, absolute, sub-folder) is refused
    before anything is read, by the converter and by gptoss_jax.load."""
    wm = split_into_shards(ct)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(ct / "shard1.safetensors", outside)
    (ct / "sub").mkdir()
    shutil.copy(ct / "shard1.safetensors", ct / "sub" / "shard1.safetensors")
    name = str(outside) if shard == "ABSOLUTE" else shard
    wm = {k: (name if v == "shard1.safetensors" else v) for k, v in wm.items()}
    (ct / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    rc, err = run_convert_cli(capsys, ct, tmp_path / "out", "--quiet", "--no-hash")
    assert_one_line_error(rc, err, "gptoss-convert", "model.safetensors.index.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field_, value", [("num_hidden_layers", 1_000_000), ("num_hidden_layers", 3),
                                           ("num_local_experts", 1_000_000), ("vocab_size", 10**9)])
def test_config_sizes_are_checked_against_the_files_before_allocating(field_, value, ct, sources, tmp_path, capsys):
    """rel-config-huge-layers-dos: sizes claimed by config.json are compared with the safetensors headers before
    any per-layer table is built: a quick one-line error (converter and HF loader)."""
    for folder in (ct, tmp_path / "hf"):
        if folder.name == "hf":
            shutil.copytree(sources / "hf", folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg[field_] = value
        cfg.pop("layer_types", None)
        (folder / "config.json").write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        if folder is ct:
            rc, err = run_convert_cli(capsys, folder, tmp_path / "out", "--quiet", "--no-hash")
            assert_one_line_error(rc, err, "gptoss-convert", "config.json", field_)
        else:
            with pytest.raises(GptOssError, match=f"config.json.*{field_}"):
                gptoss_jax.load(folder)
        assert time.perf_counter() - t0 < 5.0


def poison(path: Path, name: str, value) -> None:
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    info = json.loads(raw[8:8 + n])[name]
    item = np.dtype(ST_DTYPES[info["dtype"]])
    begin = 8 + n + info["data_offsets"][0] + item.itemsize * 3  # an element past the first
    raw[begin:begin + item.itemsize] = np.array([value], item).tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensor, value", [("model.layers.0.mlp.router.bias", np.nan),
                                           ("model.embed_tokens.weight", np.inf),
                                           ("model.norm.weight", -np.inf),
                                           ("model.layers.1.mlp.experts.0.down_proj.bias", np.nan),
                                           ("model.layers.1.self_attn.sinks", np.nan)])
def test_nonfinite_16bit_tensors_are_refused_naming_file_and_tensor(tensor, value, ct, sources, tmp_path, capsys):
    """rel-nonfinite-16bit-tensors: NaN / Inf in any 16-bit tensor is refused at conversion; gptoss_jax.load of an
    HF folder refuses it too (every logit would be NaN)."""
    poison(ct / "model.safetensors", tensor, value)
    rc, err = run_convert_cli(capsys, ct, tmp_path / "out", "--quiet", "--no-hash")
    assert_one_line_error(rc, err, "gptoss-convert", "model.safetensors", tensor, "non-finite")
    assert not (tmp_path / "out").exists() and no_temp_left(tmp_path)
    hf = tmp_path / "hf"
    shutil.copytree(sources / "hf", hf)
    hf_name = tensor.replace("experts.0.down_proj.bias", "experts.down_proj_bias")
    poison(hf / "model.safetensors", hf_name, value)
    with pytest.raises(CheckpointError, match="non-finite") as e:
        gptoss_jax.load(hf)
    assert hf_name in str(e.value)


def test_cast_overflow_to_fp16_is_refused(sources, tmp_path, capsys):
    """A finite fp32/bf16 value beyond fp16's range becomes Inf when cast (--dtype fp16): refused, naming it."""
    hf = tmp_path / "hf"
    shutil.copytree(sources / "hf", hf)
    poison(hf / "model.safetensors", "model.norm.weight", 1e6)
    rc, err = run_convert_cli(capsys, hf, tmp_path / "out", "--dtype", "fp16", "--quiet", "--no-hash")
    assert_one_line_error(rc, err, "gptoss-convert", "model.norm.weight", "float16")


@pytest.mark.parametrize("eos", ['"2"', "1.5", "[1, \"x\"]", "-1", "{}", "[]"])
def test_malformed_generation_config_is_named(eos, sources, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(sources / "hf", hf)
    (hf / "generation_config.json").write_text('{"eos_token_id": ' + eos + "}")
    with pytest.raises(GptOssError, match="generation_config.json: eos_token_id"):
        gptoss_jax.load(hf, tokenizer=False)


@pytest.mark.parametrize("case", ["missing", "a-file", "empty-folder", "config-is-a-folder", "config-not-utf8",
                                  "config-duplicate-key", "config-nan", "shard-is-a-folder", "header-not-json"])
def test_gptoss_jax_cli_one_line_for_broken_folders(case, sources, tmp_path, capsys):
    """`gptoss-jax info` on broken checkpoint folders: one line naming the path, never a traceback."""
    from gptoss_jax import cli
    folder = tmp_path / "ckpt"
    if case != "missing":
        shutil.copytree(sources / "hf", folder)
    cfg = folder / "config.json"
    if case == "a-file":
        folder = cfg
    elif case == "empty-folder":
        shutil.rmtree(folder)
        folder.mkdir()
    elif case == "config-is-a-folder":
        cfg.unlink()
        cfg.mkdir()
    elif case == "config-not-utf8":
        cfg.write_bytes(b"\xff\xfe{}")
    elif case == "config-duplicate-key":
        cfg.write_text(cfg.read_text().replace("{", '{"hidden_size": 64, ', 1))
    elif case == "config-nan":
        cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'))
    elif case == "shard-is-a-folder":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").mkdir()
    elif case == "header-not-json":
        raw = (folder / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        (folder / "model.safetensors").write_bytes(raw[:8] + b"x" * n + raw[8 + n:])
    assert cli.main(["info", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gptoss-jax info: error: ") and str(folder) in err[0], err


# ------------------------------------------------------------------------------------ 6. OS errors and interrupts
def test_unwritable_destinations_give_one_line(ct, tmp_path, capsys):
    """rel-convert-oserror-traceback: a parent that is a file, a file system refusing writes -> one line naming
    the path, nothing left."""
    (tmp_path / "a_file").write_text("x")
    for dst in (tmp_path / "a_file" / "out", Path("/proc/gptoss-rel-test/out")):
        rc, err = run_convert_cli(capsys, ct, dst, "--quiet", "--no-hash")
        assert_one_line_error(rc, err)
        assert str(dst.parent) in err[-1] or str(dst.parent.parent) in err[-1]


@pytest.mark.parametrize("errno_name", ["EROFS", "EACCES", "EPERM", "ENOSPC", "EDQUOT", "ENOTDIR", "EIO",
                                        "ENAMETOOLONG"])
def test_every_os_error_class_creating_the_output_gives_one_line(errno_name, ct, tmp_path, monkeypatch, capsys):
    """Whatever OSError creating DST.tmp-* raises (read-only file system, permission, quota, I/O...), one line
    naming the path and the reason; nothing left."""
    import errno
    code = getattr(errno, errno_name)
    target = tmp_path / "out.tmp-x"

    def refuse(self, *a, **k):
        raise OSError(code, os.strerror(code), str(target))
    monkeypatch.setattr(Path, "mkdir", refuse)
    rc, err = run_convert_cli(capsys, ct, tmp_path / "out", "--quiet", "--no-hash")
    assert_one_line_error(rc, err, "gptoss-convert", str(target), os.strerror(code))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


@pytest.mark.parametrize("where", ["orbax", "copy"])
def test_disk_full_gives_one_line_and_leaves_nothing(where, ct, tmp_path, monkeypatch, capsys):
    """Disk full (ENOSPC) while writing an item (Orbax/TensorStore report it as ValueError) or copying a file: one
    line naming the path, the temporary folder removed."""
    import errno

    import orbax.checkpoint as ocp
    if where == "orbax":
        def full(self, *a, **k):
            raise ValueError("RESOURCE_EXHAUSTED: Error writing to file: No space left on device")
        monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", full)
    else:
        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out.tmp-x" / "tokenizer.json"))
        monkeypatch.setattr(checkpoint.shutil, "copyfile", full)
    rc, err = run_convert_cli(capsys, ct, tmp_path / "out", "--quiet", "--no-hash")
    assert_one_line_error(rc, err, "gptoss-convert", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_signal_during_an_orbax_write_is_held_until_the_item_is_written(ct, tmp_path, monkeypatch):
    """SIGINT arriving while Orbax writes is raised only after the item's threads are done, then the temporary
    folder is removed completely (the race behind rel-sigint-leaves-tmp)."""
    import orbax.checkpoint as ocp
    real_save = ocp.PyTreeCheckpointer.save
    calls = []

    def save_with_signal(self, *a, **k):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-write
        return real_save(self, *a, **k)
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save_with_signal)
    with pytest.raises(KeyboardInterrupt):
        convert(ct, tmp_path / "out", hash_files=False)
    assert calls == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


SLOW_CONVERT = """
import sys, time
import gptoss_jax.convert.sources as s
real = s.Source.read_item
s.Source.read_item = lambda self, name: (time.sleep(0.25), real(self, name))[1]  # a big model's pace
from gptoss_jax.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_leave_nothing(sig, sources, tmp_path):
    """rel-sigint-leaves-tmp: SIGINT / SIGTERM in the middle of a conversion -> exit 128+signum, one line, no
    DST.tmp-* and no DST left; a rerun succeeds."""
    dst = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(sources / "ct"), str(dst), "--quiet", "--no-hash"],
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        tmps = list(tmp_path.glob("out.tmp-*/params/*"))
        if len(tmps) >= 2:
            break
        time.sleep(0.02)
    assert p.poll() is None, "conversion finished before the signal"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    lines = [line for line in err.strip().splitlines() if not line.startswith(f"{sources / 'ct'}: ")]  # the log
    assert p.returncode == 128 + sig, err
    assert lines == [f"gptoss-convert: interrupted ({signal.Signals(sig).name}); nothing was left at {dst}"], err
    time.sleep(0.5)  # any straggling writer thread would recreate files now
    assert list(tmp_path.iterdir()) == []
    convert(sources / "ct", dst, hash_files=False)
    checkpoint.verify_checkpoint(dst)
