"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Queries come from a low-rank q_a -> norm -> q_b path (or a plain q_proj). Keys and values come from one shared
latent c_kv = norm(kv_a(x))[:kv_lora_rank], expanded per head by k_b / v_b (the two halves of the released
kv_b_proj), plus one decoupled RoPE key k_pe shared by all heads.

The expanded path serves training and prefill: keys and values are expanded for every head. The absorbed path
serves decoding from the latent KV cache (see generate.py): W_UK is folded into the query and W_UV applied after
the weighted sum, so keys and values are never expanded.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .config import ModelConfig
from .grouped_matmul import TILE, decode_block, dot_precision, interpreted, matvecs, stacked_matvec, tiles_fit
from .layers import cast, kernel_backend, param, rms_norm
from .rope import apply_rope
from .sharding import constrain, per_shard


PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "o_proj", "v_b_proj")


class ProjectionStacks(NamedTuple):
    """The projection weights of every layer of a stacked MLA module, and the layer being run: decoding's
    `stacked_matvec` and `latent_output` read that layer out of the stacks themselves (a slice handed to a kernel
    would be copied whole)."""

    weights: dict  # name -> [L, *the layer's weight shape], in the compute dtype
    layer: jax.Array | int = 0  # int32: the layer these calls run

    @classmethod
    def of(cls, attn: "MLA") -> "ProjectionStacks | None":
        """The stacks of a stacked (layers-leading) MLA module, or None where they are not in its compute dtype."""
        weights = {n: getattr(attn, n)[...] for n in PROJECTIONS if hasattr(attn, n)}
        return cls(weights) if all(w.dtype == attn.dtype for w in weights.values()) else None


class LatentCache(NamedTuple):
    """One layer of the whole latent cache, for `latent_attention`: the kernel reads layer `layer` of the cache arrays
    itself (a slice handed to a kernel would be copied whole)."""

    c_kv: jax.Array  # [L, B, T, kv_lora_rank]
    k_pe: jax.Array  # [L, B, T, rope]
    layer: jax.Array  # int32: the layer (model order)
    last: jax.Array  # [B] int32: each row attends to slots [0, last]


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
        w_spec, out_spec = spec.split(",")[1].split("->")
        products = self._stacked_products(x, (name,), sum(ch not in out_spec for ch in w_spec), stacks)
        return products[name] if products else jnp.einsum(spec, x, cast(getattr(self, name), self.dtype))

    def _stacked_products(self, x, names, n: int, stacks: ProjectionStacks | None) -> dict | None:
        """x's products with the weights `names` (their first n dimensions contracted with x's last n), by name, in
        one `stacked_matvec` reading this layer out of their stacks; None without stacks or where a width does not
        fit the kernel."""
        ws = [getattr(self, name) for name in names]
        rows, cols = math.prod(ws[0].shape[:n]), [math.prod(w.shape[n:]) for w in ws]
        if stacks is None or not tiles_fit(rows, *cols):
            return None
        stacked = tuple(stacks.weights[name].reshape(-1, rows, c) for name, c in zip(names, cols))
        ys = stacked_matvec(x.reshape(-1, rows), stacked, stacks.layer)
        lead = x.shape[:x.ndim - n]
        return {name: y.astype(self.dtype).reshape(lead + w.shape[n:]) for name, y, w in zip(names, ys, ws)}

    def input_products(self, x, stacks: ProjectionStacks) -> dict | None:
        """x's products with the weights that read the layer's input (q_proj or q_a_proj, and kv_a_proj), by name,
        in one `stacked_matvec` over their stacks (decoding: one kernel instead of two); None where a width does
        not fit. `query` and `latent` take them as `products`."""
        names = ("q_proj" if self.config.q_lora_rank is None else "q_a_proj", "kv_a_proj")
        return self._stacked_products(x, names, 1, stacks)

    def query(self, x, cos, sin, stacks: ProjectionStacks | None = None, products: dict | None = None):
        """q_nope [B, S, H, nope] and roped q_pe [B, S, H, rope]. stacks: see `_project`; products: x's first
        product computed already (`input_products`)."""
        c, dt = self.config, self.dtype
        if c.q_lora_rank is None:
            q = products["q_proj"] if products else self._project("bsd,dhk->bshk", x, "q_proj", stacks)
        else:
            q_a = products["q_a_proj"] if products else self._project("bsd,dr->bsr", x, "q_a_proj", stacks)
            q_lat = rms_norm(q_a, self.q_a_norm[...], c.rms_norm_eps, dt)
            q = self._project("bsr,rhk->bshk", q_lat, "q_b_proj", stacks)
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x, cos, sin, stacks: ProjectionStacks | None = None, products: dict | None = None):
        """The cached quantities: normalised c_kv [B, S, kv_lora_rank] and roped k_pe [B, S, rope]. stacks,
        products: as in `query`."""
        c, dt = self.config, self.dtype
        kv = products["kv_a_proj"] if products else self._project("bsd,dr->bsr", x, "kv_a_proj", stacks)
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
    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, stacks: ProjectionStacks | None = None,
                 cache: LatentCache | None = None):
        """The same attention as `expanded`, computed against the latent without expanding keys or values.

        W_UK (k_b) is folded into the query: score_nope = (q_nope · W_UK) · c_kvᵀ; W_UV (v_b) is applied after the
        attention-weighted sum of c_kv, then o_proj (by `stacked_matvec` with stacks). Shapes as in `expanded`;
        returns [B, Sq, D]. cache (one query per row, Sq = 1): the attention over the latents runs on the
        `latent_attention` kernel against that layer of the whole cache, and with stacks its spans are combined
        and W_UV applied by `latent_output`; c_kv, k_pe and mask are then unused.
        """
        dt = self.dtype
        q_lat = jnp.einsum("bqhk,chk->bqhc", q_nope, cast(self.k_b_proj, dt))
        q_lat = constrain(q_lat, ("batch", "seq", "heads", "kv_lora"))
        if cache is not None:
            spans = latent_attention_spans(q_lat[:, 0], q_pe[:, 0], *cache, scale=self.config.softmax_scale)
            if stacks is not None and tiles_fit(self.config.v_head_dim):
                out = latent_output(*spans, stacks.weights["v_b_proj"], stacks.layer, dtype=dt)[:, None]
                return self._project("bqhv,hvd->bqd", out, "o_proj", stacks)
            o_lat = combine_spans(*spans).astype(dt)[:, None]
        else:
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


# ---------------------------------------------------------------------------------------------- decoding kernel
LATENT_HEADS = TILE  # heads per program: the rows of one tensor-core tile


def latent_attention_fits(config: ModelConfig, slots: int) -> bool:
    """Whether `latent_attention` takes this model and a cache of `slots` slots (heads in groups of 16; latent and
    rope widths and the slots multiples of 16)."""
    c = config
    return c.num_attention_heads % LATENT_HEADS == 0 and tiles_fit(c.kv_lora_rank, c.qk_rope_head_dim, slots)


def _latent_attention_kernel(layer_ref, last_ref, q_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, m_ref, l_ref, *, scale,
                             block_t, span):
    """Program (b, g, s): heads g·16 .. g·16 + 15 of row b over cache slots [s·span, (s+1)·span) ∩ [0, last]:
    the unnormalised weighted sum of the latents (online softmax) with its running max and denominator."""
    b, g, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, last = layer_ref[0], last_ref[b]
    heads = pl.ds(g * LATENT_HEADS, LATENT_HEADS)
    q, q_pe = q_ref[b, heads, :], q_pe_ref[b, heads, :]
    dot = functools.partial(jax.lax.dot_general, precision=dot_precision(q.dtype), preferred_element_type=jnp.float32)
    start = s * span
    blocks = jnp.clip((last + 1 - start + block_t - 1) // block_t, 0, span // block_t)

    def body(i, carry):
        m, l, acc = carry
        slots = start + i * block_t
        c, k_pe = c_ref[layer, b, pl.ds(slots, block_t), :], k_pe_ref[layer, b, pl.ds(slots, block_t), :]
        scores = dot(q, c, (((1,), (1,)), ((), ()))) + dot(q_pe, k_pe, (((1,), (1,)), ((), ())))  # [16, block_t]
        seen = (slots + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)) <= last
        scores = jnp.where(seen, scores * scale, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.exp(scores - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + dot(p.astype(c.dtype), c, (((1,), (0,)), ((), ())))
        return m_new, l * alpha + p.sum(axis=1), acc

    init = (jnp.full((LATENT_HEADS,), -1e30, jnp.float32), jnp.zeros((LATENT_HEADS,), jnp.float32),
            jnp.zeros((LATENT_HEADS, q.shape[1]), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, blocks, body, init)
    o_ref[b, s, heads, :] = acc
    m_ref[b, s, heads] = m
    l_ref[b, s, heads] = l


def latent_attention(q_lat, q_pe, c_kv, k_pe, layer, last, *, scale: float, **options):
    """Decoding's attention over the latent cache (the absorbed path's middle, one query per row), in one kernel
    that reads layer `layer` of the whole cache: softmax(scale · (q_lat · c_kvᵀ + q_pe · k_peᵀ)) · c_kv over the
    slots [0, last[b]] of each row b.

    q_lat [B, H, C] (the query with W_UK folded in), q_pe [B, H, R]; c_kv [L, B, T, C], k_pe [L, B, T, R]; last [B].
    Returns [B, H, C] float32: `latent_attention_spans` (options: its tiles), combined by XLA.
    """
    return combine_spans(*latent_attention_spans(q_lat, q_pe, c_kv, k_pe, layer, last, scale=scale, **options))


def combine_spans(o, m, l):
    """The attention output [B, H, C] from the spans' unnormalised sums o [B, S, H, C], maxima and denominators
    m, l [B, S, H]."""
    weight = jnp.exp(m - m.max(axis=1, keepdims=True))  # [B, S, H]: each span's share
    total = (weight * l).sum(axis=1)
    return (o * weight[..., None]).sum(axis=1) / total[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "block_t", "splits", "num_warps", "num_stages", "interpret"))
def latent_attention_spans(q_lat, q_pe, c_kv, k_pe, layer, last, *, scale: float, block_t: int = 32,
                           splits: int = 16, num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None):
    """`latent_attention`'s kernel: programs take 16 heads of one row over a span of the cache (flash-decoding: up
    to `splits` spans, blocks past a row's last slot skipped). Returns each span's unnormalised weighted sum
    o [B, S, H, C], score maximum m and denominator l [B, S, H] (float32), for `combine_spans` or `latent_output`.
    """
    B, H, C = q_lat.shape
    T = c_kv.shape[2]
    while block_t > TILE and T % block_t:
        block_t //= 2
    if H % LATENT_HEADS or block_t < TILE or T % block_t:
        raise ValueError(f"latent_attention: {H} heads (a multiple of {LATENT_HEADS}) and {T} cache slots "
                         f"(a multiple of blocks of {block_t} >= 16: a tensor-core tile)")
    per_span = -(-(T // block_t) // splits)  # blocks per span; the last span may be shorter
    span, S = per_span * block_t, -(-(T // block_t) // per_span)
    f32 = jnp.float32
    o, m, l = pl.pallas_call(
        functools.partial(_latent_attention_kernel, scale=scale, block_t=block_t, span=span),
        out_shape=[jax.ShapeDtypeStruct((B, S, H, C), f32), jax.ShapeDtypeStruct((B, S, H), f32),
                   jax.ShapeDtypeStruct((B, S, H), f32)],
        grid=(B, H // LATENT_HEADS, S),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=[pl.no_block_spec] * 3,
        name="latent_attention",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpreted(interpret),
    )(jnp.asarray(layer, jnp.int32).reshape(1), last.astype(jnp.int32), q_lat, q_pe, c_kv, k_pe)
    return o, m, l


def _latent_output_kernel(layer_ref, o_ref, m_ref, l_ref, w_ref, out_ref, *, block_k, block_n):
    """Program (b, h, n): columns n of head h's combined attention output (row b) times W_UV[layer, :, h]."""
    b, h, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, ns = layer_ref[0], pl.ds(n * block_n, block_n)
    spans, C = o_ref.shape[1], o_ref.shape[3]
    maxima = [m_ref[b, s, h] for s in range(spans)]
    top = functools.reduce(jnp.maximum, maxima)
    shares = [jnp.exp(m - top) for m in maxima]
    total = functools.reduce(jnp.add, [share * l_ref[b, s, h] for s, share in enumerate(shares)])

    def o_of(ks):  # the combined output, rounded to the compute dtype as the XLA path rounds it
        acc = functools.reduce(jnp.add, [share * o_ref[b, s, h, ks] for s, share in enumerate(shares)])
        return (acc / total).astype(out_ref.dtype)

    (y,) = matvecs(o_of, (lambda ks: w_ref[layer, ks, h, ns],), C, block_k, block_n)
    out_ref[b, h, ns] = y.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "block_k", "block_n", "num_warps", "num_stages", "interpret"))
def latent_output(o, m, l, w_uv, layer, *, dtype, block_k: int = 256, block_n: int = 32, num_warps: int = 4,
                  num_stages: int = 3, interpret: bool | None = None):
    """The absorbed path after the attention, in one kernel: `combine_spans` of `latent_attention_spans`' output
    (rounded to dtype), times W_UV: layer `layer` of the v_b_proj stack w_uv [L, C, H, V], read by the kernel.
    Returns [B, H, V] in dtype. Replaces XLA's combine, its rounding and the per-head product."""
    B, S, H, C = o.shape
    V = w_uv.shape[3]
    if w_uv.shape[1:3] != (C, H) or not tiles_fit(C, V):
        raise ValueError(f"latent_output: spans {o.shape} against W_UV {w_uv.shape} (widths multiples of {TILE})")
    block_k, block_n = decode_block(block_k, C), decode_block(block_n, V)
    return pl.pallas_call(
        functools.partial(_latent_output_kernel, block_k=block_k, block_n=block_n),
        out_shape=jax.ShapeDtypeStruct((B, H, V), dtype),
        grid=(B, H, V // block_n),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=pl.no_block_spec,
        name="latent_output",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpreted(interpret),
    )(jnp.asarray(layer, jnp.int32).reshape(1), o, m, l, w_uv)
