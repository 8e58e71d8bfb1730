"""KV cache bytes per token: the latent cache of this library vs a per-head K/V cache of the same model.

Measured on the arrays init_cache allocates (abstractly for the full depth, so it runs anywhere):
    python bench/kv_cache.py
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv2_jax import ModelConfig  # noqa: E402
from dsv2_jax.generate import init_cache  # noqa: E402


def main():
    print(f"{'model':18s} {'latent B/token':>15s} {'per-head K/V B/token':>21s} {'ratio':>7s}  (bf16, all layers)")
    for name in ("deepseek-v2", "deepseek-v2-lite"):
        c = ModelConfig.from_preset(name)
        cache = jax.eval_shape(lambda: init_cache(c, 1, 1024, jnp.bfloat16))
        L, B, T = cache.c_kv.shape[:3]
        latent = sum(a.size * a.dtype.itemsize for a in (cache.c_kv, cache.k_pe)) // (B * T)
        full = L * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 2
        elements = latent // 2
        print(f"{name:18s} {latent:15,d} {full:21,d} {full / latent:7.1f}  "
              f"({elements:,} elements = {L} layers x ({c.kv_lora_rank} + {c.qk_rope_head_dim}))")


if __name__ == "__main__":
    main()
