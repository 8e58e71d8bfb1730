"""Generation with the latent KV cache: chunked expanded prefill, absorbed decode, sampling.

The cache holds, per layer and token, only what MLA needs to attend later: the normalised latent c_kv
[kv_lora_rank] and the roped decoupled key k_pe [qk_rope_head_dim], stacked over all layers in model order,
plus the number of tokens each row holds. Prompts are left-aligned: row b's token i sits in slot i and has
position i, so the slot of a token is its position.

- Prefill runs the expanded path (keys/values expanded per head) over the cache and the current chunk of
  prompt tokens; long prompts go in fixed-size chunks, so activation memory is bounded by chunk × cache length.
- Decode runs the absorbed path (MLA.absorbed): attention scores against c_kv directly, keys and values are never
  expanded. Many tokens are decoded in one jitted `lax.while_loop`; a streaming caller runs the same compiled loop
  one token at a time.
- Both jitted programs are compiled once per shape bucket (batch, chunk, cache length, output length); the cache
  is donated, so it is updated in place.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from .attention import LatentCache, PartialSums, ProjectionStacks, latent_attention_fits
from .config import ModelConfig
from .grouped_matmul import (LayerIndex, arrival_counts, stacked_matvec, stacked_partials, tiles_fit,
                             use_stacked_matvec)
from .layers import rms_norm_rows, rms_norm_rows_fits, rms_norm_rows_takes_router
from .model import layer_runs, split_layers
from .moe import ExpertStacks, adds_decoded, steps_on_chosen_experts
from .rope import rope_cos_sin
from .sharding import (activation_mesh, batch_shards, constrain, current_mesh, logical_to_spec, param_sharding,
                       xla_flag)


class KVCache(NamedTuple):
    """The latent KV cache; layers in model order, rows left-aligned (slot i holds position i)."""

    c_kv: jax.Array  # [L, B, T, kv_lora_rank]: normalised latent
    k_pe: jax.Array  # [L, B, T, qk_rope_head_dim]: roped decoupled key, shared by all heads
    lengths: jax.Array  # [B] int32: tokens held by each row


CACHE_AXES = KVCache(("layers", "batch", "seq", "kv_lora"), ("layers", "batch", "seq", "head_dim"), ("batch",))


def cache_shardings(mesh) -> KVCache:
    """The NamedSharding of each cache array on `mesh`: split over batch (rows)."""
    return KVCache(*(NamedSharding(mesh, logical_to_spec(axes)) for axes in CACHE_AXES))


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16, mesh=None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens; with a mesh, created in its sharding."""
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"init_cache: {name} must be a positive integer, got {value!r}")
    L, B, T = config.num_hidden_layers, int(batch_size), int(max_len)

    def make():
        return KVCache(jnp.zeros((L, B, T, config.kv_lora_rank), dtype),
                       jnp.zeros((L, B, T, config.qk_rope_head_dim), dtype),
                       jnp.zeros((B,), jnp.int32))

    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=cache_shardings(mesh))()


def cache_bytes_per_token(cache: KVCache) -> int:
    """Bytes the cache spends on one token of one row in one layer, measured on its arrays."""
    L, B, T = cache.c_kv.shape[:3]
    return (cache.c_kv.nbytes + cache.k_pe.nbytes) // (L * B * T)


# ---------------------------------------------------------------------------------------------- the cached forward
# Decoding on the kernels: the layers of a run go this many to an iteration of its loop (the rest one at a time), each
# kernel taking the loop's counter as it is (`LayerIndex`). Each iteration costs a CUDA-graph launch's boundary
# (~1.5 µs idle) and the counter's increment (a kernel, ~1.3 µs): V2-Lite's 26 MoE layers in 2 iterations instead of
# 26 ran its batch-1 step ~3% faster, in 13 iterations ~1.5% (H200, bench/RESULTS.md §22). Fully unrolled, the host
# launches the whole step's graph after each token's condition and the GPU waits for it.
DECODE_LAYERS_PER_ITERATION = 13
# Decoding on the kernels, with the router's product in the post-attention norm's kernel: in steps of at most this many
# tokens, a MoE layer's routing, experts and residual add take two kernels (MoE.add_decoded) instead of four
# (route_kernel, the experts' two, XLA's add). V2-Lite, H200: batch 1 1.3-3% faster (236 kernels a step against 287),
# batch 2 2.5%; batch 4 the same, batch 8-16 0.7-2.5% slower, where every program of the gate/up kernel (16 × 66 at
# batch 16) takes its token's routing itself (bench/RESULTS.md §23).
DECODE_MOE_TWO_KERNEL_TOKENS = 2


def _index_value(i):
    """A layer index (an int, an int32 scalar or a `LayerIndex`) as a value for XLA."""
    return i.value() if isinstance(i, LayerIndex) else i


def _run_layers(model, x, c_kv, k_pe, attend, decoding: bool = False):
    """All decoder layers in model order over x [B, S, D], threading the cache arrays through the scans.

    attend(attn, h, layer, offset, c_kv, k_pe, projections) -> (attention output, c_kv, k_pe) writes the layer's
    new latent into the cache at layer `layer` + `offset` and attends over it: `layer` the layer's index in its
    stack (the loop counter), `offset` a static int (see `LatentCache`). The output may be o_proj's `PartialSums`,
    which the post-attention norm's kernel adds to the residual itself (XLA would take a kernel for the add). h is
    the normalised input or, where `projections` carry the input norm (`ProjectionStacks.input_norm`), the
    residual itself, for attend's first kernel to normalise. `layer` may be a `LayerIndex` (decoding on the kernels,
    DECODE_LAYERS_PER_ITERATION layers an iteration; `_index_value` gives it to XLA).
    decoding: the MoE layers may take their decoding kernels (MoE.__call__), which read each layer's experts out
    of the whole stacks; on one device with few tokens (grouped_matmul.use_stacked_matvec) the attention
    projections and routers run on `stacked_matvec` the same way (`projections`: the layer's ProjectionStacks, else
    None), as do the dense layers' down products, decoding's attention over the latents on
    `attention.latent_attention`, and the two norms on `rms_norm_rows` (the post-attention one with the MoE router's
    product, after which the MoE layer's routing, experts and residual add take two kernels, `MoE.add_decoded`,
    whose counters the layer loops carry).
    """
    B, S = x.shape[:2]
    c = model.config
    matvec = decoding and current_mesh() is None and use_stacked_matvec(B * S)
    first, counts = 0, None
    for kind, start, count in layer_runs(c):
        stack = model.moe_layers if kind == "moe" else model.dense_layers
        graphdef, state = split_layers(stack, start, count)
        experts = ExpertStacks.of(stack.mlp, router=matvec) if decoding and kind == "moe" else None
        projections = ProjectionStacks.of(stack.attn) if matvec else None
        # the norms' stacked weights, for rms_norm_rows (one kernel per norm where XLA runs two), and the MoE router's
        # stack where the post-attention norm's kernel takes its product too
        norms = ((stack.input_norm, stack.post_attention_norm) if matvec and rms_norm_rows_fits(x.shape[-1])
                 else None)
        router = (experts.router if norms is not None and experts is not None and experts.router is not None
                  # where the router would run on stacked_matvec otherwise, ahead of the chosen-experts kernels
                  and tiles_fit(c.num_experts) and rms_norm_rows_takes_router(x.shape[-1], c.num_experts)
                  and steps_on_chosen_experts(c, B * S, x.shape[-1]) else None)
        # with the router's product in the norm's kernel, the MoE layer's routing, experts and residual add take two
        # kernels (MoE.add_decoded), which carry counters from layer to layer
        adds = (B * S <= DECODE_MOE_TWO_KERNEL_TOKENS and router is not None
                and adds_decoded(c, B * S, x.shape[-1]))
        if adds and counts is None:
            counts = arrival_counts(B * S, x.shape[-1])

        # a dense layer's down_proj stack in the compute dtype, for stacked_matvec (XLA pads 10,944 rows every step)
        dense_down = (stack.mlp.down_proj[...] if matvec and kind == "dense"
                      and stack.mlp.down_proj[...].dtype == stack.mlp.dtype else None)

        def body(i, carry, graphdef=graphdef, state=state, experts=experts, projections=projections, norms=norms,
                 router=router, dense_down=dense_down, first=first, start=start, adds=adds):
            """One layer, i its index in this run: the loop counter, or a `LayerIndex` of it for the kernels."""
            h, c_kv, k_pe, counts = carry
            # the layer index is the loop counter: scanning over index arrays would slice them (copies), and a second
            # index for the cache (first + i) would make XLA copy the counter every iteration (LatentCache.offset)
            stack_index = i.plus(start) if isinstance(i, LayerIndex) else start + i
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[_index_value(i)], state))

            def norm(which: int, h, router=None, added=None):
                if norms is None:
                    return (layer.input_norm, layer.post_attention_norm)[which](h)
                n = norms[which]
                return rms_norm_rows(h, n.weight[...], stack_index, router, added, eps=n.eps, dtype=n.dtype)

            here = None if projections is None else projections._replace(layer=stack_index)
            if here is not None and norms is not None and B * S == 1 and norms[0].dtype == layer.attn.dtype:
                # one token: the input norm goes to the attention's first kernel, which normalises the row itself
                # (one kernel fewer per layer; attend normalises it where that kernel does not run)
                here = here._replace(input_norm=norms[0].weight[...])
                a, c_kv, k_pe = attend(layer.attn, h, stack_index, first - start, c_kv, k_pe, here)
            else:
                a, c_kv, k_pe = attend(layer.attn, norm(0, h), stack_index, first - start, c_kv, k_pe, here)
            # one token: o_proj's (4) partial sums added to the residual in the norm's kernel, which saves XLA's add
            # kernel (H200, V2-Lite: 2.14 -> 2.12 ms per step); 16 tokens (8 partials of 16 rows, read by each of
            # the kernel's 256 programs) ran slower (RESULTS §12)
            fused = (isinstance(a, PartialSums) and norms is not None and h.dtype == layer.attn.dtype
                     and B * S == 1)
            if fused:  # the kernel returns the new residual last
                *normed, h = norm(1, h, router, a.sums)
            else:
                h = h + (a.total(h.shape, layer.attn.dtype) if isinstance(a, PartialSums) else a)
                normed = norm(1, h, router)
                normed = normed if router is not None else (normed,)
            # with a router, its product comes from the norm's kernel too
            h_norm, router_partials = normed if router is not None else (normed[0], None)
            layer_experts = None if experts is None else experts._replace(layer=stack_index)
            if adds:
                h, counts, _ = layer.mlp.add_decoded(h_norm, h, router_partials, counts, stacks=layer_experts)
            else:
                if layer.is_moe:
                    y = layer.mlp(h_norm, decoding=decoding, router_partials=router_partials,
                                  stacks=layer_experts)[0]
                else:
                    y = layer.mlp(h_norm, stacks=None if dense_down is None else (None, None, dense_down, stack_index))
                h = constrain(h + y, ("batch", "seq", "embed"))
            return h, constrain(c_kv, CACHE_AXES.c_kv), constrain(k_pe, CACHE_AXES.k_pe), counts

        per = DECODE_LAYERS_PER_ITERATION if matvec else 1
        carry, done = (x, c_kv, k_pe, counts), 0
        if per > 1 and count >= per:
            def layers(c, carry, body=body, per=per):
                for k in range(per):
                    carry = body(LayerIndex(c, per, k), carry)
                return carry

            carry = jax.lax.fori_loop(0, count // per, layers, carry)
            done = count - count % per
        if done < count:  # the rest one at a time
            carry = jax.lax.fori_loop(done, count, body, carry)
        x, c_kv, k_pe, counts = carry
        first += count
    return x, c_kv, k_pe


def _layer_slice(a, li):
    return jax.lax.dynamic_index_in_dim(a, li, axis=0, keepdims=False)


def prefill_chunk_forward(model, cache: KVCache, tokens, start, prompt_lens, last_logits, window: int | None = None):
    """Expanded-path forward of the chunk tokens [B, C] at slots [start, start + C), written into the cache.

    window (static, >= start + C): attend over cache slots [0, window) only, default the whole cache; keys and
    values are expanded for the window, so a short prompt in a long cache costs no more than in a short one.
    Returns the cache and the logits of each row's last prompt token where it falls in this chunk
    (last_logits [B, V] elsewhere).
    """
    B, C = tokens.shape
    W = cache.c_kv.shape[2] if window is None else window
    slots = start + jnp.arange(C, dtype=jnp.int32)
    cos, sin = rope_cos_sin(model.config, jnp.broadcast_to(slots, (B, C)))
    mask = (jnp.arange(W)[None, :] <= slots[:, None])[None]  # [1, C, W]: causal over slots

    def attend(attn, h, layer, offset, c_kv_all, k_pe_all, projections):
        li = layer + offset
        q_nope, q_pe = attn.query(h, cos, sin)
        c_kv, k_pe = attn.latent(h, cos, sin)
        c_kv_all = jax.lax.dynamic_update_slice(c_kv_all, c_kv[None].astype(c_kv_all.dtype), (li, 0, start, 0))
        k_pe_all = jax.lax.dynamic_update_slice(k_pe_all, k_pe[None].astype(k_pe_all.dtype), (li, 0, start, 0))
        keys_c = _layer_slice(c_kv_all, li)[:, :W].astype(attn.dtype)
        keys_pe = _layer_slice(k_pe_all, li)[:, :W].astype(attn.dtype)
        return attn.expanded(q_nope, q_pe, keys_c, keys_pe, mask), c_kv_all, k_pe_all

    x = constrain(model.embed_tokens(tokens), ("batch", "seq", "embed"))
    x, c_kv, k_pe = _run_layers(model, x, cache.c_kv, cache.k_pe, attend)
    last = prompt_lens - 1 - start
    in_chunk = (last >= 0) & (last < C)
    h = jnp.take_along_axis(x, jnp.clip(last, 0, C - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.head(h)[:, 0]
    last_logits = jnp.where(in_chunk[:, None], logits, last_logits)
    lengths = jnp.minimum(prompt_lens, start + C).astype(jnp.int32)
    return KVCache(c_kv, k_pe, lengths), last_logits


def _write_slot(cache, li, pos, new):
    """cache [L, B, T, n] with new [B, 1, n] written at layer li, slot pos[b] of each row b. In bounds: generate
    sizes the cache for every token it feeds (XLA then skips the bounds checks; one row is one in-place update)."""
    new = new[:, 0].astype(cache.dtype)
    if cache.shape[1] == 1:
        return jax.lax.dynamic_update_slice(cache, new[None, :, None], (li, 0, pos[0], 0))
    return cache.at[li, jnp.arange(cache.shape[1]), pos].set(new, mode="promise_in_bounds")


def decode_forward(model, cache: KVCache, tokens):
    """Absorbed-path forward of one new token per row (tokens [B]) at slot cache.lengths: (cache, logits [B, V]).
    Every row needs room for the token (cache.lengths < max_len, as `generate` sizes the cache)."""
    T = cache.c_kv.shape[2]
    pos = cache.lengths
    cos, sin = rope_cos_sin(model.config, pos[:, None])
    mask = jnp.arange(T)[None, None, :] <= pos[:, None, None]  # [B, 1, T]: the row's tokens and the new one

    def attend(attn, h, layer, offset, c_kv_all, k_pe_all, projections):
        kernels = (projections is not None and latent_attention_fits(model.config, T)
                   and c_kv_all.dtype == attn.dtype)
        if kernels:  # the kernels read the layer out of the whole cache
            cache = LatentCache(c_kv_all, k_pe_all, layer, pos, offset)
            inputs = attn.absorbed_inputs(h, cos, sin, projections, cache)
            if inputs is not None:
                q_lat, q_pe, cache = inputs
                return attn.attend_latent(q_lat, q_pe, projections, cache, sums=True), cache.c_kv, cache.k_pe
        h, projections = attn.input_normalised(h, projections)  # where h came unnormalised
        li = _index_value(layer) + offset
        products = None if projections is None else attn.input_products(h, projections)
        q_nope, q_pe = attn.query(h, cos, sin, projections, products)
        c_kv, k_pe = attn.latent(h, cos, sin, projections, products)
        c_kv_all, k_pe_all = (_write_slot(a, li, pos, new) for a, new in ((c_kv_all, c_kv), (k_pe_all, k_pe)))
        if kernels:
            cache = cache.replace(c_kv=c_kv_all, k_pe=k_pe_all)
            return attn.absorbed(q_nope, q_pe, None, None, None, projections, cache), c_kv_all, k_pe_all
        keys_c = _layer_slice(c_kv_all, li).astype(attn.dtype)
        keys_pe = _layer_slice(k_pe_all, li).astype(attn.dtype)
        return attn.absorbed(q_nope, q_pe, keys_c, keys_pe, mask, projections), c_kv_all, k_pe_all

    x = constrain(model.embed_tokens(tokens[:, None]), ("batch", "seq", "embed"))
    x, c_kv, k_pe = _run_layers(model, x, cache.c_kv, cache.k_pe, attend, decoding=True)
    return KVCache(c_kv, k_pe, pos + 1), decode_head(model, x)


def xla_gemm_fusions_off(environ=None) -> bool:
    """Whether XLA_FLAGS turns XLA's Triton GEMM fusions off (`--xla_gpu_enable_triton_gemm=false` or `=0`; the
    flag's last setting counts). The training step's own compiler option of that name (`training.
    TRAINING_COMPILER_OPTIONS`) applies to its compilation only, not to the decoding programs."""
    return (xla_flag("xla_gpu_enable_triton_gemm", environ) or "true").lower() in ("false", "0")


def decode_head(model, x):
    """Logits [B, V] float32 of a decoding step's residual x [B, 1, D]: `model.head`, except for one token on one
    device with the projections on `stacked_matvec` (use_stacked_matvec) while XLA_FLAGS turns XLA's Triton GEMM
    fusions off (`xla_gemm_fusions_off`): there the final norm and the head's product take one `stacked_partials`
    kernel (the norm in XLA first where the width is not a power of two), which reads the head as it is stored.

    XLA runs the product of a bf16 row by the bf16 head into float32 as a Triton GEMM fusion. Without those fusions
    it converts the whole head to float32 every step and multiplies on cuBLAS (H200, V2-Lite's 0.42 GB head: 105 µs
    as a fusion, 525 µs without, this kernel 106 µs either way; a batch-1 step 2.53 ms without the fusions, 2.10 ms
    with this kernel, 1.97 ms with XLA's defaults). With the fusions on, XLA's product stays: with the kernel in
    its place the step took 0.07 ms longer, idle at the step's start (bench/RESULTS.md §38). A tied head (the
    embedding transposed) or one stored in another type than the compute type stays on XLA."""
    B, _, D = x.shape
    head, norm = model.lm_head, model.norm
    on_kernel = (B == 1 and current_mesh() is None and use_stacked_matvec(1) and xla_gemm_fusions_off()
                 and head is not None and head[...].dtype == model.dtype == norm.dtype
                 and tiles_fit(D, head[...].shape[1]))
    if not on_kernel:
        return model.head(x)[:, 0]
    if rms_norm_rows_fits(D):
        return stacked_partials(x[:, 0], head[...], None, norm.weight[...], eps=norm.eps,
                                dtype=norm.dtype).sum(axis=0)
    return stacked_matvec(norm(x[:, 0]), head[...])


# ---------------------------------------------------------------------------------------------- sampling
class Sampler(NamedTuple):
    """Static sampling settings (part of the decode program's compile key)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos: tuple[int, ...] = ()
    pad: int = 0


def check_sampling(temperature, top_k, top_p, vocab_size: int) -> None:
    """Python or NumPy numbers (not bools) in range, or a clear error naming the setting."""
    real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))  # noqa: E731
    if not real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, (bool, np.bool_))
                              or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an integer in [1, vocab_size={vocab_size}] or None, got {top_k!r}")
    if top_p is not None and (not real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def sample_logits(logits, keys, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """One token per row of logits [B, V] (float32), row b drawn with keys[b]. int32 [B].

    temperature 0: argmax. Otherwise softmax(logits / temperature) restricted to the top_k highest logits and
    then to the smallest set of highest-probability tokens whose mass reaches top_p (counted in order of
    probability, ties by token id, as transformers' TopPLogitsWarper counts them: of tied tokens at the cut,
    only as many as the mass needs are kept).
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        kept_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before a token is short of top_p
        rows = jnp.arange(logits.shape[0])[:, None]
        kept = jnp.zeros(logits.shape, bool).at[rows, order].set(kept_sorted)
        logits = jnp.where(kept, logits, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def row_keys(key, step, batch_size: int):
    """The key of each row at one step: independent of batch padding and of how the batch is sharded."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(batch_size))


# ---------------------------------------------------------------------------------------------- jitted programs
@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "window"), donate_argnames=("cache", "last_logits"))
def _prefill_chunk(graphdef, state, cache, tokens, start, prompt_lens, last_logits, *, mesh=None, window=None):
    with activation_mesh(mesh):
        model = nnx.merge(graphdef, state)
        return prefill_chunk_forward(model, cache, tokens, start, prompt_lens, last_logits, window)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"), donate_argnames=("cache",))
def _decode_step(graphdef, state, cache, tokens, *, mesh=None):
    with activation_mesh(mesh):
        return decode_forward(nnx.merge(graphdef, state), cache, tokens)


class DecodeState(NamedTuple):
    cache: KVCache
    logits: jax.Array  # [B, V] float32: logits of the next token
    done: jax.Array  # [B] bool: row has emitted EOS (or is padding)
    out: jax.Array  # [B, N] int32: emitted tokens
    step: jax.Array  # int32: tokens emitted so far


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "sampler"), donate_argnames=("carry",))
def _decode_loop(graphdef, state, carry: DecodeState, limit, key, *, mesh=None, sampler: Sampler = Sampler()):
    """Emits tokens until step == limit or every row is done; each emitted token is fed back (absorbed path)."""
    with activation_mesh(mesh):
        model = nnx.merge(graphdef, state)
        B = carry.done.shape[0]

        def cond(c):
            return (c.step < limit) & ~jnp.all(c.done)

        def body(c):
            keys = row_keys(key, c.step, B)
            tok = sample_logits(c.logits, keys, sampler.temperature, sampler.top_k, sampler.top_p)
            tok = jnp.where(c.done, sampler.pad, tok)
            out = c.out.at[:, c.step].set(tok)
            done = c.done | jnp.isin(tok, jnp.asarray(sampler.eos, jnp.int32)) if sampler.eos else c.done
            cache, logits = decode_forward(model, c.cache, tok)
            return DecodeState(cache, logits, done, out, c.step + 1)

        return jax.lax.while_loop(cond, body, carry)


# ---------------------------------------------------------------------------------------------- host-side API
def _bucket(n: int, minimum: int = 16) -> int:
    """Shape bucket: the next power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


def _split(model, mesh):
    graphdef, state = nnx.split(model)
    if mesh is not None:
        def sharding(v):
            if "axes" in v.get_metadata():
                return param_sharding(mesh, v)
            return NamedSharding(mesh, PartitionSpec())

        shardings = jax.tree.map(sharding, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        state = jax.device_put(state, shardings)
    return graphdef, state


def _placement(state, mesh):
    """Where the program's inputs go: the mesh, or the device holding the parameters."""
    return mesh if mesh is not None else jax.tree.leaves(state)[0].sharding


def _put(x, where, axes):
    """x placed, and committed, like the jitted programs' outputs: by logical axes on a mesh, else on the
    parameters' device. Inputs that are always committed keep one compiled program per shape bucket."""
    if isinstance(where, jax.sharding.Mesh):
        where = NamedSharding(where, logical_to_spec(axes))
    return jax.device_put(jnp.asarray(x), where)


def _put_cache(cache: KVCache, where) -> KVCache:
    return KVCache(*(_put(a, where, axes) for a, axes in zip(cache, CACHE_AXES)))


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints in [0, vocab_size); a clear error for an empty batch, empty prompt or bad id."""
    if isinstance(prompts, np.ndarray) or isinstance(prompts, jax.Array):
        prompts = list(np.asarray(prompts)) if np.ndim(prompts) == 2 else prompts  # rows of equal length
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"prompt {i} must be a flat list of integer token ids")
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} holds token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
        out.append([int(t) for t in ids])
    return out


def _check_lengths(config: ModelConfig, longest: int, max_new_tokens, max_len) -> int:
    """Validates lengths; returns the cache length to allocate."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    need = longest + int(max_new_tokens)
    limit = config.max_position_embeddings
    if need > limit:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds "
                         f"the model's max_position_embeddings ({limit})")
    if max_len is None:
        return min(_bucket(need), limit)
    if need > max_len:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds "
                         f"the cache size max_len={max_len}")
    return int(max_len)


def prefill(model, cache: KVCache, prompts, chunk_size: int = 256, mesh=None, _split_model=None):
    """Fills `cache` (donated) with left-aligned prompts, chunk by chunk on the expanded path.

    prompts: one list of token ids per cache row (len(prompts) == batch size of the cache).
    Returns (cache, logits [B, V] float32 of each row's last prompt token).
    """
    config = model.config
    prompts = check_prompts(prompts, config.vocab_size)
    B, T = cache.c_kv.shape[1], cache.c_kv.shape[2]
    if len(prompts) != B:
        raise ValueError(f"{len(prompts)} prompts for a cache of {B} rows")
    lens = np.array([len(p) for p in prompts], np.int32)
    if lens.max() > T:
        raise ValueError(f"a prompt of {lens.max()} tokens does not fit the cache (max_len {T})")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    C = min(int(chunk_size), _bucket(lens.max(), 8), T)
    # The last chunk is moved back so it ends within the cache; recomputing a few cached slots is harmless.
    starts = [min(k * C, T - C) for k in range(-(-int(lens.max()) // C))]
    tokens = np.zeros((B, starts[-1] + C), np.int32)
    window = min(T, _bucket(starts[-1] + C))  # keys attended: the prompt region, in power-of-two buckets
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    graphdef, state = _split_model or _split(model, mesh)
    where = _placement(state, mesh)
    cache = _put_cache(cache, where)
    lens_dev = _put(lens, where, ("batch",))
    last = _put(jnp.zeros((B, config.vocab_size), jnp.float32), where, ("batch", "vocab"))
    for s in starts:
        chunk = _put(tokens[:, s:s + C], where, ("batch", "seq"))
        cache, last = _prefill_chunk(graphdef, state, cache, chunk, jnp.int32(s), lens_dev, last, mesh=mesh,
                                     window=window)
    return cache, last


def decode_step(model, cache: KVCache, tokens, mesh=None):
    """One absorbed-path step: feeds tokens [B] at each row's next slot. Returns (cache, logits [B, V]).
    A row whose cache is full is an error (the step would have no slot to write)."""
    full = np.flatnonzero(np.asarray(cache.lengths) >= cache.c_kv.shape[2])
    if full.size:
        raise ValueError(f"decode_step: row(s) {full.tolist()} already hold {cache.c_kv.shape[2]} tokens, the cache's "
                         "max_len: no slot left for the next token")
    graphdef, state = _split(model, mesh)
    where = _placement(state, mesh)
    tokens = _put(jnp.asarray(tokens, jnp.int32), where, ("batch",))
    return _decode_step(graphdef, state, _put_cache(cache, where), tokens, mesh=mesh)


def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_token_id: int | Sequence[int] | None = None, mesh=None,
             *, max_len: int | None = None, chunk_size: int = 256, cache_dtype=None,
             on_tokens: Callable[[list[list[int]]], None] | None = None, timings: dict | None = None
             ) -> list[list[int]]:
    """New tokens for each prompt (lists of token ids, any lengths), decoded with the latent KV cache.

    Greedy when temperature is 0; otherwise sampling seeded by `seed` (optionally top-k / top-p). A row stops after
    it emits a token of eos_token_id (kept in its output); None never stops early.
    mesh: run sharded (params as in training, batch over data × fsdp × expert, heads over tensor).
    max_len: cache length (default: a power-of-two bucket of longest prompt + max_new_tokens);
    chunk_size: prefill chunk length; cache_dtype: default the model's compute dtype.
    on_tokens: called after each step with the tokens each prompt got in it (an empty list once a row is done);
    decoding then runs one token per call of the same compiled loop.
    timings: a dict to fill with prefill/decode seconds and token counts.
    """
    config = model.config
    prompts = check_prompts(prompts, config.vocab_size)
    check_sampling(temperature, top_k, top_p, config.vocab_size)
    lens = [len(p) for p in prompts]
    T = _check_lengths(config, max(lens), max_new_tokens, max_len)
    if eos_token_id is None:
        eos = ()
    else:
        eos = (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(map(int, eos_token_id))
    n = len(prompts)
    shards = batch_shards(mesh)
    B = -(-n // shards) * shards
    rows = prompts + [[0]] * (B - n)  # padding rows: one token, born done

    split_model = _split(model, mesh)
    graphdef, state = split_model
    t0 = time.perf_counter()
    cache = init_cache(config, B, T, cache_dtype or model.dtype, mesh)
    cache, logits = prefill(model, cache, rows, chunk_size, mesh, _split_model=split_model)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()

    N = _bucket(max_new_tokens)
    where = _placement(state, mesh)
    done = _put(np.arange(B) >= n, where, ("batch",))
    out = _put(jnp.zeros((B, N), jnp.int32), where, ("batch", "seq"))
    carry = DecodeState(cache, logits, done, out, _put(jnp.int32(0), where, ()))
    sampler = Sampler(float(temperature), None if top_k is None else int(top_k), None if top_p is None else
                      float(top_p), eos, 0)
    key = jax.random.key(seed)
    if on_tokens is None:
        carry = _decode_loop(graphdef, state, carry, jnp.int32(max_new_tokens), key, mesh=mesh, sampler=sampler)
    else:
        finished = np.zeros(n, bool)
        for step in range(max_new_tokens):
            carry = _decode_loop(graphdef, state, carry, jnp.int32(step + 1), key, mesh=mesh, sampler=sampler)
            if int(carry.step) == step:  # every row was already done
                break
            toks = np.asarray(carry.out)[:n, step]  # fetch, then index on the host: no per-step programs
            on_tokens([[] if finished[i] else [int(toks[i])] for i in range(n)])
            finished |= np.isin(toks, eos)
    steps = int(carry.step)
    out = np.asarray(carry.out)[:n, :steps]
    t2 = time.perf_counter()

    results = []
    for row in out:
        row = [int(t) for t in row]
        ends = [i for i, t in enumerate(row) if t in eos]
        results.append(row[:ends[0] + 1] if ends else row)
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, prefill_tokens=sum(lens),
                       decode_tokens=sum(len(r) for r in results), steps=steps)
    return results
