"""DeepSeekMoE (DeepSeek-V2 §2.2): fine-grained routed experts plus shared experts.

Router: fp32 softmax over the routed experts, then `greedy` top-k or `group_limited_greedy` (keep the topk_group
groups with the best maximum score, then top-k inside them). Weights are the chosen scores, renormalised when
norm_topk_prob (and k > 1), otherwise multiplied by routed_scaling_factor.

Routed experts run dropless as one grouped matmul over the token copies sorted by expert.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import MLP, cast, param
from .sharding import constrain


class RouterOutput(NamedTuple):
    """What the router decided for T tokens; also all the balance losses need."""

    weights: jnp.ndarray  # [T, K] float32: combine weights of the chosen experts
    experts: jnp.ndarray  # [T, K] int32: chosen expert ids
    scores: jnp.ndarray  # [T, E] float32: softmax affinities s_{i,t} before any group masking


def route(config: ModelConfig, logits: jnp.ndarray) -> RouterOutput:
    """Top-k routing of fp32 router logits [T, E]."""
    c = config
    K, E, G = c.num_experts_per_tok, c.num_experts, c.num_groups
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    choose_from = scores
    if c.topk_method == "group_limited_greedy":
        group_scores = scores.reshape(-1, G, E // G).max(axis=-1)  # [T, G]
        _, top_groups = jax.lax.top_k(group_scores, c.topk_group)
        keep = jax.nn.one_hot(top_groups, G, dtype=jnp.int32).sum(axis=-2) > 0  # [T, G]
        choose_from = jnp.where(jnp.repeat(keep, E // G, axis=-1), scores, 0.0)
    weights, experts = jax.lax.top_k(choose_from, K)
    if c.norm_topk_prob and K > 1:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    else:
        weights = weights * c.routed_scaling_factor
    return RouterOutput(weights, experts.astype(jnp.int32), scores)


def grouped_matmul(lhs: jnp.ndarray, rhs: jnp.ndarray, group_sizes: jnp.ndarray) -> jnp.ndarray:
    """lhs [M, K] rows sorted by group, rhs [G, K, N], group_sizes [G] -> [M, N]: row block g times rhs[g].

    The one place that picks the grouped-matmul backend.
    """
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=lhs.dtype)


def expert_mlp(x_sorted, group_sizes, gate, up, down):
    """SwiGLU of each row with its own expert's weights; rows sorted by expert. gate/up [E, D, I], down [E, I, D]."""
    h = jax.nn.silu(grouped_matmul(x_sorted, gate, group_sizes)) * grouped_matmul(x_sorted, up, group_sizes)
    return grouped_matmul(h, down, group_sizes)


def sort_by_expert(experts: jnp.ndarray, num_experts: int):
    """For chosen experts [T, K]: the order of the T*K token copies sorted by expert, and the group sizes."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts)
    return order, group_sizes


def dropless_experts(x, r: RouterOutput, gate, up, down):
    """Σ_k weight_k · expert_k(x) for x [T, D], every chosen (token, expert) pair computed once."""
    T, K = r.experts.shape
    order, group_sizes = sort_by_expert(r.experts, gate.shape[0])
    y_sorted = expert_mlp(x[order // K], group_sizes, gate, up, down)
    y_pairs = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    y = jnp.einsum("tkd,tk->td", y_pairs.reshape(T, K, -1), r.weights, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        std = c.initializer_range
        D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
        self.router = param(rngs, (D, E), ("embed", "router"), param_dtype, std)
        self.gate_proj = param(rngs, (E, D, I), ("experts", "embed", "expert_mlp"), param_dtype, std)
        self.up_proj = param(rngs, (E, D, I), ("experts", "embed", "expert_mlp"), param_dtype, std)
        self.down_proj = param(rngs, (E, I, D), ("experts", "expert_mlp", "embed"), param_dtype, std)
        if c.n_shared_experts:
            self.shared_experts = MLP(D, c.n_shared_experts * I, std=std, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        else:
            self.shared_experts = nnx.data(None)

    def route(self, x: jnp.ndarray) -> RouterOutput:
        """x [T, D] -> the routing of each token; logits in fp32."""
        logits = jnp.dot(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        return route(self.config, logits)

    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, RouterOutput]:
        B, S, D = x.shape
        x = x.astype(self.dtype)
        xt = x.reshape(B * S, D)
        r = self.route(xt)
        dt = self.dtype
        y = dropless_experts(xt, r, cast(self.gate_proj, dt), cast(self.up_proj, dt), cast(self.down_proj, dt))
        y = constrain(y.reshape(B, S, D), ("batch", "seq", "embed"))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, r
