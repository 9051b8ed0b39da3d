"""gptoss_jax.checkpoint: item-by-item Orbax save / restore of the parameter tree, metadata, refusal of unfinished
folders, dtype casting and sharded restore."""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax import checkpoint
from gptoss_jax.config import GptOssConfig, default_layer_types
from gptoss_jax.model import params_of
from gptoss_jax.model import GptOss
from gptoss_jax.params import QuantSpec, iter_specs, model_specs, unstack_layers
from gptoss_jax.safetensors_io import CheckpointError

CONFIG = GptOssConfig.from_preset("tiny").replace(num_hidden_layers=2, layer_types=default_layer_types(2))
QUANT = QuantSpec(group_size=32, symmetric=False, scale_dtype="bfloat16")


@pytest.fixture(scope="module")
def params():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print("model seed", seed)
    return params_of(GptOss(CONFIG, dtype=jnp.bfloat16, quant=QUANT, rngs=nnx.Rngs(seed)))


@pytest.fixture(scope="module")
def saved(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save_params(path, params, CONFIG, dtype="bfloat16", quant=QUANT, metadata={"note": "test"})
    return path


def leaves(tree):
    return {p: v for p, v in _walk(tree)}


def _walk(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def test_round_trip_is_exact(params, saved):
    config, quant, restored = checkpoint.load_params(saved)
    assert config == CONFIG and quant == QUANT
    want, got = leaves(params), leaves(restored)
    assert set(want) == set(got) == {p for p, _ in iter_specs(model_specs(CONFIG, quant=QUANT))}
    for path, a in want.items():
        b = got[path]
        assert isinstance(b, jax.Array), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    meta = checkpoint.read_metadata(saved)
    assert meta["note"] == "test" and meta["complete"] and meta["dtype"] == "bfloat16"
    assert meta["items"] == checkpoint.item_names(CONFIG)
    assert (saved / checkpoint.PARAMS_DIR / "layers.1.gate_up").is_dir()


def test_dtype_cast_keeps_int4_arrays(saved):
    _, quant, restored = checkpoint.load_params(saved, dtype="float32")
    layer = unstack_layers(restored)["layers"][0]
    assert restored["embed"]["embedding"].dtype == jnp.float32
    assert layer["attn"]["q_proj"]["bias"].dtype == jnp.float32
    w = layer["mlp"]["experts"]["gate_up"]
    chex.assert_trees_all_equal_dtypes(w, {"packed": jnp.zeros((), jnp.int32), "scales": jnp.zeros((), jnp.bfloat16),
                                           "zeros": jnp.zeros((), jnp.uint8)})


def test_load_model_runs(saved, params):
    model = checkpoint.load_model(saved)
    assert model.quant == QUANT
    tokens = jnp.asarray(np.random.default_rng().integers(0, CONFIG.vocab_size, (1, 5)))
    logits, _ = model(tokens)
    chex.assert_shape(logits, (1, 5, CONFIG.vocab_size))
    chex.assert_tree_all_finite(logits.astype(jnp.float32))


def test_shardings_forms(saved):
    device = jax.devices()[0]
    single = jax.sharding.SingleDeviceSharding(device)
    seen = []

    def by_path(path, spec):
        seen.append((path, spec.shape))
        return single

    _, _, restored = checkpoint.load_params(saved, shardings=by_path)
    assert {p for p, _ in seen} == set(leaves(restored))  # paths of the model tree (layers stacked)
    assert (("layers", "mlp", "experts", "down", "packed"), (CONFIG.num_hidden_layers, 8, 256 // 8, 256)) in seen
    _, _, restored = checkpoint.load_params(saved, shardings=single)
    assert all(a.sharding == single for a in leaves(restored).values())


def test_unquantized_checkpoint(tmp_path):
    p = params_of(GptOss(CONFIG, dtype=jnp.float32, quant=None, rngs=nnx.Rngs(1)))
    checkpoint.save_params(tmp_path / "fp", p, CONFIG, dtype="float32")
    _, quant, restored = checkpoint.load_params(tmp_path / "fp", dtype="bfloat16")
    assert quant is None
    assert restored["layers"]["mlp"]["experts"]["down"].dtype == jnp.bfloat16


def test_refuses_unfinished_or_foreign_folders(saved, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load_params(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="did not finish"):
        checkpoint.read_metadata(tmp_path / "empty")
    meta = json.loads((saved / checkpoint.METADATA_FILE).read_text())
    for change, needle in (({"complete": False}, "not a completed"), ({"layout_version": 99}, "layout version 99")):
        bad = tmp_path / f"bad{len(needle)}"
        bad.mkdir()
        (bad / checkpoint.METADATA_FILE).write_text(json.dumps({**meta, **change}))
        with pytest.raises(CheckpointError, match=needle):
            checkpoint.load_params(bad)


def test_missing_item_folder_is_named(saved, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    shutil.rmtree(copy / checkpoint.PARAMS_DIR / "layers.1")
    with pytest.raises(CheckpointError, match="layers.1"):
        checkpoint.load_params(copy)


def test_writer_checks_items_and_cleans_up(params, tmp_path):
    dst = tmp_path / "w"
    with pytest.raises(CheckpointError, match="expected"):
        with checkpoint.CheckpointWriter(dst, CONFIG, quant=QUANT) as w:
            bad = checkpoint.select_item(unstack_layers(params), "layers.0")
            bad["attn"] = {**bad["attn"], "sinks": np.zeros(3, np.float32)}
            w.write_item("layers.0", bad)
    assert not dst.exists() and not list(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="never written"):
        with checkpoint.CheckpointWriter(dst, CONFIG, quant=QUANT) as w:
            w.write_item("embed", checkpoint.select_item(params, "embed"))
            w.finish()
    assert not list(tmp_path.iterdir())
    dst.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.CheckpointWriter(dst, CONFIG, quant=QUANT)


@pytest.mark.multidevice
def test_sharded_restore_on_8_devices(saved):
    """Restores with NamedShardings on an 8-device mesh (virtual CPU devices, own process): each leaf arrives with
    its target sharding and the values equal a single-device restore."""
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from gptoss_jax import checkpoint
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        def shard(path, spec):  # model-tree paths: layer leaves carry a leading (never split) layer axis
            lead = (None,) if path[0] == "layers" else ()
            shape = spec.shape[len(lead):]
            if len(shape) == 3 and shape[0] % 2 == 0 and shape[-1] % 4 == 0:
                return NamedSharding(mesh, P(*lead, "data", None, "model"))  # experts: split E and N
            if len(shape) == 2 and shape[-1] % 4 == 0:
                return NamedSharding(mesh, P(*lead, None, "model"))
            return NamedSharding(mesh, P())
        _, _, sharded = checkpoint.load_params({str(saved)!r}, shardings=shard)
        _, _, plain = checkpoint.load_params({str(saved)!r})
        w = sharded["layers"]["mlp"]["experts"]["gate_up"]["packed"]
        assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, 4, 32, 128), \\
            w.addressable_shards[0].data.shape
        assert w.sharding.spec == P(None, "data", None, "model")
        flat_s, flat_p = jax.tree.leaves(sharded), jax.tree.leaves(plain)
        assert len(flat_s) == len(flat_p)
        for a, b in zip(flat_s, flat_p):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
