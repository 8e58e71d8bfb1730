"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Queries come from a low-rank q_a -> norm -> q_b path (or a plain q_proj). Keys and values come from one shared
latent c_kv = norm(kv_a(x))[:kv_lora_rank], expanded per head by k_b / v_b (the two halves of the released
kv_b_proj), plus one decoupled RoPE key k_pe shared by all heads.

The expanded path serves training and prefill: keys and values are expanded for every head. The absorbed path
serves decoding from the latent KV cache (see generate.py): W_UK is folded into the query and W_UV applied after
the weighted sum, so keys and values are never expanded.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .grouped_matmul import matvec_fits, stacked_matvec
from .layers import cast, kernel_backend, param, rms_norm
from .rope import apply_rope
from .sharding import constrain, per_shard


PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "o_proj")


class ProjectionStacks(NamedTuple):
    """The projection weights of every layer of a stacked MLA module, and the layer being run: decoding's
    `stacked_matvec` reads that layer out of the stacks itself (a slice handed to a kernel would be copied whole)."""

    weights: dict  # name -> [L, *the layer's weight shape], in the compute dtype
    layer: jax.Array | int = 0  # int32: the layer these calls run

    @classmethod
    def of(cls, attn: "MLA") -> "ProjectionStacks | None":
        """The stacks of a stacked (layers-leading) MLA module, or None where they are not in its compute dtype."""
        weights = {n: getattr(attn, n)[...] for n in PROJECTIONS if hasattr(attn, n)}
        return cls(weights) if all(w.dtype == attn.dtype for w in weights.values()) else None


class MLA(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        std = c.initializer_range
        H, D = c.num_attention_heads, c.hidden_size
        if c.q_lora_rank is None:
            self.q_proj = param(rngs, (D, H, c.qk_head_dim), ("embed", "heads", "head_dim"), param_dtype, std)
        else:
            self.q_a_proj = param(rngs, (D, c.q_lora_rank), ("embed", "q_lora"), param_dtype, std)
            self.q_a_norm = param(None, (c.q_lora_rank,), ("norm",), param_dtype)
            self.q_b_proj = param(rngs, (c.q_lora_rank, H, c.qk_head_dim), ("q_lora", "heads", "head_dim"),
                                  param_dtype, std)
        self.kv_a_proj = param(rngs, (D, c.kv_lora_rank + c.qk_rope_head_dim), ("embed", "kv_lora"), param_dtype, std)
        self.kv_a_norm = param(None, (c.kv_lora_rank,), ("norm",), param_dtype)
        self.k_b_proj = param(rngs, (c.kv_lora_rank, H, c.qk_nope_head_dim), ("kv_lora", "heads", "head_dim"),
                              param_dtype, std)
        self.v_b_proj = param(rngs, (c.kv_lora_rank, H, c.v_head_dim), ("kv_lora", "heads", "head_dim"),
                              param_dtype, std)
        self.o_proj = param(rngs, (H, c.v_head_dim, D), ("heads", "head_dim", "embed"), param_dtype, std)

    # ------------------------------------------------------------------ projections
    def _project(self, spec: str, x, name: str, stacks: ProjectionStacks | None):
        """einsum(spec, x, weight `name`); with `stacks` (a decoding step), by `stacked_matvec` reading this layer's
        weight out of the stacks (where its widths fit the kernel). The contracted dimensions lead the weight and
        end x."""
        w = getattr(self, name)
        w_spec, out_spec = spec.split(",")[1].split("->")
        n = sum(ch not in out_spec for ch in w_spec)
        rows, cols = math.prod(w.shape[:n]), math.prod(w.shape[n:])
        if stacks is None or not matvec_fits(rows, cols):
            return jnp.einsum(spec, x, cast(w, self.dtype))
        stack = stacks.weights[name]
        y = stacked_matvec(x.reshape(-1, rows), stack.reshape(stack.shape[0], rows, cols), stacks.layer)
        return y.astype(self.dtype).reshape(x.shape[:x.ndim - n] + w.shape[n:])

    def query(self, x, cos, sin, stacks: ProjectionStacks | None = None):
        """q_nope [B, S, H, nope] and roped q_pe [B, S, H, rope]. stacks: see `_project`."""
        c, dt = self.config, self.dtype
        if c.q_lora_rank is None:
            q = self._project("bsd,dhk->bshk", x, "q_proj", stacks)
        else:
            q_lat = rms_norm(self._project("bsd,dr->bsr", x, "q_a_proj", stacks), self.q_a_norm[...],
                             c.rms_norm_eps, dt)
            q = self._project("bsr,rhk->bshk", q_lat, "q_b_proj", stacks)
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x, cos, sin, stacks: ProjectionStacks | None = None):
        """The cached quantities: normalised c_kv [B, S, kv_lora_rank] and roped k_pe [B, S, rope]."""
        c, dt = self.config, self.dtype
        kv = self._project("bsd,dr->bsr", x, "kv_a_proj", stacks)
        c_kv = rms_norm(kv[..., : c.kv_lora_rank], self.kv_a_norm[...], c.rms_norm_eps, dt)
        k_pe = apply_rope(kv[..., c.kv_lora_rank:], cos, sin)
        return c_kv, k_pe

    # ------------------------------------------------------------------ expanded attention
    @jax.named_scope("attention")
    def expanded(self, q_nope, q_pe, c_kv, k_pe, mask, causal: bool = False):
        """Attention with per-head keys/values expanded from the latent.

        q_*: [B, Sq, H, *]; c_kv, k_pe: [B, Sk, *]; mask: bool [B, Sq, Sk], True where a query may attend.
        causal: the mask allows nothing above the diagonal (Sq == Sk, query i is key i), so a fused kernel may
        skip those blocks; the result is the same either way. Returns [B, Sq, D].
        """
        dt = self.dtype
        k_nope = constrain(jnp.einsum("bsc,chk->bshk", c_kv, cast(self.k_b_proj, dt)),
                           ("batch", "seq", "heads", "head_dim"))
        v = constrain(jnp.einsum("bsc,chk->bshk", c_kv, cast(self.v_b_proj, dt)),
                      ("batch", "seq", "heads", "head_dim"))
        if kernel_backend("DSV2_ATTENTION", "xla") == "tokamax":  # a fused flash-attention kernel on GPU
            import tokamax
            k_rope = jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:3], k_pe.shape[-1]))

            def flash(q, k, v, mask):
                return tokamax.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=causal,
                                                     scale=self.config.softmax_scale)

            heads = ("batch", "seq", "heads", "head_dim")
            out = per_shard(flash, (heads, heads, heads, ("batch", "seq", None)), heads)(
                jnp.concatenate([q_nope, q_pe], -1), jnp.concatenate([k_nope, k_rope], -1), v, mask)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
            scores += jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe, preferred_element_type=jnp.float32)
            probs = masked_softmax(scores, mask, self.config.softmax_scale, dt)
            out = jnp.einsum("bhqk,bkhv->bqhv", probs, v)
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        return jnp.einsum("bqhv,hvd->bqd", out, cast(self.o_proj, dt))

    # ------------------------------------------------------------------ absorbed attention (decode)
    @jax.named_scope("attention_absorbed")
    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, stacks: ProjectionStacks | None = None):
        """The same attention as `expanded`, computed against the latent without expanding keys or values.

        W_UK (k_b) is folded into the query: score_nope = (q_nope · W_UK) · c_kvᵀ; W_UV (v_b) is applied after the
        attention-weighted sum of c_kv, then o_proj (by `stacked_matvec` with stacks). Shapes as in `expanded`;
        returns [B, Sq, D].
        """
        dt = self.dtype
        q_lat = jnp.einsum("bqhk,chk->bqhc", q_nope, cast(self.k_b_proj, dt))
        q_lat = constrain(q_lat, ("batch", "seq", "heads", "kv_lora"))
        scores = jnp.einsum("bqhc,bkc->bhqk", q_lat, c_kv, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe, preferred_element_type=jnp.float32)
        probs = masked_softmax(scores, mask, self.config.softmax_scale, dt)
        o_lat = jnp.einsum("bhqk,bkc->bqhc", probs, c_kv)
        o_lat = constrain(o_lat, ("batch", "seq", "heads", "kv_lora"))
        out = jnp.einsum("bqhc,chv->bqhv", o_lat, cast(self.v_b_proj, dt))
        return self._project("bqhv,hvd->bqd", out, "o_proj", stacks)

    @jax.named_scope("mla")
    def __call__(self, x, cos, sin, mask):
        """Training / prefill without a cache: x [B, S, D] -> [B, S, D]."""
        x = x.astype(self.dtype)
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        return self.expanded(q_nope, q_pe, c_kv, k_pe, mask, causal=True)


def masked_softmax(scores, mask, scale: float, dtype):
    """softmax(scale · scores) over keys in float32 where mask [B, Sq, Sk] allows, cast to dtype; scores [B, H, Sq, Sk]."""
    scores = jnp.where(mask[:, None], scores * scale, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def causal_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """bool [B, S, S]: query i sees key j when j <= i and both lie in the same segment (packed documents)."""
    S = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((S, S), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same
