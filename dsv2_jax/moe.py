"""DeepSeekMoE (DeepSeek-V2 §2.2): fine-grained routed experts plus shared experts.

Router: fp32 softmax over the routed experts, then `greedy` top-k or `group_limited_greedy` (keep the topk_group
groups with the best maximum score, then top-k inside them). Weights are the chosen scores, renormalised when
norm_topk_prob (and k > 1), otherwise multiplied by routed_scaling_factor.

Routed experts, on one device: one grouped matmul over the token copies sorted by expert (dropless). A decoding step
of few tokens on a GPU instead runs each token's chosen experts, and the shared experts, straight from the weight
stacks (`chosen_experts`: no sorting; grouped_matmul.use_chosen_experts decides).

Under `sharding.activation_mesh(mesh)` the layer runs expert-parallel inside `jax.shard_map`: each device routes
its own tokens, packs the (token, expert) copies into fixed-capacity buffers, one per device of the expert axis,
exchanges them with `jax.lax.all_to_all`, runs its local experts (split over the tensor axis along the
intermediate dim) as one grouped matmul, sends the results back with a second all_to_all, and combines them.

Capacity: a buffer holds C copies per (sending device, receiving device) pair.
- dropless (capacity_factor=None, the default): C = T_local * min(K, experts per device), so nothing is dropped;
- capacity_factor=f: C = ceil(f * T_local * K / expert-axis size), each device receiving at most f times its
  balanced share; when more copies go to one device, the sender drops its lowest-affinity ones (s_{i,t}).
On one device, capacity_factor=f drops the lowest-affinity copies past C = ceil(f * T * K) the same way.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from . import sharding
from .config import ModelConfig
from .grouped_matmul import (GreedyRouting, LayerIndex, chosen_experts_mlp, greedy_top_k, grouped_matmul, interpreted,
                             power_of_two, routed_experts_mlp, stacked_matvec, stacked_partials, tiles_fit,
                             use_chosen_experts, use_stacked_matvec)
from .layers import MLP, cast, param
from .sharding import constrain

# Logical axes of the MoE parameters (without the stacked "layers" axis).
ROUTER_AXES = ("embed", "router")
GATE_UP_AXES = ("experts", "embed", "expert_mlp")
DOWN_AXES = ("experts", "expert_mlp", "embed")
ROUTER_BLOCK_N = 32  # stacked_matvec's float32 tiles: 64 columns ran 4x slower on an H100 (bench/RESULTS.md)


class RouterOutput(NamedTuple):
    """What the router decided for T tokens; also all the balance losses need."""

    weights: jnp.ndarray  # [T, K] float32: combine weights of the chosen experts
    experts: jnp.ndarray  # [T, K] int32: chosen expert ids
    scores: jnp.ndarray  # [T, E] float32: softmax affinities s_{i,t} before any group masking
    kept: jnp.ndarray | None = None  # [T, K] bool: False where capacity dropping removed the pair (MoE output)


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


def adds_decoded(config: ModelConfig, tokens: int, hidden: int) -> bool:
    """Whether `MoE.add_decoded` takes a decoding step of `tokens` tokens: on the chosen-experts kernels
    (`steps_on_chosen_experts`) with routing that a kernel takes (`routes_on_kernel`)."""
    return routes_on_kernel(config) and steps_on_chosen_experts(config, tokens, hidden)


def routes_on_kernel(config: ModelConfig) -> bool:
    """Whether `route_kernel` takes this model's routing: greedy top-k over a power-of-two number of experts."""
    E = config.num_experts
    return config.topk_method == "greedy" and power_of_two(E) and config.num_experts_per_tok <= E


def greedy_routing(config: ModelConfig) -> GreedyRouting:
    """The routing that `route_kernel` and `grouped_matmul.routed_experts_mlp` take inside their kernels."""
    K = config.num_experts_per_tok
    return GreedyRouting(K, norm=config.norm_topk_prob and K > 1, scaling=config.routed_scaling_factor)


def _route_kernel(partials_ref, scores_ref, weights_ref, experts_ref, *, routing):
    """Program t: token t's logits (the sum of the router's partial products), their softmax, the greedy top-k
    and its weights (`grouped_matmul.greedy_top_k`)."""
    t = pl.program_id(0)
    scores, experts, weights = greedy_top_k(partials_ref[:, t, :].sum(axis=0), routing)
    scores_ref[t, :] = scores
    for k, (expert, w) in enumerate(zip(experts, weights)):
        experts_ref[t, k] = expert
        weights_ref[t, k] = w


@functools.partial(jax.jit, static_argnames=("config", "tokens", "interpret"))
def route_kernel(config: ModelConfig, partials: jnp.ndarray, tokens: int, interpret: bool | None = None
                 ) -> RouterOutput:
    """Decoding's routing in one kernel (Pallas, Triton; `routes_on_kernel` configs), the same as `route` of the
    logits partials.sum(0)[:tokens]: partials [S, R >= tokens, E] float32 are the router's split products
    (`stacked_partials`). Replaces XLA's sum, softmax, sort and slices of a step."""
    c = config
    K, E = c.num_experts_per_tok, c.num_experts
    if not routes_on_kernel(c) or partials.ndim != 3 or partials.shape[1] < tokens or partials.shape[2] != E:
        raise ValueError(f"route_kernel: greedy top-{K} of a power-of-two number of experts ({c.topk_method}, "
                         f"{E} experts) from [splits, >= {tokens}, {E}] partial logits, got {partials.shape}")
    f32 = jnp.float32
    scores, weights, experts = pl.pallas_call(
        functools.partial(_route_kernel, routing=greedy_routing(c)),
        out_shape=[jax.ShapeDtypeStruct((tokens, E), f32), jax.ShapeDtypeStruct((tokens, K), f32),
                   jax.ShapeDtypeStruct((tokens, K), jnp.int32)],
        grid=(tokens,),
        in_specs=[pl.no_block_spec],
        out_specs=[pl.no_block_spec] * 3,
        name="route",
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpreted(interpret),
    )(partials.astype(f32))
    return RouterOutput(weights, experts, scores)


@jax.named_scope("router")
def route_tokens(config: ModelConfig, x: jnp.ndarray, router: jnp.ndarray) -> RouterOutput:
    """Routing of tokens x [T, D] by the router weight [D, E]; logits in fp32."""
    return route(config, jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32)))


@jax.named_scope("experts")
def expert_mlp(x_sorted, group_sizes, gate, up, down):
    """SwiGLU of each row with its own expert's weights; rows sorted by expert. gate/up [E, D, I], down [E, I, D]."""
    g = checkpoint_name(grouped_matmul(x_sorted, gate, group_sizes), "experts_gate")
    u = checkpoint_name(grouped_matmul(x_sorted, up, group_sizes), "experts_up")
    return checkpoint_name(grouped_matmul(jax.nn.silu(g) * u, down, group_sizes), "experts_down")


def sort_by_expert(experts: jnp.ndarray, num_experts: int):
    """For chosen experts [T, K]: the order of the T*K token copies sorted by expert, and the group sizes."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts)
    return order, group_sizes


def inverse_permutation(perm: jnp.ndarray) -> jnp.ndarray:
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype), unique_indices=True)


@jax.custom_vjp
def permute_rows(a: jnp.ndarray, perm: jnp.ndarray, inv: jnp.ndarray) -> jnp.ndarray:
    """a[perm] for a permutation `perm` of a's rows and its inverse `inv`: the backward is the gather d[inv], where
    autodiff would scatter-add."""
    return a[perm]


def _permute_rows_fwd(a, perm, inv):
    return a[perm], inv


def _permute_rows_bwd(inv, d):
    return d[inv], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_copies(x: jnp.ndarray, order: jnp.ndarray, inv: jnp.ndarray, k: int) -> jnp.ndarray:
    """The token copies sorted by expert: row i is x[order[i] // k] (x [T, D], order the sorted copy ids of the
    T * k (token, choice) pairs, inv its inverse). The backward sums each token's k copies with a gather (fp32
    accumulation), where autodiff would scatter-add them."""
    return x[order // k]


def _gather_copies_fwd(x, order, inv, k):
    return x[order // k], inv


def _gather_copies_bwd(k, inv, d):
    dx = d[inv].reshape(-1, k, d.shape[-1]).astype(jnp.float32).sum(axis=1)
    return dx.astype(d.dtype), None, None


gather_copies.defvjp(_gather_copies_fwd, _gather_copies_bwd)


@jax.custom_vjp
def combine_copies(y_sorted: jnp.ndarray, weights: jnp.ndarray, order: jnp.ndarray, inv: jnp.ndarray) -> jnp.ndarray:
    """Σ_k weights[t, k] · y_sorted[inv[t·K + k]] in float32: the experts' outputs [T·K, D] (sorted by expert,
    `order` the sorted copy ids, inv its inverse) weighted back into their tokens [T, D]. One gather-reduce, where
    permuting the rows back and then weighting them takes two passes over the T·K rows; the backward gathers
    each sorted row's token gradient times its weight (no scatter), and the weights' gradient is a second
    gather-reduce."""
    T, K = weights.shape
    return (y_sorted[inv].reshape(T, K, -1).astype(jnp.float32) * weights[..., None]).sum(axis=1)


def _combine_copies_fwd(y_sorted, weights, order, inv):
    return combine_copies(y_sorted, weights, order, inv), (y_sorted, weights, order, inv)


def _combine_copies_bwd(residuals, dy):
    y_sorted, weights, order, inv = residuals
    T, K = weights.shape
    dy = dy.astype(jnp.float32)
    d_sorted = (dy[order // K] * weights.reshape(-1)[order][:, None]).astype(y_sorted.dtype)
    d_weights = (y_sorted[inv].reshape(T, K, -1).astype(jnp.float32) * dy[:, None, :]).sum(axis=-1)
    # Its own row reduction: left free, XLA fused it into the router's scatter of top_k's gradient, a scatter fusion
    # whose threads each ran one 2,048-long dot product (0.95 ms a layer at batch 12 on an H200; bench/step_parts.py).
    d_weights = jax.lax.optimization_barrier(d_weights)
    return d_sorted, d_weights.astype(weights.dtype), None, None


combine_copies.defvjp(_combine_copies_fwd, _combine_copies_bwd)


@jax.named_scope("dropless")
def dropless_experts(x, r: RouterOutput, gate, up, down):
    """Σ_k weight_k · expert_k(x) for x [T, D], every chosen (token, expert) pair computed once."""
    K = r.experts.shape[1]
    order, group_sizes = sort_by_expert(r.experts, gate.shape[0])
    inv = inverse_permutation(order)
    y_sorted = expert_mlp(gather_copies(x, order, inv, K), group_sizes, gate, up, down)
    return combine_copies(y_sorted, r.weights, order, inv).astype(x.dtype)


class ExpertStacks(NamedTuple):
    """The expert weights of every layer of a stacked MoE module, and the layer being run. The decoding kernels read
    that layer out of the stacks themselves: a slice of the stacks handed to a kernel would first be copied whole."""

    gate: jax.Array  # [L, E, D, I]
    up: jax.Array  # [L, E, D, I]
    down: jax.Array  # [L, E, I, D]
    shared: tuple | None  # the shared experts' (gate [L, D, S*I], up [L, D, S*I], down [L, S*I, D]), or None
    layer: jax.Array | int | LayerIndex = 0  # int32 (or a LayerIndex): the layer these calls run
    router: jax.Array | None = None  # [L, D, E]: with it, the router's product runs on `stacked_matvec`

    @classmethod
    def of(cls, moe: "MoE", router: bool = False) -> "ExpertStacks":
        """The stacks of a stacked (layers-leading) MoE module; layer 0 until replaced. router: include the
        router's stack."""
        shared = None
        if moe.shared_experts is not None:
            s = moe.shared_experts
            shared = (s.gate_proj[...], s.up_proj[...], s.down_proj[...])
        return cls(moe.gate_proj[...], moe.up_proj[...], moe.down_proj[...], shared,
                   router=moe.router[...] if router else None)


def steps_on_chosen_experts(config: ModelConfig, tokens: int, hidden: int) -> bool:
    """Whether an undifferentiated decoding step of `tokens` tokens on one device (dropless) runs its experts on the
    `chosen_experts_mlp` kernels (grouped_matmul.use_chosen_experts decides from its (token, expert) copies)."""
    return use_chosen_experts(tokens * config.num_experts_per_tok, config.num_experts, hidden,
                              config.moe_intermediate_size)


@jax.named_scope("chosen_experts")
def chosen_experts(x, r: RouterOutput, w: ExpertStacks, stacked: bool):
    """Σ_k weight_k · expert_k(x) + the shared experts of x [T, D] by the `chosen_experts_mlp` kernels, which read
    each token's chosen experts straight from the stacks (decoding; not differentiable). stacked: w's weights have
    the leading layer axis and w.layer picks the layer; otherwise they are one layer's."""
    y = chosen_experts_mlp(x, r.experts, w.gate, w.up, w.down, w.shared, w.layer if stacked else None)
    coef = r.weights
    if w.shared is not None:
        coef = jnp.concatenate([coef, jnp.ones((x.shape[0], y.shape[1] - coef.shape[1]), coef.dtype)], axis=1)
    # a multiply and reduce: exact float32 whatever the default matmul precision
    return (y * coef[:, :, None]).sum(axis=1).astype(x.dtype)


def capacity(tokens: int, config: ModelConfig, n_ep: int, capacity_factor: float | None) -> int:
    """Copies per (sending, receiving) device pair for `tokens` tokens per device over `n_ep` expert devices."""
    K = config.num_experts_per_tok
    most = tokens * min(K, config.num_experts // n_ep)  # one token sends at most this many copies to one device
    if capacity_factor is None:
        return most
    return max(1, min(most, math.ceil(capacity_factor * tokens * K / n_ep)))


def check_capacity_factor(capacity_factor) -> None:
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or
                                        not isinstance(capacity_factor, (int, float)) or capacity_factor <= 0):
        raise ValueError(f"capacity_factor must be None (dropless) or a positive number, got {capacity_factor!r}")


def dispatch_slots(r: RouterOutput, experts_per_device: int, n_ep: int, capacity: int, valid=None):
    """Where each (token, expert) copy goes in the send buffer [n_ep * capacity].

    Copies to one device are ranked by affinity (highest first, ties by token order); those ranked past
    `capacity` are dropped. Returns slot [T*K] (n_ep * capacity for dropped copies) and kept [T, K].
    valid [T] bool (optional): tokens that are padding send nothing.
    """
    T, K = r.experts.shape
    dest = (r.experts // experts_per_device).reshape(-1)
    if valid is not None:
        dest = jnp.where(jnp.repeat(valid, K), dest, n_ep)  # padding: a destination past the last device
    affinity = jnp.take_along_axis(r.scores, r.experts, axis=1).reshape(-1)
    by_affinity = jnp.argsort(-affinity, stable=True)
    order = by_affinity[jnp.argsort(dest[by_affinity], stable=True)]  # by destination, then affinity
    counts = jnp.bincount(dest, length=n_ep + 1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(T * K) - starts[dest[order]]
    rank = jnp.zeros(T * K, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32), unique_indices=True)
    kept = (rank < capacity) & (dest < n_ep)
    slot = jnp.where(kept, dest * capacity + rank, n_ep * capacity)
    return slot, kept.reshape(T, K)


@jax.named_scope("dispatch")
def dispatch_experts(x, r: RouterOutput, gate, up, down, *, capacity: int, n_ep: int = 1,
                     expert_axis: str | None = None, valid=None):
    """The routed-expert output of one device's tokens, through fixed-capacity send/receive buffers.

    x [T, D]: this device's tokens; r: their routing over all E experts; gate/up [E_loc, D, I_loc],
    down [E_loc, I_loc, D]: the experts of this device (E_loc = E / n_ep; the slice I_loc of their width).
    With expert_axis, the buffers are exchanged with all_to_all over that axis (inside shard_map).
    Returns y [T, D] float32 (a partial sum when the experts' width is split) and kept [T, K].
    """
    T, K = r.experts.shape
    E_loc, D = gate.shape[0], x.shape[-1]
    slot, kept = dispatch_slots(r, E_loc, n_ep, capacity, valid)
    rows = n_ep * capacity
    copy = jnp.full(rows, T * K, jnp.int32).at[slot].set(jnp.arange(T * K, dtype=jnp.int32), mode="drop")
    filled = copy < T * K
    send_x = jnp.take(x, copy // K, axis=0, mode="fill", fill_value=0)
    send_e = jnp.where(filled, jnp.take(r.experts.reshape(-1) % E_loc, copy, mode="clip"), E_loc)

    def exchange(a):
        return a if expert_axis is None else jax.lax.all_to_all(a, expert_axis, 0, 0, tiled=True)

    recv_x, recv_e = exchange(send_x), exchange(send_e)  # row block i came from expert-axis device i
    order, group_sizes = sort_by_expert(recv_e[:, None], E_loc)  # empty slots (id E_loc) sort last
    inv = inverse_permutation(order)
    y_sorted = expert_mlp(permute_rows(recv_x, order, inv), group_sizes, gate, up, down)
    y_sorted = jnp.where((recv_e[order] < E_loc)[:, None], y_sorted, 0)
    y_recv = permute_rows(y_sorted, inv, order)
    y_back = exchange(y_recv)  # back in this device's slot order
    y_pairs = jnp.take(y_back, slot, axis=0, mode="fill", fill_value=0).reshape(T, K, D)
    weights = jnp.where(kept, r.weights, 0.0)
    return jnp.einsum("tkd,tk->td", y_pairs, weights, preferred_element_type=jnp.float32), kept


def expert_parallel(config: ModelConfig, mesh, x, router, gate, up, down, capacity_factor: float | None):
    """Routed experts of tokens x [T, D] over `mesh` with jax.shard_map: tokens split over the batch axes,
    experts over the expert axis, their width over the tensor axis; parameters gathered over fsdp.

    Returns y [T, D] (x.dtype) and the RouterOutput (with `kept`) of every token.
    """
    c = config
    sharding.check_config(c, mesh)
    inner = dict(sharding.RULES, embed=None)  # inside the layer, parameters are whole along embed (fsdp-gathered)
    param_spec = lambda axes: sharding.logical_to_spec(axes, inner)  # noqa: E731
    token_axes = sharding.batch_axes()
    expert_axis = sharding.RULES["experts"]
    tensor_axes = sharding.spec_axes(sharding.RULES["expert_mlp"])
    if expert_axis not in token_axes:
        raise ValueError(f"sharding.RULES: expert parallelism needs the batch split over the expert axis "
                         f"{expert_axis!r}, but 'batch' maps to {token_axes}")
    n_tokens = sharding.mesh_size(mesh, token_axes)
    n_ep = mesh.shape[expert_axis]
    T = x.shape[0]
    pad = -T % n_tokens
    valid = jnp.arange(T + pad) < T
    if pad:  # e.g. decoding a small batch: pad the tokens to a multiple of the token shards; padding sends nothing
        x = jnp.pad(x, ((0, pad), (0, 0)))
    cap = capacity((T + pad) // n_tokens, c, n_ep, capacity_factor)
    tok = P(token_axes)

    def local(x, valid, router, gate, up, down):
        r = route_tokens(c, x, router)
        y, kept = dispatch_experts(x, r, gate, up, down, capacity=cap, n_ep=n_ep, expert_axis=expert_axis,
                                   valid=valid)
        if tensor_axes:
            y = jax.lax.psum(y, tensor_axes)
        return y.astype(x.dtype), r._replace(kept=kept)

    y, r = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(token_axes, None), tok, param_spec(ROUTER_AXES), param_spec(GATE_UP_AXES),
                  param_spec(GATE_UP_AXES), param_spec(DOWN_AXES)),
        out_specs=(P(token_axes, None), RouterOutput(*(P(token_axes, None),) * 4)),
        check_vma=False,  # the GPU kernels' pallas_calls (grouped_matmul) declare no per-axis variance
    )(x, valid, router, gate, up, down)
    if pad:
        y, r = y[:T], jax.tree.map(lambda a: a[:T], r)
    return y, r


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        std = c.initializer_range
        D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
        self.router = param(rngs, (D, E), ROUTER_AXES, param_dtype, std)
        self.gate_proj = param(rngs, (E, D, I), GATE_UP_AXES, param_dtype, std)
        self.up_proj = param(rngs, (E, D, I), GATE_UP_AXES, param_dtype, std)
        self.down_proj = param(rngs, (E, I, D), DOWN_AXES, param_dtype, std)
        if c.n_shared_experts:
            self.shared_experts = MLP(D, c.n_shared_experts * I, std=std, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        else:
            self.shared_experts = nnx.data(None)

    def route(self, x: jnp.ndarray) -> RouterOutput:
        """x [T, D] -> the routing of each token; logits in fp32."""
        return route_tokens(self.config, x, self.router[...])

    def _decoding_stacks(self, stacks: ExpertStacks | None) -> tuple[ExpertStacks, bool]:
        """The weights for the chosen-experts kernels and whether they are stacked: `stacks` where they hold the
        compute dtype (the kernels then read their layer), else this module's own, cast."""
        dt = self.dtype
        if stacks is not None and all(a.dtype == dt for a in jax.tree.leaves(stacks[:4])):
            return stacks, True
        s = self.shared_experts
        shared = None if s is None else tuple(cast(p, dt) for p in (s.gate_proj, s.up_proj, s.down_proj))
        return ExpertStacks(cast(self.gate_proj, dt), cast(self.up_proj, dt), cast(self.down_proj, dt), shared), False

    @jax.named_scope("moe")
    def add_decoded(self, x: jnp.ndarray, residual: jnp.ndarray, router_partials: jnp.ndarray, counts: jax.Array,
                    stacks: ExpertStacks | None = None) -> tuple[jnp.ndarray, jax.Array, RouterOutput]:
        """residual + this layer's output for a decoding step's normalised rows x [B, S, D], for steps that
        `adds_decoded` takes: two kernels (`grouped_matmul.routed_experts_mlp`), where __call__(decoding=True) and
        the residual add take four. The gate/up kernel takes the routing from the router's float32 partial
        products router_partials [S', >= B*S, E] (`layers.rms_norm_rows` with the router) itself; the down kernel
        adds the weighted sum to the residual [B, S, D]. counts: those kernels' counters
        (`grouped_matmul.arrival_counts`, zeros), carried from one layer to the next. stacks: as for __call__.
        Returns (the new residual, counts, the routing)."""
        B, S, D = x.shape
        w, stacked = self._decoding_stacks(stacks)
        h, counts, scores, weights, experts = routed_experts_mlp(
            x.astype(self.dtype).reshape(B * S, D), router_partials, residual.reshape(B * S, D), counts, w.gate,
            w.up, w.down, w.shared, w.layer if stacked else None, routing=greedy_routing(self.config))
        return h.reshape(residual.shape), counts, RouterOutput(weights, experts, scores, jnp.ones(experts.shape, bool))

    @jax.named_scope("moe")
    def __call__(self, x: jnp.ndarray, capacity_factor: float | None = None, decoding: bool = False,
                 stacks: ExpertStacks | None = None,
                 router_partials: jnp.ndarray | None = None) -> tuple[jnp.ndarray, RouterOutput]:
        """x [B, S, D] -> (y [B, S, D], routing of the B*S tokens).

        capacity_factor: None = dropless; f > 0 = drop the lowest-affinity copies past f times a device's
        balanced share (see the module docstring). Under sharding.activation_mesh(mesh): expert-parallel.
        decoding: an undifferentiated step of few tokens; on one device (GPU, grouped_matmul.use_chosen_experts)
        its chosen and shared experts then run on the `chosen_experts_mlp` kernels, without sorting, reading
        this layer's weights out of `stacks` when given (this module being one layer sliced from them; in the
        compute dtype), else this module's own; the router's product too where `stacks` carry the router, and then
        the greedy routing itself on `route_kernel` (`routes_on_kernel`). A decoding step on the sorted path takes
        its router's product (where `stacks` carry the router) and its shared experts' products from `stacks` on
        `stacked_matvec` instead, when its projections do (grouped_matmul.use_stacked_matvec): XLA's products on this
        layer's slices would copy each weight first. router_partials: the router's float32
        partial products of x [S, >= B*S, E] computed already (`layers.rms_norm_rows` with the router), for those
        kernels' routing.
        """
        check_capacity_factor(capacity_factor)
        B, S, D = x.shape
        x = x.astype(self.dtype)
        xt = x.reshape(B * S, D)
        dt = self.dtype
        gate, up, down = cast(self.gate_proj, dt), cast(self.up_proj, dt), cast(self.down_proj, dt)
        mesh = sharding.current_mesh()
        c = self.config
        # a decoding step off the chosen-experts kernels whose projections read the stacks in place: its router's
        # and shared experts' products too, where XLA's products on this layer's slices would copy each weight first
        in_place = decoding and mesh is None and stacks is not None and use_stacked_matvec(B * S)
        if decoding and mesh is None and capacity_factor is None and steps_on_chosen_experts(c, B * S, D):
            if router_partials is not None or (stacks is not None and stacks.router is not None
                                               and tiles_fit(D, c.num_experts)):  # fp32 logits
                partials = router_partials
                if partials is None:
                    partials = stacked_partials(xt, stacks.router, stacks.layer, dtype=jnp.float32,
                                                block_n=ROUTER_BLOCK_N)
                r = (route_kernel(c, partials, B * S) if routes_on_kernel(c)
                     else route(c, partials.sum(axis=0)[:B * S]))
            else:
                r = self.route(xt)
            y = chosen_experts(xt, r, *self._decoding_stacks(stacks))
            return y.reshape(B, S, D), r._replace(kept=jnp.ones(r.experts.shape, bool))
        if mesh is not None:
            # pinned to their own shardings so that their gradients come back sharded the same way
            router = constrain(self.router[...], ROUTER_AXES)
            gate, up, down = constrain(gate, GATE_UP_AXES), constrain(up, GATE_UP_AXES), constrain(down, DOWN_AXES)
            y, r = expert_parallel(self.config, mesh, xt, router, gate, up, down, capacity_factor)
        elif capacity_factor is None:
            if in_place and stacks.router is not None and tiles_fit(D, c.num_experts):
                r = route(c, stacked_matvec(xt, stacks.router, stacks.layer, dtype=jnp.float32,
                                            block_n=ROUTER_BLOCK_N))
            else:
                r = self.route(xt)
            # the routed experts' slices go to the grouped matmul without a copy (XLA's dynamic-slice fusion)
            y = dropless_experts(xt, r, gate, up, down)
            r = r._replace(kept=jnp.ones(r.experts.shape, bool))
        else:
            r = self.route(xt)
            cap = capacity(B * S, self.config, 1, capacity_factor)
            y, kept = dispatch_experts(xt, r, gate, up, down, capacity=cap)
            y, r = y.astype(dt), r._replace(kept=kept)
        y = constrain(y.reshape(B, S, D), ("batch", "seq", "embed"))
        if self.shared_experts is not None:
            shared = None
            if in_place and stacks.shared is not None and all(a.dtype == dt for a in stacks.shared):  # compute dtype
                shared = (*stacks.shared, stacks.layer)
            y = y + self.shared_experts(x, stacks=shared)
        return y, r
