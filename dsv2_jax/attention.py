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
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx, struct
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .config import ModelConfig
from .grouped_matmul import (PROJECTION_TILES, TILE, LayerIndex, decode_block, dot_precision, interpreted, kernel_layer,
                             layer_operand, matvecs, power_of_two, stacked_matvec, stacked_partials, tiles_fit)
from .layers import cast, kernel_backend, param, rms_norm, rms_norm_rows
from .rope import apply_rope
from .sharding import constrain, per_shard


PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "o_proj", "k_b_proj", "v_b_proj")


class DocumentMask(NamedTuple):
    """Causal attention within packed documents, as key ranges: query i sees key j when starts[i] <= j <= i.

    starts: int32 [B, S], the first position of each token's document. A flash kernel takes these ranges instead
    of a [B, S, S] mask array, which it would read for every block, and skips the key blocks before a query
    block's documents (bench/RESULTS.md §13); `as_array()` is that mask for the other paths."""

    starts: jnp.ndarray

    @classmethod
    def of(cls, segment_ids: jnp.ndarray) -> "DocumentMask":
        """The documents of segment_ids [B, S]: each run of equal ids is one document (packed rows)."""
        S = segment_ids.shape[-1]
        new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
        return cls(jax.lax.cummax(jnp.where(new, jnp.arange(S, dtype=jnp.int32), 0), axis=1))

    def as_array(self) -> jnp.ndarray:
        """bool [B, S, S], True where query i may attend to key j."""
        j = jnp.arange(self.starts.shape[-1], dtype=jnp.int32)
        return (j[None, None, :] >= self.starts[:, :, None]) & (j[None, None, :] <= j[None, :, None])


class PartialSums(NamedTuple):
    """A decoding product left as its kernel's float32 partial sums [S, R, N] (`stacked_partials`: the product of
    T <= R tokens is `sums.sum(0)[:T]`), for a kernel that adds them itself (`layers.rms_norm_rows`' `added`)."""

    sums: jnp.ndarray

    def total(self, shape, dtype):
        """The product of shape [T, ..., N] in dtype, as `stacked_matvec` and the einsum path give it."""
        return self.sums.sum(axis=0)[:shape[0]].astype(dtype).reshape(shape)


class ProjectionStacks(NamedTuple):
    """The projection weights of every layer of a stacked MLA module, and the layer being run: decoding's
    `stacked_matvec` and `latent_output` read that layer out of the stacks themselves (a slice handed to a kernel
    would be copied whole)."""

    weights: dict  # name -> [L, *the layer's weight shape], in the compute dtype
    layer: jax.Array | int | LayerIndex = 0  # int32 (or a LayerIndex): the layer these calls run
    kv_a_norm: jax.Array | None = None  # [L, kv_lora_rank]: the latent's norm weights (any dtype), for absorbed_query
    # [L, D]: the layers' input norm weights where the input comes unnormalised (one token: `absorbed_inputs`' first
    # kernel normalises it, one kernel fewer per layer; `MLA.input_normalised` on the other paths). Its eps is the
    # config's rms_norm_eps, as for every norm of the model.
    input_norm: jax.Array | None = None

    @classmethod
    def of(cls, attn: "MLA") -> "ProjectionStacks | None":
        """The stacks of a stacked (layers-leading) MLA module, or None where they are not in its compute dtype."""
        weights = {n: getattr(attn, n)[...] for n in PROJECTIONS if hasattr(attn, n)}
        if any(w.dtype != attn.dtype for w in weights.values()):
            return None
        return cls(weights, kv_a_norm=attn.kv_a_norm[...])


@struct.dataclass
class LatentCache:
    """One layer of the whole latent cache, for `latent_attention`: the kernel reads layer `layer` + `offset` of the
    cache arrays itself (a slice handed to a kernel would be copied whole). The offset is static and added in the
    kernels: a decoding loop passes its counter as `layer` for the weights' stacks and the cache alike, where an index
    of its own would make XLA keep a copy of the counter every iteration (bench/RESULTS.md §11)."""

    c_kv: jax.Array  # [L, B, T, kv_lora_rank]
    k_pe: jax.Array  # [L, B, T, rope]
    layer: jax.Array | LayerIndex  # int32 (or a LayerIndex): the layer (model order) less `offset`
    last: jax.Array  # [B] int32: each row attends to slots [0, last]
    offset: int = struct.field(pytree_node=False, default=0)


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
    def input_normalised(self, x, stacks: ProjectionStacks | None) -> "tuple[jax.Array, ProjectionStacks | None]":
        """x through the input norm `stacks` carry, if any (`rms_norm_rows`), and the stacks without it: for the
        decoding paths whose first kernel does not normalise x itself."""
        if stacks is None or stacks.input_norm is None:
            return x, stacks
        return (rms_norm_rows(x, stacks.input_norm, stacks.layer, eps=self.config.rms_norm_eps, dtype=self.dtype),
                stacks._replace(input_norm=None))

    def _project(self, spec: str, x, name: str, stacks: ProjectionStacks | None, sums: bool = False):
        """einsum(spec, x, weight `name`); with `stacks` (a decoding step), by `stacked_matvec` reading this layer's
        weight out of the stacks (where its widths fit the kernel). The contracted dimensions lead the weight and
        end x. sums: on that kernel, return its unsummed float32 partial sums [S, R, N] (`stacked_partials`) as
        `PartialSums`, for a kernel that adds them itself."""
        w_spec, out_spec = spec.split(",")[1].split("->")
        products = self._stacked_products(x, (name,), sum(ch not in out_spec for ch in w_spec), stacks, name, sums)
        return products[name] if products else jnp.einsum(spec, x, cast(getattr(self, name), self.dtype))

    def _stacked_products(self, x, names, n: int, stacks: ProjectionStacks | None, product: str,
                          sums: bool = False) -> dict | None:
        """x's products with the weights `names` (their first n dimensions contracted with x's last n), by name, in
        one `stacked_matvec` reading this layer out of their stacks, with the tiles PROJECTION_TILES has for
        `product` at this many tokens; None without stacks or where a width does not fit the kernel. sums (one
        weight): its `PartialSums` instead."""
        ws = [getattr(self, name) for name in names]
        rows, cols = math.prod(ws[0].shape[:n]), [math.prod(w.shape[n:]) for w in ws]
        if stacks is None or not tiles_fit(rows, *cols):
            return None
        stacked = tuple(stacks.weights[name].reshape(-1, rows, c) for name, c in zip(names, cols))
        tokens = x.reshape(-1, rows)
        tiles = PROJECTION_TILES.get((product, tokens.shape[0]), {})
        if sums:
            return {names[0]: PartialSums(stacked_partials(tokens, stacked, stacks.layer, **tiles))}
        ys = stacked_matvec(tokens, stacked, stacks.layer, **tiles)
        lead = x.shape[:x.ndim - n]
        return {name: y.astype(self.dtype).reshape(lead + w.shape[n:]) for name, y, w in zip(names, ys, ws)}

    def input_products(self, x, stacks: ProjectionStacks) -> dict | None:
        """x's products with the weights that read the layer's input (q_proj or q_a_proj, and kv_a_proj), by name,
        in one `stacked_matvec` over their stacks (decoding: one kernel instead of two); None where a width does
        not fit. `query` and `latent` take them as `products`."""
        names = ("q_proj" if self.config.q_lora_rank is None else "q_a_proj", "kv_a_proj")
        return self._stacked_products(x, names, 1, stacks, "input")

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

        q_*: [B, Sq, H, *]; c_kv, k_pe: [B, Sk, *]; mask: bool [B, Sq, Sk], True where a query may attend, or
        `DocumentMask` (Sq == Sk; causal within each document). causal: the mask allows nothing above the diagonal
        (Sq == Sk, query i is key i), so a fused kernel may skip those blocks; the result is the same either way.
        Returns [B, Sq, D].
        """
        dt = self.dtype
        k_nope = constrain(jnp.einsum("bsc,chk->bshk", c_kv, cast(self.k_b_proj, dt)),
                           ("batch", "seq", "heads", "head_dim"))
        v = constrain(jnp.einsum("bsc,chk->bshk", c_kv, cast(self.v_b_proj, dt)),
                      ("batch", "seq", "heads", "head_dim"))
        documents = isinstance(mask, DocumentMask)
        if kernel_backend("DSV2_ATTENTION", "xla") == "tokamax":  # a fused flash-attention kernel on GPU
            k_rope = jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:3], k_pe.shape[-1]))

            def flash(q, k, v, m):
                m = DocumentMask(m) if documents else m
                return flash_attention(q, k, v, m, causal or documents, self.config.softmax_scale, tokamax_attention)

            heads = ("batch", "seq", "heads", "head_dim")
            out = per_shard(flash, (heads, heads, heads, ("batch", "seq") if documents else ("batch", "seq", None)),
                            heads)(jnp.concatenate([q_nope, q_pe], -1), jnp.concatenate([k_nope, k_rope], -1), v,
                                   mask.starts if documents else mask)
        else:
            mask = mask.as_array() if documents else mask
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
            return self.attend_latent(q_lat[:, 0], q_pe[:, 0], stacks, cache)
        scores = jnp.einsum("bqhc,bkc->bhqk", q_lat, c_kv, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bqhr,bkr->bhqk", q_pe, k_pe, preferred_element_type=jnp.float32)
        probs = masked_softmax(scores, mask, self.config.softmax_scale, dt)
        return self._latent_out(jnp.einsum("bhqk,bkc->bqhc", probs, c_kv), stacks)

    def _latent_out(self, o_lat, stacks: ProjectionStacks | None):
        """o_proj(W_UV · o_lat) of the attention's latent output o_lat [B, Sq, H, C]: [B, Sq, D]."""
        o_lat = constrain(o_lat, ("batch", "seq", "heads", "kv_lora"))
        out = jnp.einsum("bqhc,chv->bqhv", o_lat, cast(self.v_b_proj, self.dtype))
        return self._project("bqhv,hvd->bqd", out, "o_proj", stacks)

    def attend_latent(self, q_lat, q_pe, stacks: ProjectionStacks | None, cache: LatentCache, sums: bool = False):
        """A decoding step's attention from its absorbed query q_lat [B, H, C] and q_pe [B, H, R] (one token per
        row): `latent_attention_spans` over that layer of the whole cache, then with stacks `latent_output`
        (the spans combined and W_UV in one kernel) and o_proj on `stacked_matvec`. Returns [B, 1, D]; with sums,
        o_proj's `PartialSums` where it runs on that kernel."""
        B, H = q_lat.shape[:2]
        spans = latent_attention_spans(q_lat, q_pe, cache.c_kv, cache.k_pe, cache.layer, cache.last,
                                       scale=self.config.softmax_scale, layer_offset=cache.offset,
                                       **latent_tiles("latent_attention", B, H))
        if stacks is not None and tiles_fit(self.config.v_head_dim):
            out = latent_output(*spans, stacks.weights["v_b_proj"], stacks.layer, dtype=self.dtype,
                                **latent_tiles("latent_output", B, H))[:, None]
            return self._project("bqhv,hvd->bqd", out, "o_proj", stacks, sums)
        return self._latent_out(combine_spans(*spans).astype(self.dtype)[:, None], stacks)

    def absorbed_inputs(self, x, cos, sin, stacks: ProjectionStacks, cache: LatentCache):
        """A decoding step's attention inputs in two or three kernels (x [B, 1, D], one token per row): the
        layer input's products (`stacked_partials`; on the low-rank path q_a_proj with kv_a_proj, then q_b_proj
        of the normalised q_a), then `absorbed_query` for the absorbed query and the new latent written into the
        cache at slot cache.last. Where the stacks carry the input norm (one token), x is the layer's unnormalised
        input and the first kernel normalises it. Returns (q_lat [B, H, C], q_pe [B, H, R], the cache), or None
        where the widths do not fit the kernels (`absorbed_query_fits`, `tiles_fit`)."""
        c, dt = self.config, self.dtype
        B, D = x.shape[0], x.shape[-1]
        query = "q_proj" if c.q_lora_rank is None else "q_a_proj"
        width = c.num_attention_heads * c.qk_head_dim
        first = width if c.q_lora_rank is None else c.q_lora_rank
        if not (absorbed_query_fits(c) and tiles_fit(D, first, c.kv_lora_rank + c.qk_rope_head_dim, width)
                and stacks.kv_a_norm is not None and x.shape[1] == 1):
            return None
        w = stacks.weights
        # x in its own type: the kernel converts it to dt (normalising it first where the stacks carry the norm)
        parts = stacked_partials(x.reshape(B, D), (w[query].reshape(-1, D, first), w["kv_a_proj"]), stacks.layer,
                                 stacks.input_norm, dtype=dt, eps=c.rms_norm_eps,
                                 **PROJECTION_TILES.get(("input", B), {}))
        q_parts = parts
        if c.q_lora_rank is not None:
            q_a = rms_norm(parts.sum(axis=0)[:B, :first].astype(dt), self.q_a_norm[...], c.rms_norm_eps, dt)
            q_parts = stacked_partials(q_a, w["q_b_proj"].reshape(-1, first, width), stacks.layer)
        q_lat, q_pe, c_kv, k_pe = absorbed_query(
            q_parts, parts, w["k_b_proj"], stacks.kv_a_norm, cos.reshape(B, -1), sin.reshape(B, -1), cache.c_kv,
            cache.k_pe, stacks.layer, cache.layer, cache.last, q_at=0, kv_at=first, eps=c.rms_norm_eps,
            cache_offset=cache.offset, **latent_tiles("absorbed_query", B, c.num_attention_heads))
        return q_lat, q_pe, cache.replace(c_kv=c_kv, k_pe=k_pe)

    @jax.named_scope("mla")
    def __call__(self, x, cos, sin, mask):
        """Training / prefill without a cache: x [B, S, D] -> [B, S, D]."""
        x = x.astype(self.dtype)
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        return self.expanded(q_nope, q_pe, c_kv, k_pe, mask, causal=True)


ATTENTION_KERNEL = "attention_kernel"  # the name of a flash kernel's output and statistics (remat_policy)


def tokamax_attention(q, k, v, mask, causal: bool, scale: float):
    """tokamax's flash attention (its Mosaic kernels on Hopper). q, k [B, S, H, Dqk]; v [B, S, H, Dv]; mask bool
    [B, Sq, Sk] or `DocumentMask`; causal: nothing above the diagonal is allowed, so the kernel may skip those blocks.

    A `DocumentMask` goes to tokamax's Mosaic GPU kernel as each query's first key (its `Mask(k_start=...)`, causal),
    so no mask array is built or read. Where that kernel refuses (e.g. off Hopper) or does not import (another
    tokamax version), the documents go to `tokamax.dot_product_attention` as a mask array, as any bool mask does.
    Sequences that are not whole blocks of the kernels' rows are padded to them (`padded_to_blocks`)."""
    return padded_to_blocks(_tokamax_attention, q, k, v, mask, causal, scale)


# tokamax 0.0.17's Mosaic GPU backward kernels load the softmax statistics and key starts in blocks of 64 rows from
# arrays padded only to a multiple of 8, so past a shorter sequence's end they read other memory (a 16-token row's
# gradients came out NaN once on an H200), and its mask-array path refused a 100-token sequence (rows that are not
# multiples of 16 bytes). Whole blocks of its largest tile (128 keys in the forward) avoid both (bench/RESULTS.md
# §33). Its forward pads the keys and a mask's rows to whole blocks itself and ends them at the real length, so
# prefill's chunks over a cache window of any length (cross-attention, no backward) are left as they are (§35).
SEQ_BLOCK = 128


def padded_to_blocks(kernel, q, k, v, mask, causal: bool, scale: float, block: int = SEQ_BLOCK):
    """`kernel(q, k, v, mask, causal, scale)` with self-attention's sequence padded by zero rows to a multiple of
    `block` and the padded rows of the output dropped. Nothing real attends to a padded key (the mask is causal), so
    the output and the gradients of the real rows are those of the unpadded call. A padded query sees every key up
    to its own with document ranges (start 0, so rows of one document keep the causal-only backward of
    `_key_ranges_vjp`), only its own key with a mask array; either way no row is all masked. Its output is dropped,
    so its cotangent is zero and it adds nothing to the keys' and values' gradients."""
    S, pad = q.shape[1], -q.shape[1] % block
    if not pad or k.shape[1] != S:
        return kernel(q, k, v, mask, causal, scale)
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    if isinstance(mask, DocumentMask):
        mask = DocumentMask(jnp.pad(mask.starts, ((0, 0), (0, pad))))
    else:
        i = jnp.arange(S + pad)
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, pad))) | ((i[:, None] == i) & (i[:, None] >= S))
    return kernel(q, k, v, mask, causal, scale)[:, :S]


def _tokamax_attention(q, k, v, mask, causal: bool, scale: float):
    import tokamax
    if isinstance(mask, DocumentMask):
        if (ranges := _tokamax_key_ranges()) is not None:
            Mask, op = ranges
            try:
                return op(q, k, v, mask=Mask(k_start=mask.starts[:, None, :], is_causal=True), logits_scale=scale)
            except NotImplementedError:  # e.g. off Hopper
                pass
        mask, causal = mask.as_array(), True
    return tokamax.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=causal, scale=scale)


@functools.cache
def _tokamax_key_ranges():
    """(tokamax's key-range `Mask`, its Mosaic GPU flash-attention op with `_key_ranges_vjp` as its backward), or
    None with a warning where they do not import. tokamax 0.0.17 exports none of them (the op only through
    `tokamax.ops.gpu`, which needs jax_triton), so they come from its modules, which another version may move."""
    try:
        from tokamax._src.ops.attention.base import Mask
        from tokamax._src.ops.attention.pallas_mosaic_gpu import PallasMosaicGpuFlashAttention
        from tokamax._src.ops.attention.pallas_mosaic_gpu_vjp import PallasMosaicGpuFlashAttentionVjp
    except ImportError as e:
        warnings.warn(f"tokamax's key-range attention mask does not import ({type(e).__name__}: {e}); packed "
                      "documents go to its flash kernel as a [batch, seq, seq] mask array", RuntimeWarning,
                      stacklevel=3)
        return None
    return Mask, PallasMosaicGpuFlashAttention(vjp=functools.partial(_key_ranges_vjp, Mask,
                                                                     PallasMosaicGpuFlashAttentionVjp()))


def _key_ranges_vjp(Mask, vjp, residuals, out, d_out, *args, mask, **kwargs):
    """tokamax's flash-attention backward, given causal key ranges. Its backward kernels mask each block element by
    element wherever a key start is given; where every row of the batch is one document (all starts 0), the ranges
    are the causal mask, and the causal-only kernels give the same gradients ~10% sooner (bench/RESULTS.md §16).
    The choice is made on the device (a `lax.cond`: the predicate goes to the host once per call)."""
    def backward(mask):
        return vjp(residuals, out, d_out, *args, mask=mask, **kwargs)

    others = (mask.bool_mask, mask.q_start, mask.q_end, mask.k_end, kwargs.get("q_indices"), kwargs.get("k_indices"))
    if mask.k_start is None or not mask.is_causal or any(a is not None for a in others):
        return backward(mask)
    return jax.lax.cond(jnp.all(mask.k_start == 0), lambda: backward(Mask(is_causal=True)), lambda: backward(mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def flash_attention(q, k, v, mask, causal: bool, scale: float, kernel):
    """`kernel(q, k, v, mask, causal, scale)` (a flash kernel with its own VJP), whose forward runs once in a
    differentiated step under the save_dots remat policy too.

    tokamax's kernels are a `custom_vjp(optimize_remat=True)`: the forward pass runs the kernel without its
    residuals (its output and softmax statistics), and where a remat policy keeps none of them, the backward pass
    runs the forward again to get them. Here the forward pass takes the kernel's VJP (one kernel, with the
    residuals) and names its output and residuals ATTENTION_KERNEL, which save_dots keeps: the backward pass then
    runs only the kernel's backward (bench/RESULTS.md §12). mask gets no gradient."""
    return kernel(q, k, v, mask, causal, scale)


def _flash_attention_fwd(q, k, v, mask, causal, scale, kernel):
    inputs = (q, k, v, mask)  # all four are arguments of the pullback, so that it closes over none of them
    out, backward = jax.vjp(lambda q, k, v, mask: kernel(q, k, v, mask, causal, scale), *inputs)
    # The kernel's output (which o_proj's weight gradient reads too) and its residuals are named; the inputs, which
    # remat recomputes from the saved projections, are not.
    named = checkpoint_name(out, ATTENTION_KERNEL)
    leaves = jax.tree.leaves(inputs)
    backward = jax.tree.map(lambda a: named if a is out else a if any(a is x for x in leaves)
                            else checkpoint_name(a, ATTENTION_KERNEL), backward)
    return named, backward


def _flash_attention_bwd(causal, scale, kernel, backward, d_out):
    return (*backward(d_out)[:3], None)


flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def masked_softmax(scores, mask, scale: float, dtype):
    """softmax(scale · scores) over keys in float32 where mask [B, Sq, Sk] allows, cast to dtype; scores [B, H, Sq, Sk]."""
    scores = jnp.where(mask[:, None], scores * scale, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def causal_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """bool [B, S, S]: query i sees key j when j <= i and both lie in the same document, a run of equal
    segment ids (packed documents; `DocumentMask`)."""
    return DocumentMask.of(segment_ids).as_array()


# ---------------------------------------------------------------------------------------------- decoding kernel
LATENT_HEADS = TILE  # heads per program: the rows of one tensor-core tile
# one row a step: more programs in these two latency-bound kernels, 32 spans of the cache (16 otherwise) and the
# latent in blocks of 32 (64): with the router's 64-row blocks (layers.ONE_ROW_ROUTER_ROWS), V2-Lite's batch-1 step
# ~1% faster (H200, bench/RESULTS.md §23)
ONE_ROW_TILES = dict(latent_attention=dict(splits=32), absorbed_query=dict(block_c=32))
# 16 rows or more: absorbed_query and latent_output take 16 rows a program (one row a program read W_UK and W_UV once
# per row: at batch 64 they took 1.8 and 0.8 of a 13.0 ms step), and latent_attention splits the cache into fewer
# spans, about LATENT_SPAN_PROGRAMS programs in all (16 spans at most), so that it writes and latent_output reads
# fewer spans' sums. H200, V2-Lite: batch 64 13.0-13.2 -> 10.9-11.2 ms a step (16 spans: 11.96 against 11.16 in one
# process); batch 16 even (9.64 / 9.65), so 2-15 rows (not measured) keep a program per row; bench/RESULTS.md §25
MANY_ROW_TILES = dict(absorbed_query=dict(rows=TILE), latent_output=dict(rows=TILE, block_k=64))
LATENT_SPAN_PROGRAMS = 256


def latent_tiles(kernel: str, batch: int, heads: int) -> dict:
    """The tiles of a decoding step's latent kernel ("latent_attention", "absorbed_query", "latent_output") at
    `batch` rows of `heads` heads: ONE_ROW_TILES at one row, the kernels' defaults (a program per row, 16 spans) up
    to 15 rows, from 16 MANY_ROW_TILES and spans for about LATENT_SPAN_PROGRAMS programs."""
    if batch == 1:
        return ONE_ROW_TILES.get(kernel, {})
    if batch < TILE:
        return {}
    if kernel == "latent_attention":
        return dict(splits=max(1, min(16, LATENT_SPAN_PROGRAMS // (batch * heads // LATENT_HEADS))))
    return MANY_ROW_TILES.get(kernel, {})


def latent_attention_fits(config: ModelConfig, slots: int) -> bool:
    """Whether `latent_attention` takes this model and a cache of `slots` slots (heads in groups of 16; latent and
    rope widths and the slots multiples of 16)."""
    c = config
    return c.num_attention_heads % LATENT_HEADS == 0 and tiles_fit(c.kv_lora_rank, c.qk_rope_head_dim, slots)


def _latent_attention_kernel(layer_ref, last_ref, q_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, m_ref, l_ref, *, scale,
                             block_t, span, at):
    """Program (b, g, s): heads g·16 .. g·16 + 15 of row b over cache slots [s·span, (s+1)·span) ∩ [0, last]:
    the unnormalised weighted sum of the latents (online softmax) with its running max and denominator."""
    b, g, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, last = kernel_layer(layer_ref, at), last_ref[b]
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


@functools.partial(jax.jit, static_argnames=("scale", "block_t", "splits", "num_warps", "num_stages", "layer_offset",
                                             "interpret"))
def latent_attention_spans(q_lat, q_pe, c_kv, k_pe, layer, last, *, scale: float, block_t: int = 32,
                           splits: int = 16, num_warps: int = 4, num_stages: int = 2, layer_offset: int = 0,
                           interpret: bool | None = None):
    """`latent_attention`'s kernel: programs take 16 heads of one row over a span of the cache (flash-decoding: up
    to `splits` spans, blocks past a row's last slot skipped). Returns each span's unnormalised weighted sum
    o [B, S, H, C], score maximum m and denominator l [B, S, H] (float32), for `combine_spans` or `latent_output`.
    The cache's layer is `layer` + `layer_offset` (static; `LatentCache.offset`).
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
    layer, at = layer_operand(layer, layer_offset)
    o, m, l = pl.pallas_call(
        functools.partial(_latent_attention_kernel, scale=scale, block_t=block_t, span=span, at=at),
        out_shape=[jax.ShapeDtypeStruct((B, S, H, C), f32), jax.ShapeDtypeStruct((B, S, H), f32),
                   jax.ShapeDtypeStruct((B, S, H), f32)],
        grid=(B, H // LATENT_HEADS, S),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=[pl.no_block_spec] * 3,
        name="latent_attention",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpreted(interpret),
    )(layer, last.astype(jnp.int32), q_lat, q_pe, c_kv, k_pe)
    return o, m, l


def row_block(r, rows: int, batch: int):
    """Inside a kernel: the rows of block r, the index of row r itself for one row (its blocks then drop the row
    axis) or else pl.ds(r·rows, rows), and the mask of those rows that are in the batch of `batch` rows (None where
    every block is whole)."""
    if rows == 1:
        return r, None
    bs = pl.ds(r * rows, rows)
    if batch % rows == 0:
        return bs, None
    return bs, r * rows + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) < batch


def rows_masked(mask, shape):
    """A row mask [rows] broadcast to a block of `shape` (rows first), or None."""
    return None if mask is None else jnp.broadcast_to(mask.reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def _latent_output_kernel(layer_ref, o_ref, m_ref, l_ref, w_ref, out_ref, *, rows, block_k, block_n, at):
    """Program (r, h, n): columns n of head h's combined attention output times W_UV[layer, :, h], for rows
    r·rows .. (rows 1 or 16: one tensor-core tile; one row is broadcast to its 16 rows, rows past the batch are
    masked)."""
    r, h, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, ns = kernel_layer(layer_ref, at), pl.ds(n * block_n, block_n)
    B, spans, C = o_ref.shape[0], o_ref.shape[1], o_ref.shape[3]
    bs, valid = row_block(r, rows, B)
    per_row = (lambda v: v) if rows == 1 else (lambda v: v[:, None])  # a row's scalar against its block

    def load(ref, index, other):  # rows past the batch read as `other`
        if valid is None:
            return ref[index]
        index = tuple(jnp.int32(i) if isinstance(i, int) else i for i in index)  # (the masked load's indexer)
        return plgpu.load(ref.at[index], mask=rows_masked(valid, ref.at[index].shape), other=other)

    maxima = [load(m_ref, (bs, s, h), 0.0) for s in range(spans)]
    top = functools.reduce(jnp.maximum, maxima)
    shares = [jnp.exp(m - top) for m in maxima]
    total = functools.reduce(jnp.add, [share * load(l_ref, (bs, s, h), 1.0) for s, share in enumerate(shares)])

    def o_of(ks):  # the combined output, rounded to the compute dtype as the XLA path rounds it
        o = functools.reduce(jnp.add, [per_row(share) * load(o_ref, (bs, s, h, ks), 0.0)
                                       for s, share in enumerate(shares)])
        return (o / per_row(total)).astype(out_ref.dtype)

    (y,) = matvecs(o_of, (lambda ks: w_ref[layer, ks, h, ns],), C, block_k, block_n, rows)
    plgpu.store(out_ref.at[bs, h, ns], y.astype(out_ref.dtype), mask=rows_masked(valid, y.shape))


@functools.partial(jax.jit, static_argnames=("dtype", "rows", "block_k", "block_n", "num_warps", "num_stages",
                                             "interpret"))
def latent_output(o, m, l, w_uv, layer, *, dtype, rows: int = 1, block_k: int = 256, block_n: int = 32,
                  num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None):
    """The absorbed path after the attention, in one kernel: `combine_spans` of `latent_attention_spans`' output
    (rounded to dtype), times W_UV: layer `layer` of the v_b_proj stack w_uv [L, C, H, V], read by the kernel.
    Returns [B, H, V] in dtype. Replaces XLA's combine, its rounding and the per-head product.
    rows: rows a program, 1 or 16 (one tensor-core tile: W_UV read once for 16 rows, not for each)."""
    B, S, H, C = o.shape
    V = w_uv.shape[3]
    if w_uv.shape[1:3] != (C, H) or not tiles_fit(C, V) or rows not in (1, TILE):
        raise ValueError(f"latent_output: spans {o.shape} against W_UV {w_uv.shape} (widths multiples of {TILE}), "
                         f"{rows} rows a program (1 or {TILE})")
    block_k, block_n = decode_block(block_k, C), decode_block(block_n, V)
    layer, at = layer_operand(layer)
    return pl.pallas_call(
        functools.partial(_latent_output_kernel, rows=rows, block_k=block_k, block_n=block_n, at=at),
        out_shape=jax.ShapeDtypeStruct((B, H, V), dtype),
        grid=(-(-B // rows), H, V // block_n),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=pl.no_block_spec,
        name="latent_output",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpreted(interpret),
    )(layer, o, m, l, w_uv)


def absorbed_query_fits(config: ModelConfig) -> bool:
    """Whether `absorbed_query` takes this model's widths (the nope and latent widths powers of two of at least 16
    and a power-of-two rope width: the kernel's tiles)."""
    c = config
    return (all(map(power_of_two, (c.qk_nope_head_dim, c.kv_lora_rank, c.qk_rope_head_dim)))
            and c.qk_nope_head_dim >= TILE and c.kv_lora_rank >= TILE and c.qk_rope_head_dim >= 2)


def _absorbed_query_kernel(weights_ref, layer_ref, pos_ref, q_ref, kv_ref, k_b_ref, norm_ref, cos_ref, sin_ref,
                           c_in, k_in, q_lat_ref, q_pe_ref, c_ref, k_pe_ref, *, rows, q_at, kv_at, nope, block_c, eps,
                           weights_at, cache_at):
    """Program (r, h, j), h < H: latents j·block_c.. of head h's query with W_UK folded in, for rows r·rows ..
    (rows 1 or 16: one tensor-core tile; one row is broadcast to its 16 rows, rows past the batch are masked), j = 0
    also their roped q_pe; h = H + i: block j of row r·rows + i's normalised latent (j = 0 also the roped k_pe)
    written into the cache at slot pos[row]. (The latent's programs apart from the heads': no program waits on
    both.)"""
    del c_in, k_in  # aliased to c_ref, k_pe_ref
    r, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    weights, layer = kernel_layer(weights_ref, weights_at), kernel_layer(layer_ref, cache_at)
    dt, f32 = q_lat_ref.dtype, jnp.float32
    B, heads, rope, latent = q_lat_ref.shape[0], q_lat_ref.shape[1], q_pe_ref.shape[2], c_ref.shape[3]
    half, cs = rope // 2, pl.ds(j * block_c, block_c)
    bs, valid = row_block(r, rows, B)

    def product(ref, b, start, size, stride=1):  # the partials summed and rounded to dt, as the XLA path rounds them
        return ref[:, b, pl.ds(start, size, stride)].sum(axis=0).astype(dt).astype(f32)

    def rotated(ref, b, start, out, index):  # RoPE on interleaved pairs of row b, in float32
        x0, x1 = product(ref, b, start, half, 2), product(ref, b, start + 1, half, 2)
        cos, sin = cos_ref[b, :], sin_ref[b, :]
        out[index(pl.ds(0, half, 2))] = (x0 * cos - x1 * sin).astype(out.dtype)
        out[index(pl.ds(1, half, 2))] = (x0 * sin + x1 * cos).astype(out.dtype)

    @pl.when(h < heads)
    def _():
        start = q_at + h * (nope + rope)
        q_nope = product(q_ref, bs, start, nope).astype(dt)  # [(rows,) nope]: the partials hold whole blocks
        q_nope = jnp.broadcast_to(q_nope, (TILE, nope)) if rows == 1 else q_nope
        w_uk = k_b_ref[weights, cs, h, :]  # [block_c, nope]
        q_lat = jax.lax.dot_general(q_nope, w_uk.astype(dt), (((1,), (1,)), ((), ())),
                                    precision=dot_precision(dt), preferred_element_type=f32)
        q_lat = q_lat.max(axis=0) if rows == 1 else q_lat  # one row: the 16 equal rows
        plgpu.store(q_lat_ref.at[bs, h, cs], q_lat.astype(dt), mask=rows_masked(valid, q_lat.shape))

        @pl.when(j == 0)
        def _():
            if rows == 1:
                rotated(q_ref, r, start + nope, q_pe_ref, lambda ds: (r, h, ds))
                return

            def row(i, carry):  # each row of the block that is in the batch
                b = r * rows + i
                pl.when(b < B)(lambda: rotated(q_ref, b, start + nope, q_pe_ref, lambda ds: (b, h, ds)))
                return carry

            jax.lax.fori_loop(0, rows, row, 0)

    @pl.when((h >= heads) if valid is None else (h >= heads) & (r * rows + h - heads < B))
    def _():
        b = r * rows + h - heads
        pos = pos_ref[b]
        kv = product(kv_ref, b, kv_at, latent)
        scale = jax.lax.rsqrt((kv * kv).sum() / latent + eps)
        c_ref[layer, b, pos, cs] = (product(kv_ref, b, kv_at + j * block_c, block_c) * scale).astype(dt) \
            * norm_ref[weights, cs].astype(dt)

        @pl.when(j == 0)
        def _():
            rotated(kv_ref, b, kv_at + latent, k_pe_ref, lambda ds: (layer, b, pos, ds))


@functools.partial(jax.jit, static_argnames=("q_at", "kv_at", "eps", "cache_offset", "rows", "block_c", "num_warps",
                                             "interpret"))
def absorbed_query(q_parts, kv_parts, k_b, kv_norm, cos, sin, c_kv, k_pe, weights_layer, cache_layer, pos, *,
                   q_at: int, kv_at: int, eps: float, cache_offset: int = 0, rows: int = 1, block_c: int = 64,
                   num_warps: int = 2, interpret: bool | None = None):
    """Decoding's attention inputs in one kernel, from the float32 partial products of `stacked_partials`:
    the query with W_UK folded in and the roped q_pe, and the normalised latent and roped k_pe of the new token
    written into the cache. Replaces XLA's partial sums, the latent's RMSNorm, both RoPEs, the W_UK product and
    the two cache updates of a step.

    q_parts [S, R, *] holds each row's query product (heads side by side, each [nope | rope]) at columns q_at..,
    kv_parts [S', R, *] its kv_a product [latent | rope] at kv_at.. (R >= B rows, a multiple of `rows`; the two may
    be one array). k_b [L', C, H, nope] and kv_norm [L', C]: the stacks, read at weights_layer; cos, sin
    [B, rope / 2] float32; c_kv [L, B, T, C], k_pe [L, B, T, rope]: the cache (aliased: updated in place inside a
    jitted step) at layer cache_layer + cache_offset (static; `LatentCache.offset`), slot pos[b].
    rows: rows a program of the query's heads, 1 or 16 (W_UK read once for 16 rows, not for each).
    Returns (q_lat [B, H, C], q_pe [B, H, rope] in the cache's dtype, c_kv, k_pe).
    """
    L, B, T, C = c_kv.shape
    H, nope, rope = k_b.shape[2], k_b.shape[3], k_pe.shape[3]
    if (k_b.shape[1] != C or kv_norm.shape[1:] != (C,) or cos.shape != (B, rope // 2) or pos.shape != (B,)
            or q_parts.shape[1] < -(-B // rows) * rows or kv_parts.shape[1] < B or rows not in (1, TILE)):
        raise ValueError(f"absorbed_query: W_UK {k_b.shape}, norm {kv_norm.shape}, cos {cos.shape}, positions "
                         f"{pos.shape} against a cache {c_kv.shape} and partials {q_parts.shape}, {kv_parts.shape} "
                         f"({rows} rows a program: 1 or {TILE}, the query's partials in whole blocks of them)")
    block_c = decode_block(block_c, C)
    dt = c_kv.dtype
    weights_layer, weights_at = layer_operand(weights_layer)
    cache_layer, cache_at = layer_operand(cache_layer, cache_offset)
    return pl.pallas_call(
        functools.partial(_absorbed_query_kernel, rows=rows, q_at=q_at, kv_at=kv_at, nope=nope, block_c=block_c,
                          eps=eps, weights_at=weights_at, cache_at=cache_at),
        out_shape=[jax.ShapeDtypeStruct((B, H, C), dt), jax.ShapeDtypeStruct((B, H, rope), dt),
                   jax.ShapeDtypeStruct(c_kv.shape, dt), jax.ShapeDtypeStruct(k_pe.shape, k_pe.dtype)],
        grid=(-(-B // rows), H + rows, C // block_c),
        in_specs=[pl.no_block_spec] * 11,
        out_specs=[pl.no_block_spec] * 4,
        input_output_aliases={9: 2, 10: 3},
        name="absorbed_query",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpreted(interpret),
    )(weights_layer, cache_layer, pos.astype(jnp.int32), q_parts, kv_parts, k_b, kv_norm,
      cos.astype(jnp.float32), sin.astype(jnp.float32), c_kv, k_pe)
