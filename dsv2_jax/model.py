"""The DeepSeek-V2 causal LM: embedding, scanned decoder-layer stacks (dense, MoE), final norm, lm_head.

Layers of one kind are stored stacked ([L, ...]) and run with `jax.lax.scan` (or unrolled, `forward(scan=False)`):
one stack for the dense layers (the leading `first_k_dense_replace` ones, and those skipped by `moe_layer_freq`),
one for the MoE layers. The layers run in config order; with moe_layer_freq == 1 that is exactly one scan per stack.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import grouped_matmul
from .attention import ATTENTION_KERNEL, MLA, DocumentMask
from .config import ModelConfig
from .layers import MLP, Embed, RMSNorm, cast, param
from .moe import MoE, RouterOutput, check_capacity_factor
from .rope import rope_cos_sin
from .sharding import constrain

REMAT_POLICIES = ("none", "full", "save_dots")


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); ffn is a dense SwiGLU or DeepSeekMoE."""

    def __init__(self, config: ModelConfig, moe: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.attn = MLA(c, rngs=rngs, **kw)
        self.post_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.is_moe = moe
        if moe:
            self.mlp = MoE(c, rngs=rngs, **kw)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, std=c.initializer_range, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask, capacity_factor: float | None = None):
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        h = self.post_attention_norm(x)
        if self.is_moe:
            y, router = self.mlp(h, capacity_factor)
        else:
            y, router = self.mlp(h), None
        return constrain(x + y, ("batch", "seq", "embed")), router


def check_inputs(config: ModelConfig, input_ids, positions=None, segment_ids=None) -> None:
    """A clear error for ids that are not [batch, seq] integers, positions / segment_ids of another shape, or
    (where the ids are concrete, not traced) an id outside [0, vocab_size)."""
    shape = np.shape(input_ids)
    if len(shape) != 2 or not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
        raise ValueError(f"input_ids must be integers of shape [batch, seq], got {jnp.result_type(input_ids)}"
                         f"{list(shape)}")
    for name, x in (("positions", positions), ("segment_ids", segment_ids)):
        if x is not None and np.shape(x) != shape:
            raise ValueError(f"{name} must have input_ids' shape {list(shape)}, got {list(np.shape(x))}")
    if not isinstance(input_ids, jax.core.Tracer) and getattr(input_ids, "is_fully_addressable", True) \
            and np.size(input_ids):
        ids = np.asarray(input_ids)
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            bad = ids[(ids < 0) | (ids >= config.vocab_size)]
            raise ValueError(f"input_ids hold {int(bad[0])}, outside the vocabulary [0, {config.vocab_size})")


def stacked_layers(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n modules from `make(rngs)` stored as one module with a leading 'layers' axis on every parameter."""
    keys = jax.random.split(rngs.params(), n)
    stack = nnx.vmap(lambda key: make(nnx.Rngs(params=key)), in_axes=0, out_axes=0)(keys)
    for _, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Param):
            var.set_metadata("axes", ("layers",) + tuple(var.get_metadata()["axes"]))
    return stack


class ForwardOutput(NamedTuple):
    logits: jnp.ndarray | None  # [B, S, V] float32 (None from forward(logits=False))
    router: RouterOutput | None  # per MoE layer, stacked: weights/experts/kept [L_moe, B*S, K], scores [.., E]
    dropped: jnp.ndarray  # float32 scalar: fraction of token-expert pairs dropped over all MoE layers
    hidden: jnp.ndarray | None = None  # [B, S, D] after the final norm, from forward(logits=False)


def layer_runs(config: ModelConfig) -> list[tuple[str, int, int]]:
    """Consecutive layers of one kind as (kind, first index in that kind's stack, count), in model order."""
    runs: list[list] = []
    seen = {"dense": 0, "moe": 0}
    for kind in config.layer_kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][2] += 1
        else:
            runs.append([kind, seen[kind], 1])
        seen[kind] += 1
    return [tuple(r) for r in runs]


def remat_policy(name: str):
    """'save_dots' keeps the outputs of the matmuls without batch dimensions (projections, dense MLPs, the experts'
    grouped matmuls) and a flash kernel's output and statistics (attention.flash_attention) for the backward pass,
    and recomputes the rest (norms, activations, the XLA attention path, routing); 'full' keeps only each layer's
    input."""
    if name == "save_dots":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names("experts_gate", "experts_up", "experts_down",
                                                          ATTENTION_KERNEL))
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {name!r}")


class DeepseekV2(nnx.Module):
    """DeepSeek-V2 causal language model. `model(input_ids, positions, segment_ids)` -> float32 logits."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        c = config
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = c
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, std=c.initializer_range, rngs=rngs, **kw)
        self.dense_layers = nnx.data(None)
        self.moe_layers = nnx.data(None)
        if c.num_dense_layers:
            self.dense_layers = stacked_layers(lambda r: DecoderLayer(c, False, rngs=r, **kw), c.num_dense_layers, rngs)
        if c.num_moe_layers:
            self.moe_layers = stacked_layers(lambda r: DecoderLayer(c, True, rngs=r, **kw), c.num_moe_layers, rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.lm_head = nnx.data(None)
        if not c.tie_word_embeddings:
            self.lm_head = param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), param_dtype,
                                 c.initializer_range)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """Logits [B, S, V] float32 of int ids [B, S]. Concrete inputs (not traced) are checked: their shapes, and
        ids in [0, vocab_size) (jnp.take would give NaN logits for an id past the end, the last row for -1)."""
        check_inputs(self.config, input_ids, positions, segment_ids)
        return self.forward(input_ids, positions, segment_ids).logits

    def forward(self, input_ids, positions=None, segment_ids=None, *, remat: str = "none",
                capacity_factor: float | None = None, logits: bool = True, scan: bool = True) -> ForwardOutput:
        """Logits and the routing of every MoE layer.

        input_ids, positions, segment_ids: int [B, S]. positions default to 0..S-1; segment_ids (default all
        ones) mark packed documents, each a run of equal ids: a token attends only to earlier tokens of its own.
        remat: 'none', 'full' (recompute each layer in the backward pass) or 'save_dots' (keep matmul outputs).
        capacity_factor: None = dropless MoE; f > 0 = device-level dropping of the lowest-affinity token-expert
        pairs past f times a device's balanced share (moe.py); router.kept marks the pairs that were computed.
        logits=False: return the final-normed hidden states instead of logits, for a loss that applies
        `head_weight()` itself in chunks (training.linear_cross_entropy).
        scan=False: run the layers of a stack one after another (unrolled) instead of with lax.scan: longer compiles,
        no stacking of the activations kept for the backward pass (see scan_layers).
        """
        check_capacity_factor(capacity_factor)
        B, S = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        if segment_ids is None:
            segment_ids = jnp.ones((B, S), jnp.int32)
        cos, sin = rope_cos_sin(self.config, positions)
        mask = DocumentMask.of(segment_ids)
        x = constrain(self.embed_tokens(input_ids), ("batch", "seq", "embed"))
        routers = []
        for kind, start, count in layer_runs(self.config):
            stack = self.moe_layers if kind == "moe" else self.dense_layers
            x, router = scan_layers(stack, start, count, x, (cos, sin, mask), remat, capacity_factor, scan)
            if router is not None:
                routers.append(router)
        router = jax.tree.map(lambda *a: jnp.concatenate(a), *routers) if routers else None
        dropped = jnp.float32(0.0) if router is None else jnp.mean(1.0 - router.kept.astype(jnp.float32))
        if not logits:
            return ForwardOutput(None, router, dropped, self.norm(x))
        return ForwardOutput(self.head(x), router, dropped)

    def head_weight(self) -> jnp.ndarray:
        """The output projection [D, V] in the compute dtype: lm_head, or the tied embedding transposed."""
        if self.lm_head is None:
            return cast(self.embed_tokens.embedding, self.dtype).T
        return cast(self.lm_head, self.dtype)

    @jax.named_scope("lm_head")
    def head(self, x):
        """Final norm and lm_head: float32 logits [B, S, V]."""
        logits = jnp.einsum("bsd,dv->bsv", self.norm(x), self.head_weight(), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))


def split_layers(stack: nnx.Module, start: int, count: int):
    """(graphdef, state) of layers [start, start + count) of a stacked module, ready to scan over."""
    graphdef, state = nnx.split(stack)
    if (start, count) != (0, jax.tree.leaves(state)[0].shape[0]):
        state = jax.tree.map(lambda a: a[start:start + count], state)
    return graphdef, state


def scan_layers(stack: nnx.Module, start: int, count: int, x, args, remat: str = "none",
                capacity_factor: float | None = None, scan: bool = True):
    """Runs layers [start, start + count) of a stacked module over x: (x, per-layer outputs stacked [count, ...]).

    scan=True: one lax.scan (compiles the layer once). scan=False: the layers unrolled, each on its slice of the
    stacked weights; what remat keeps for the backward pass then stays per layer instead of being copied into
    [count, ...] buffers by the scan.
    """
    graphdef, state = split_layers(stack, start, count)

    def body(h, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        return layer(h, *args, capacity_factor=capacity_factor)

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
    # Under lax.scan, save_dots would still run tokamax's grouped-matmul forward again in the backward pass
    # (grouped_matmul.outputs_saved); unrolled, JAX drops that recomputation.
    with grouped_matmul.outputs_saved() if remat == "save_dots" and scan else contextlib.nullcontext():
        if scan:
            return jax.lax.scan(body, x, state)
        outs = []
        for i in range(count):
            x, out = body(x, jax.tree.map(lambda a: a[i], state))
            outs.append(out)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def abstract_model(config: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> DeepseekV2:
    """The model with ShapeDtypeStructs in place of weights: nothing is allocated."""
    return nnx.eval_shape(lambda: DeepseekV2(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def count_params(config: ModelConfig) -> tuple[int, int]:
    """(total parameters, parameters activated per token excluding the input embedding)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(state))
    embedding = config.vocab_size * config.hidden_size
    inactive_experts = config.num_experts - (config.num_experts_per_tok or 0)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    activated = total - embedding - config.num_moe_layers * inactive_experts * per_expert
    if config.tie_word_embeddings:  # the shared matrix still works as the output head
        activated += embedding
    return total, activated
