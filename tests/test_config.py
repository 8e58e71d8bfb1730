"""ModelConfig: reading both rope styles, round trips, validation messages; YaRN against REFERENCE.md."""

import json

import numpy as np
import pytest

from dsv2_jax import ModelConfig
from dsv2_jax.rope import rope_frequencies

V2 = ModelConfig.from_preset("deepseek-v2")


def test_released_config_fields():
    assert V2.q_lora_rank == 1536 and V2.num_experts == 160 and V2.topk_method == "group_limited_greedy"
    assert V2.layer_kinds == ("dense",) + ("moe",) * 59
    assert abs(V2.softmax_scale - 0.114721) < 1e-6
    lite = ModelConfig.from_preset("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.num_moe_layers == 26


def test_yarn_inv_freq_check_values():
    inv_freq, attention_factor = rope_frequencies(V2)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (32,)
    np.testing.assert_allclose(inv_freq[[0, 10, 31]], [1.0, 0.0562341, 3.3338e-6], rtol=1e-5)
    assert attention_factor == pytest.approx(1.0)


def test_yarn_inv_freq_matches_transformers():
    import torch  # noqa: F401  (transformers' rope utils need it)
    from transformers import DeepseekV2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in (dict(factor=40, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707),
                 dict(factor=4, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5, beta_fast=8)):
        params = {"rope_type": "yarn", "rope_theta": 10000.0, "beta_fast": 32, "beta_slow": 1, **rope}
        hf = DeepseekV2Config(rope_parameters=params, max_position_embeddings=163840)
        want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        ours = ModelConfig(rope_parameters=params, max_position_embeddings=163840)
        got, factor = rope_frequencies(ours)
        np.testing.assert_allclose(got, want.numpy(), rtol=3e-7)  # a float32 ulp or two
        assert factor == pytest.approx(want_factor, rel=1e-12)


def test_both_rope_styles_read_the_same():
    legacy = ModelConfig.from_hf(V2.to_hf_dict(rope_style="rope_scaling"))
    modern = ModelConfig.from_hf(V2.to_hf_dict(rope_style="rope_parameters"))
    assert "rope_parameters" not in legacy.to_hf_dict() or legacy.rope_parameters is None
    assert modern.rope_parameters["rope_type"] == "yarn" and "rope_scaling" not in V2.to_hf_dict("rope_parameters")
    assert legacy.rope == modern.rope == V2.rope
    assert legacy.softmax_scale == modern.softmax_scale


def test_round_trip_through_file(tmp_path):
    path = tmp_path / "config.json"
    V2.save(path)
    again = ModelConfig.from_hf(tmp_path)
    assert again == V2 and hash(again) == hash(V2)
    assert json.loads(path.read_text())["torch_dtype"] == "bfloat16"  # unmodelled keys survive
    assert ModelConfig.from_hf(str(path)).to_hf_dict() == V2.to_hf_dict()


def test_transformers5_config_keys_are_kept():
    d = V2.to_hf_dict(rope_style="rope_parameters")
    d.update(head_dim=64, qk_head_dim=192, output_router_logits=False, dtype="bfloat16")
    c = ModelConfig.from_hf(d)
    assert c.extra["qk_head_dim"] == 192 and c.to_hf_dict()["dtype"] == "bfloat16"


BAD = [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(topk_method="group_limited_greedy", n_group=2, topk_group=3), "topk_group"),
    (dict(topk_method="group_limited_greedy", n_group=8, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_parameters"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_attention_heads=-4), "num_attention_heads"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(attention_bias=True), "attention_bias"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f for _, f in BAD])
def test_bad_config_names_the_field(change, field):
    tiny = ModelConfig.from_preset("tiny").to_hf_dict()
    tiny.update(change)
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig.from_hf(tiny)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="deepseek_v3"):
        ModelConfig.from_hf({"model_type": "deepseek_v3"})
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("deepseek-v9")
