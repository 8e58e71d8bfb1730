"""Logit parity with transformers' DeepseekV2ForCausalLM on small random models (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest

import dsv2_jax
from hf_models import YARN, hf_logits, random_hf_model, save_hf_model

CASES = {
    "q_lora-greedy-k1": dict(),
    "plain_q-group_limited-scaled-k0": dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5,
                                            first_k_dense_replace=0),
    "yarn-k2-v_ne_nope": dict(rope_parameters=YARN, max_position_embeddings=128, first_k_dense_replace=2,
                              num_hidden_layers=4, v_head_dim=12, qk_nope_head_dim=20, n_shared_experts=2,
                              topk_method="group_limited_greedy", n_group=2, topk_group=1, num_experts_per_tok=3),
    "yarn-plain_q-3experts-scaled16": dict(rope_parameters=YARN, max_position_embeddings=128, q_lora_rank=None,
                                           num_experts_per_tok=3, routed_scaling_factor=16.0),
    "all-dense-tied": dict(first_k_dense_replace=3, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    hf = random_hf_model(seed=len(name), **CASES[name])
    save_hf_model(hf, tmp_path)
    model = dsv2_jax.from_hf(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf.config.vocab_size, size=(2, 40))  # 40 > original_max_position_embeddings (16)
    want = hf_logits(hf, ids)
    got = np.asarray(model(jnp.asarray(ids)))
    assert got.dtype == np.float32 and got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{name}: max |diff| / max |logit| = {err:.2e}")
    assert err <= 1e-5, f"max |diff| / max |logit| = {err:.2e}"
