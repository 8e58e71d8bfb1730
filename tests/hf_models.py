"""Small random Hugging Face DeepSeek-V2 models, built offline, as the independent reference."""

import numpy as np
import torch

BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=0,
    eos_token_id=1,
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def hf_config(**overrides):
    from transformers import DeepseekV2Config

    kw = dict(BASE)
    kw.update(overrides)
    return DeepseekV2Config(**kw)


def random_hf_model(seed=0, std=0.15, **overrides):
    """A DeepseekV2ForCausalLM with weights large enough that routing and every weight matter."""
    from transformers import DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.6, 1.4)
            else:
                p.normal_(0.0, std)
    return model


def save_hf_model(model, path, max_shard_size="64KB"):
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()
