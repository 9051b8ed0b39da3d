"""The Hugging Face name table (gptoss_jax.hf_names) against transformers' GptOssForCausalLM itself."""

import numpy as np
import pytest

from gptoss_jax import hf_names
from gptoss_jax.config import GptOssConfig
from gptoss_jax.params import iter_specs, param_specs

# every dimension distinct, so a wrong transpose or a swapped dimension cannot pass
CFG = GptOssConfig.from_preset("tiny").replace(
    hidden_size=64, intermediate_size=48, num_hidden_layers=2, layer_types=(), num_local_experts=3,
    num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=20, vocab_size=130)


def test_table_names_and_shapes_are_transformers():
    """hf_tensors lists exactly the state dict of transformers' GptOssForCausalLM, with its shapes."""
    pytest.importorskip("torch")
    from transformers import GptOssForCausalLM

    from gptoss_jax.testing import hf_config
    ref = {k: tuple(v.shape) for k, v in GptOssForCausalLM(hf_config(CFG)).state_dict().items()}
    ours = {t.name: t.shape for t in hf_names.hf_tensors(CFG)}
    assert ours == ref


def test_paths_cover_the_storage_tree_and_invert():
    specs = dict(iter_specs(param_specs(CFG)))
    tensors = list(hf_names.hf_tensors(CFG))
    assert [t.path for t in tensors] == list(specs)  # the storage tree's order, every leaf once
    for t in tensors:
        assert hf_names.hf_to_param_path(t.name) == (t.path, t.transpose)
        assert hf_names.param_path_to_hf(t.path) == t.name
        ours = specs[t.path].shape
        assert t.shape == (ours[:-2] + ours[:-3:-1] if t.transpose else ours)
        if len(ours) == 2 and ours[0] != ours[1]:
            assert t.transpose == (t.shape != ours)
    # nn.Linear weights ([out, in]) are the transposed ones; GptOssExperts' [E, in, out] are not
    transposed = {t.name.split(".", 3)[-1] if t.name.startswith("model.layers.") else t.name
                  for t in tensors if t.transpose}
    assert transposed == {"lm_head.weight", "mlp.router.weight", *(f"self_attn.{p}.weight" for p in
                                                                   hf_names.ATTN_PROJ)}
    assert hf_names.hf_to_param_path("model.layers.0.mlp.extra") is None
    assert hf_names.hf_to_param_path("model.layers.0.self_attn.q_proj.qweight") is None
    with pytest.raises(KeyError, match="layers.0.attn.nothing"):
        hf_names.param_path_to_hf(("layers", 0, "attn", "nothing"))


@pytest.mark.parametrize("layout", sorted(hf_names.EXPERT_LAYOUTS))
def test_expert_layouts_split_and_fuse_exactly(layout):
    """Each per-expert layout's linears fill every column of our fused weights exactly once, with nn.Linear's
    [out, in] dims, and each module name maps back to our weight."""
    h, i = CFG.hidden_size, CFG.intermediate_size
    covered = {"gate_up": np.zeros(2 * i, int), "down": np.zeros(h, int)}
    modules = set()
    for ex in range(CFG.num_local_experts):
        for module, out, inp, which, cols in hf_names.expert_linears(CFG, 1, ex, layout):
            assert module.startswith("model.layers.1.mlp.experts.")
            assert hf_names.expert_module_weight(module) == which
            assert hf_names.module_group(module + ".qweight") == "experts"
            assert inp == (h if which == "gate_up" else i)
            assert out == len(range(covered[which].size)[cols])
            if ex == 0:
                covered[which][cols] += 1
            modules.add(module)
    assert all((c == 1).all() for c in covered.values())
    assert len(modules) == CFG.num_local_experts * len(hf_names.EXPERT_LAYOUTS[layout])
    if layout == "split":  # GptOssExperts: gate = gate_up[..., ::2], up = gate_up[..., 1::2]
        gate, up, _ = hf_names.expert_linears(CFG, 0, 2, layout)
        assert (gate[0].endswith(".2.gate_proj"), gate[4]) == (True, slice(0, None, 2))
        assert (up[0].endswith(".2.up_proj"), up[4]) == (True, slice(1, None, 2))


def test_module_groups_of_quantized_names():
    group = hf_names.module_group
    assert group("model.embed_tokens.weight") == "embed"
    assert group("lm_head.weight") == "lm_head"
    assert group("model.norm.weight") == group("model.layers.3.post_attention_layernorm.weight") == "norms"
    assert group("model.layers.3.self_attn.k_proj.weight_packed") == "attention"
    assert group("model.layers.3.self_attn.sinks") == "attention"
    assert group("model.layers.3.mlp.router.bias") == "router"
    assert group("model.layers.3.mlp.experts.down_proj_blocks") == "experts"
    assert group("model.layers.3.mlp.experts.gate_up.4.qzeros") == "experts"
    assert hf_names.layer_of("model.layers.12.mlp.router.weight") == 12
    assert hf_names.layer_of("model.norm.weight") is None
