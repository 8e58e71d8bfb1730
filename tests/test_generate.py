"""Generation with the latent KV cache, checked against transformers' generate and the full forward pass."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dsv2_jax
from dsv2_jax import ModelConfig
from dsv2_jax.attention import MLA
from dsv2_jax.rope import rope_cos_sin
from dsv2_jax.tokenizer import ByteTokenizer
from hf_models import YARN, random_hf_model, save_hf_model
from test_model import all_eqns, pallas_calls

gen = importlib.import_module("dsv2_jax.generate")  # the module; dsv2_jax.generate is the function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LENGTHS = (5, 19, 11)  # different lengths in one batch; 19 > chunk 8 and > YaRN's original length 16
NEW = 8


def random_prompts(vocab, lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(2, vocab, n)] for n in lengths]


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with weights large enough that every part matters (fp32)."""
    return random_model(ModelConfig.from_preset("tiny"))


@pytest.fixture(scope="module")
def tiny16():
    """The tiny preset with 16 heads (decoding's latent_attention kernel takes heads in groups of 16) and 16 experts
    routed greedily (its router runs on stacked_matvec and route_kernel)."""
    return random_model(ModelConfig.from_preset("tiny").replace(
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=16, topk_method="greedy", norm_topk_prob=True))


def random_model(config, dtype=jnp.float32, param_dtype=jnp.float32):
    graphdef, state = nnx.split(dsv2_jax.abstract_model(config, dtype=dtype, param_dtype=param_dtype))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(state):  # numpy draws: no compile, no op-by-op initialisation
        norm = var.get_metadata()["axes"][-1] == "norm"
        value = rng.uniform(0.6, 1.4, var.shape) if norm else rng.normal(0.0, 0.15, var.shape)
        var.set_value(jax.device_put(jnp.asarray(value, var.dtype), jax.devices()[0]))  # committed, as dsv2_jax.load
    return nnx.merge(graphdef, state)


@nnx.jit
def forward(model, ids):
    return model(ids)


def full_forward_logits(model, seqs):
    """The full (expanded, uncached) forward pass: logits [len(seqs), S, V] of right-padded sequences."""
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return np.asarray(forward(model, jnp.asarray(ids)))


# ---------------------------------------------------------------------------------------------- transformers
HF_CASES = {
    "q_lora": dict(),
    "plain_q-yarn-group_limited-tied": dict(q_lora_rank=None, rope_parameters=YARN, max_position_embeddings=128,
                                            topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                            first_k_dense_replace=0, tie_word_embeddings=True),
}


def hf_greedy(hf, prompt, eos):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def tie_gap(hf, prompt, a, b):
    """|logit_a - logit_b| / max |logit| of transformers' next-token logits after `prompt`."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].double().numpy()
    return abs(logits[a] - logits[b]) / np.abs(logits).max()


@pytest.mark.parametrize("name", list(HF_CASES))
def test_greedy_equals_transformers_generate(tmp_path, name):
    hf = random_hf_model(seed=3 + len(name), **HF_CASES[name])
    save_hf_model(hf, tmp_path)
    model = dsv2_jax.from_hf(tmp_path, dtype=jnp.float32)
    prompts = random_prompts(hf.config.vocab_size)
    eos = 1
    got = dsv2_jax.generate(model, prompts, NEW, eos_token_id=eos, chunk_size=8)
    ties = 0
    for prompt, ours in zip(prompts, got):
        ref = hf_greedy(hf, prompt, eos)
        print(name, ref, ours)
        for i, (r, o) in enumerate(zip(ref, ours)):
            if r != o:  # acceptable only at a near-exact tie of the reference logits
                gap = tie_gap(hf, prompt + ref[:i], r, o)
                assert gap < 1e-5, f"step {i}: ours {o}, transformers {r}, logit gap {gap:.2e} is no tie"
                ties += 1
                break
        else:
            assert len(ours) == len(ref), (ours, ref)
    assert ties <= 1  # ties are rare with these weights: more than one would point at a real difference


# ---------------------------------------------------------------------------------------------- both paths
def test_absorbed_attention_equals_expanded():
    config = ModelConfig.from_preset("tiny").replace(initializer_range=0.15)  # every term matters
    attn = MLA(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    B, Sq, Sk = 3, 4, 10
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (B, Sk, config.hidden_size))
    cos, sin = rope_cos_sin(config, jnp.broadcast_to(jnp.arange(Sk), (B, Sk)))
    c_kv, k_pe = attn.latent(x, cos, sin)
    q_nope, q_pe = attn.query(x[:, -Sq:], cos[:, -Sq:], sin[:, -Sq:])
    lengths = jnp.array([10, 7, 9])
    mask = (jnp.arange(Sk)[None, None, :] <= (jnp.arange(Sq) + Sk - Sq)[None, :, None]) \
        & (jnp.arange(Sk)[None, None, :] < lengths[:, None, None])
    both = nnx.jit(lambda a, *args: (a.expanded(*args), a.absorbed(*args)))
    want, got = map(np.asarray, both(attn, q_nope, q_pe, c_kv, k_pe, mask))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, err
    assert np.abs(want).max() > 1.0  # not a trivially small output


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_projections_on_stacked_matvec(q_lora_rank):
    """MLA's query, latent and absorbed attention with ProjectionStacks (decoding's stacked_matvec reading layer 1 of
    the stacks; interpreted off GPU), the products of the layer input one kernel each or together
    (`input_products`), equal the module's own products (float32, 1e-5 relative), with the low-rank query path (V2)
    and the plain q_proj (V2-Lite)."""
    from dsv2_jax.attention import ProjectionStacks

    config = ModelConfig.from_preset("tiny").replace(initializer_range=0.15, q_lora_rank=q_lora_rank)
    attn = MLA(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(4))
    B, T = 2, 9
    x = jax.random.normal(jax.random.key(5), (B, T, config.hidden_size))
    cos, sin = rope_cos_sin(config, jnp.broadcast_to(jnp.arange(T), (B, T)))
    own = ProjectionStacks.of(attn)
    stacks = ProjectionStacks({n: jnp.stack([w * 3, w]) for n, w in own.weights.items()}, jnp.int32(1))
    query = {"q_a_proj", "q_b_proj"} if q_lora_rank else {"q_proj"}
    assert set(stacks.weights) == query | {"kv_a_proj", "o_proj", "k_b_proj", "v_b_proj"}
    mask = jnp.ones((B, 1, T), bool)

    def run(s, together=False):  # the last token decoded against the earlier ones' latents
        new = (x[:, -1:], cos[:, -1:], sin[:, -1:], s)
        products = attn.input_products(x[:, -1:], s) if together else None
        q_nope, q_pe = attn.query(*new, products)
        c_kv, k_pe = attn.latent(*new, products)
        c_old, k_old = attn.latent(x[:, :-1], cos[:, :-1], sin[:, :-1])
        c_all, k_all = jnp.concatenate([c_old, c_kv], 1), jnp.concatenate([k_old, k_pe], 1)
        return q_nope, q_pe, c_kv, k_pe, attn.absorbed(q_nope, q_pe, c_all, k_all, mask, s)

    with jax.default_matmul_precision("highest"):
        want, got, merged = run(None), run(stacks), run(stacks, together=True)
    kernels = pallas_calls(lambda v: run(stacks)[-1] + v, 0.0, prefix="stacked_matvec")
    assert kernels == (4 if q_lora_rank else 3)  # the query's one or two products, kv_a, o_proj
    kernels = pallas_calls(lambda v: run(stacks, together=True)[-1] + v, 0.0, prefix="stacked_matvec")
    assert kernels == (3 if q_lora_rank else 2)  # q_proj or q_a_proj with kv_a in one, [q_b,] o_proj
    for w, g, m in zip(want, got, merged):
        w = np.asarray(w)
        for g in (g, m):
            np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * np.abs(w).max())
    assert np.abs(np.asarray(want[-1])).max() > 0.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latent_attention_matches_reference(dtype):
    """latent_attention (decoding's attention over the latent cache; interpreted off GPU) against a float64 softmax
    per row over its slots [0, last] of the chosen layer (once as a layer index plus a static offset): two groups of
    16 heads, rows ending in different spans of the cache (one inside the first block), a cache whose last span is
    shorter; float32 within 1e-6, bf16 (probabilities rounded to bf16 before the weighted sum, as the XLA path
    rounds them) within 1e-2 of the largest entry. Shapes it cannot take are errors, and decoding keeps XLA's
    attention for them."""
    from dsv2_jax.attention import latent_attention, latent_attention_fits

    rng = np.random.default_rng(14)
    L, B, H, C, R = 3, 3, 32, 64, 16
    q_lat, q_pe = (jnp.asarray(rng.normal(size=(B, H, n)) / 4, dtype) for n in (C, R))
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    # 80: spans of 3 and 2 blocks of 16; layer 1 given as 0 plus a static offset of 1 (LatentCache.offset)
    for T, splits, last, offset in ((128, 4, [77, 3, 127], 0), (80, 2, [79, 50, 15], 1)):
        c_kv, k_pe = (jnp.asarray(rng.normal(size=(L, B, T, n)), dtype) for n in (C, R))
        got = np.asarray(latent_attention(q_lat, q_pe, c_kv, k_pe, jnp.int32(1 - offset), jnp.asarray(last),
                                          scale=0.3, block_t=16, splits=splits, layer_offset=offset))
        for b in range(B):
            keys = slice(0, last[b] + 1)
            scores = 0.3 * (f(q_lat[b]) @ f(c_kv[1, b, keys]).T + f(q_pe[b]) @ f(k_pe[1, b, keys]).T)
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            want = (p / p.sum(axis=1, keepdims=True)) @ f(c_kv[1, b, keys])
            tol = 1e-6 if dtype == "float32" else 1e-2
            np.testing.assert_allclose(got[b], want, rtol=0, atol=tol * np.abs(want).max(), err_msg=f"T={T}")
    with pytest.raises(ValueError, match="multiple of 16"):
        latent_attention(q_lat[:, :8], q_pe[:, :8], c_kv, k_pe, 0, jnp.asarray(last), scale=0.3)
    with pytest.raises(ValueError, match="tensor-core tile"):
        latent_attention(q_lat, q_pe, c_kv, k_pe, 0, jnp.asarray(last), scale=0.3, block_t=8)
    config = ModelConfig.from_preset("deepseek-v2-lite")
    assert latent_attention_fits(config, 1024) and not latent_attention_fits(config, 40)
    assert not latent_attention_fits(ModelConfig.from_preset("tiny"), 1024)  # 4 heads


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_absorbed_inputs_equal_query_and_latent(q_lora_rank):
    """MLA.absorbed_inputs (decoding's attention inputs: the layer input's products on stacked_partials, then
    absorbed_query for the partial sums, the latent's norm, both RoPEs, W_UK and the cache writes; interpreted off
    GPU) against the module's query, latent and W_UK einsum (float32, 1e-5 relative): layer 1 of the weight stacks,
    layer 2 of a 3-layer cache (for the one row as layer 1 plus a static offset of 1), three rows at different
    slots, 18 rows (16 rows a program of the query's heads: two blocks, the second's rows past the batch masked)
    and one row, and the one row unnormalised with the stacks' input norm (normalised by the first kernel); the rest
    of the cache is untouched. Both query paths."""
    from dsv2_jax.attention import LatentCache, ProjectionStacks
    from dsv2_jax.layers import rms_norm

    config = ModelConfig.from_preset("tiny").replace(initializer_range=0.15, q_lora_rank=q_lora_rank)
    attn = MLA(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(6))
    attn.kv_a_norm[...] = jnp.linspace(0.5, 1.5, config.kv_lora_rank)
    if q_lora_rank:
        attn.q_a_norm[...] = jnp.linspace(1.5, 0.5, q_lora_rank)
    own = ProjectionStacks.of(attn)
    stacks = ProjectionStacks({n: jnp.stack([w * 3, w]) for n, w in own.weights.items()}, jnp.int32(1),
                              jnp.stack([own.kv_a_norm * 2, own.kv_a_norm]))
    L, T, C, R = 3, 16, config.kv_lora_rank, config.qk_rope_head_dim
    weight = jnp.linspace(0.5, 1.5, config.hidden_size)  # layer 1's input norm, for the unnormalised row
    norm_stacks = stacks._replace(input_norm=jnp.stack([weight * 2, weight]))
    rng = np.random.default_rng(8)
    many = [(3 * b) % 16 for b in range(18)]  # 18 rows: two blocks of 16 rows a program, the second masked
    # three rows, 18 rows, then one row (the one-token products), once unnormalised
    for slots, normalise in (([5, 0, 15], False), (many, False), ([9], False), ([9], True)):
        B, pos = len(slots), jnp.array(slots, jnp.int32)
        x = jax.random.normal(jax.random.key(7), (B, 1, config.hidden_size))
        cos, sin = rope_cos_sin(config, pos[:, None])
        layer, offset = (2, 0) if B > 1 else (1, 1)  # cache layer 2 either way: the one row's with a static offset
        cache = LatentCache(jnp.asarray(rng.normal(size=(L, B, T, C)), jnp.float32),
                            jnp.asarray(rng.normal(size=(L, B, T, R)), jnp.float32), jnp.int32(layer), pos, offset)
        with jax.default_matmul_precision("highest"):
            if normalise:  # the kernel's input is 3 x unnormalised; the references get it normalised
                q_lat, q_pe, got = jax.jit(attn.absorbed_inputs)(3 * x, cos, sin, norm_stacks, cache)
                x = rms_norm(3 * x, weight, config.rms_norm_eps, jnp.float32)
            else:
                q_lat, q_pe, got = jax.jit(attn.absorbed_inputs)(x, cos, sin, stacks, cache)
            q_nope, q_pe_want = attn.query(x, cos, sin)
            q_lat_want = jnp.einsum("bqhk,chk->bqhc", q_nope, attn.k_b_proj[...])[:, 0]
            c_kv, k_pe = attn.latent(x, cos, sin)
        rows = jnp.arange(B)
        for g, w in ((q_lat, q_lat_want), (q_pe, q_pe_want[:, 0]), (got.c_kv[2, rows, pos], c_kv[:, 0]),
                     (got.k_pe[2, rows, pos], k_pe[:, 0])):
            w = np.asarray(w)
            assert g.shape == w.shape and np.abs(w).max() > 0.1
            np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * np.abs(w).max())
        for new, old in ((got.c_kv, cache.c_kv), (got.k_pe, cache.k_pe)):  # only the new slots changed
            np.testing.assert_array_equal(np.asarray(new.at[2, rows, pos].set(0)),
                                          np.asarray(old.at[2, rows, pos].set(0)))
    kernels = {name: pallas_calls(lambda v: attn.absorbed_inputs(v, cos, sin, stacks, cache)[0], x, prefix=name)
               for name in ("stacked_matvec", "absorbed_query")}
    assert kernels == {"stacked_matvec": 2 if q_lora_rank else 1, "absorbed_query": 1}
    assert attn.absorbed_inputs(x, cos, sin, stacks._replace(kv_a_norm=None), cache) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_rows_matches_rms_norm(dtype):
    """rms_norm_rows (decoding's norms in one kernel; interpreted off GPU) equals `rms_norm` with the chosen layer's
    weights: 1 and 3 rows, float32 within 1e-6, bf16 within one bf16 rounding; widths that are not a power of two
    are refused."""
    from dsv2_jax.layers import rms_norm, rms_norm_rows

    rng = np.random.default_rng(15)
    w = jnp.asarray(rng.uniform(0.5, 1.5, (3, 64)), jnp.float32)
    for rows in (1, 3):
        x = jnp.asarray(rng.normal(size=(rows, 1, 64)) * 3, dtype)
        got = rms_norm_rows(x, w, jnp.int32(2), eps=1e-6, dtype=jnp.dtype(dtype))
        want = rms_norm(x, w[2], 1e-6, jnp.dtype(dtype))
        assert got.shape == want.shape and got.dtype == want.dtype
        tol = 1e-6 if dtype == "float32" else 2 ** -7
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm_rows(jnp.zeros((1, 48)), jnp.ones((1, 48)), 0, eps=1e-6, dtype=jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_rows_with_router(dtype):
    """rms_norm_rows with a router (decoding's post-attention norm taking the router's product; interpreted off GPU):
    the same normalised rows as without, and partial sums over 128-row blocks of the router (two here; 64-row blocks
    for one row) whose sum is the float32 product of those rows with the chosen layer's router: float32 within 1e-5
    of the largest logit; bf16 within one bf16 rounding of each term (the interpreter's XLA may keep the normalised
    values unrounded). A router whose experts are not a power of two is refused."""
    from dsv2_jax.layers import ONE_ROW_ROUTER_ROWS, ROUTER_ROWS, rms_norm_rows

    rng = np.random.default_rng(17)
    dt, D = jnp.dtype(dtype), 2 * ROUTER_ROWS
    w = jnp.asarray(rng.uniform(0.5, 1.5, (3, D)), jnp.float32)
    router = rng.normal(size=(3, D, 16)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(3, 1, D)) * 3, dtype)
    normed, logits = rms_norm_rows(x, w, jnp.int32(2), jnp.asarray(router), eps=1e-6, dtype=dt)
    np.testing.assert_array_equal(np.asarray(normed, np.float32),
                                  np.asarray(rms_norm_rows(x, w, jnp.int32(2), eps=1e-6, dtype=dt), np.float32))
    assert logits.shape == (2, 3, 16) and logits.dtype == jnp.float32
    n64 = np.asarray(normed, np.float64).reshape(3, D)
    want = n64 @ router[2].astype(np.float64)
    bound = (1e-5 * np.abs(want).max() if dtype == "float32"
             else 2 ** -8 * (np.abs(n64) @ np.abs(router[2].astype(np.float64))))
    assert np.all(np.abs(np.asarray(logits, np.float64).sum(axis=0) - want) <= bound)
    # one row: blocks of ONE_ROW_ROUTER_ROWS (more programs), the same sum
    _, one = rms_norm_rows(x[:1], w, jnp.int32(2), jnp.asarray(router), eps=1e-6, dtype=dt)
    assert one.shape == (D // ONE_ROW_ROUTER_ROWS, 1, 16) and ONE_ROW_ROUTER_ROWS != ROUTER_ROWS
    one_bound = bound[:1] if np.ndim(bound) else bound
    assert np.all(np.abs(np.asarray(one, np.float64).sum(axis=0) - want[:1]) <= one_bound)
    with pytest.raises(ValueError, match="power of two of experts"):
        rms_norm_rows(x, w, 0, jnp.zeros((3, D, 12)), eps=1e-6, dtype=dt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_rows_adds_partials(dtype):
    """rms_norm_rows with partial sums to add (decoding's post-attention norm taking o_proj's float32 partials;
    interpreted off GPU): x + round(Σ partials) as XLA computes it, normalised as rms_norm_rows normalises that sum,
    with and without the router (whose partials are unchanged); partials with more rows than x (a kernel's padded
    tile) use the first rows. Partials of another width are refused."""
    from dsv2_jax.layers import ROUTER_ROWS, rms_norm_rows

    rng = np.random.default_rng(19)
    dt, D, T = jnp.dtype(dtype), 2 * ROUTER_ROWS, 3
    w = jnp.asarray(rng.uniform(0.5, 1.5, (3, D)), jnp.float32)
    router = jnp.asarray(rng.normal(size=(3, D, 16)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(T, 1, D)) * 3, dtype)
    parts = jnp.asarray(rng.normal(size=(4, 16, D)), jnp.float32)
    want_sum = x + parts.sum(axis=0)[:T].astype(dt).reshape(T, 1, D)
    for extra in ((), (router,)):
        got = rms_norm_rows(x, w, jnp.int32(2), *(extra or (None,)), parts, eps=1e-6, dtype=dt)
        want = rms_norm_rows(want_sum, w, jnp.int32(2), *extra, eps=1e-6, dtype=dt)
        want = want if extra else (want,)
        assert len(got) == len(want) + 1 and got[-1].dtype == x.dtype and got[-1].shape == x.shape
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=2 ** -8, atol=0)
        np.testing.assert_allclose(np.asarray(got[-1], np.float32), np.asarray(want_sum, np.float32), **tol)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2 * tol["rtol"],
                                       atol=1e-5 * float(np.abs(np.asarray(b, np.float32)).max()))
    with pytest.raises(ValueError, match="partials to add"):
        rms_norm_rows(x, w, 0, None, parts[:, :, :64], eps=1e-6, dtype=dt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latent_output_matches_reference(dtype):
    """latent_output (the spans combined and W_UV of the chosen layer applied in one kernel; interpreted off GPU)
    against float64 numpy of combine_spans, the combined output rounded to the dtype as the XLA path rounds it:
    3 spans of 32 heads, one span empty (m = -1e30, l = 0) as latent_attention leaves a span past a row's last
    slot; 2 rows one row a program, and 16 rows a program at 2, 18 (a second block of rows, rows past the batch
    masked) and 32 rows; float32 within 1e-6, bf16 within 1e-2 of the largest entry. Mismatched shapes are
    errors."""
    from dsv2_jax.attention import combine_spans, latent_output

    rng = np.random.default_rng(15)
    L, S, H, C, V = 3, 3, 32, 64, 48
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    for B, rows in ((2, 1), (2, 16), (18, 16), (32, 16)):
        o = jnp.asarray(rng.normal(size=(B, S, H, C)), jnp.float32)
        m = jnp.asarray(rng.normal(size=(B, S, H)), jnp.float32).at[1, 2].set(-1e30)
        l = jnp.asarray(rng.uniform(0.5, 3.0, size=(B, S, H)), jnp.float32).at[1, 2].set(0.0)
        o = o.at[1, 2].set(0.0)
        w = jnp.asarray(rng.normal(size=(L, C, H, V)) / 8, dtype)
        got = np.asarray(latent_output(o, m, l, w, jnp.int32(2), dtype=jnp.dtype(dtype), rows=rows, block_k=32,
                                       block_n=16), np.float64)
        want = np.einsum("bhc,chv->bhv", f(combine_spans(o, m, l).astype(dtype)), f(w[2]))
        tol = 1e-6 if dtype == "float32" else 1e-2
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max(), err_msg=f"{B} rows, {rows}")
    with pytest.raises(ValueError, match="W_UV"):
        latent_output(o, m, l, w[:, :, :16], 0, dtype=jnp.float32)
    with pytest.raises(ValueError, match="rows a program"):
        latent_output(o, m, l, w, 0, dtype=jnp.float32, rows=8)


def test_latent_tiles_by_rows():
    """The latent kernels' tiles: one row keeps ONE_ROW_TILES, 2-15 rows the kernels' defaults (a program per row);
    from 16 rows absorbed_query and latent_output take 16 rows a program, and latent_attention about
    LATENT_SPAN_PROGRAMS programs over the spans (1 to 16 spans)."""
    from dsv2_jax import attention as at

    assert at.latent_tiles("latent_attention", 1, 16) == at.ONE_ROW_TILES["latent_attention"]
    assert at.latent_tiles("latent_output", 1, 16) == {}
    for kernel in ("absorbed_query", "latent_output", "latent_attention"):
        assert at.latent_tiles(kernel, 15, 128) == {}
    for kernel in ("absorbed_query", "latent_output"):
        assert at.latent_tiles(kernel, 16, 16)["rows"] == at.latent_tiles(kernel, 64, 128)["rows"] == 16
    spans = {(b, h): at.latent_tiles("latent_attention", b, h)["splits"] for b, h in ((16, 16), (64, 16), (64, 128))}
    assert spans == {(16, 16): 16, (64, 16): at.LATENT_SPAN_PROGRAMS // 64, (64, 128): 1}


@pytest.mark.parametrize("model,experts,projections", [("tiny", "sorted", "xla"), ("tiny", "sorted", "pallas"),
                                                       ("tiny", "chosen", "pallas"), ("tiny16", "sorted", "pallas"),
                                                       ("tiny16", "chosen", "pallas")])
def test_decode_steps_equal_full_forward(model, experts, projections, decode_kernels, request, monkeypatch):
    """Prefill, then absorbed decode steps of chosen tokens: logits equal the full (expanded) forward pass, with the
    decoding step's experts on the sorted grouped path or the chosen-experts kernels, and its attention projections
    on XLA or on stacked_matvec, its attention over the latents (16 heads) on latent_attention, its routing (16
    experts, greedy) on rms_norm_rows (the router's product with the post-attention norm) and then, on the
    chosen-experts kernels, in their gate/up kernel, the down kernel adding the layer's output to the residual
    (MoE.add_decoded; route_kernel and XLA's add otherwise), its norms on rms_norm_rows (kernels interpreted off
    GPU); and with one token a step on those kernels, the post-attention norm adding o_proj's partial sums to the
    residual itself and the input norm taken by the attention's first kernel. On the sorted path with the
    projections on stacked_matvec, the shared experts' products and (16 experts) the router's run there too. On the
    kernels the MoE layers run two
    to an iteration here (the tiny preset's three: a pair in the loop, then the third in a loop of its own), each
    kernel reading its layer from the loop's counter."""
    monkeypatch.setattr(gen, "DECODE_LAYERS_PER_ITERATION", 2)
    tiny = request.getfixturevalue(model)
    decode_kernels(experts, projections)
    prompts = random_prompts(256, (6, 3))
    extra = [[7, 100, 42], [250, 1, 9]]
    full = full_forward_logits(tiny, [p + e for p, e in zip(prompts, extra)])  # causal: padding is harmless
    cache = dsv2_jax.init_cache(tiny.config, 2, 16, dtype=jnp.float32)
    cache, logits = gen.prefill(tiny, cache, prompts, chunk_size=4)
    # per traced layer (dense, MoE): q_a with kv_a, q_b, o_proj; the dense down_proj; attention, routing (tiny16's
    # router product in the post-attention norm's kernel, its routing and residual add in the experts' kernels). The
    # MoE layer is traced three times: twice in the first loop's body, once in the second's.
    wide, moe = model == "tiny16", 3
    routed, on_sorted = wide and experts == "chosen", experts == "sorted"
    assert tiny.config.num_moe_layers == 3
    for name, dense, per_moe in (("stacked_matvec", 4, 3 + on_sorted * (2 + wide)), ("latent_attention", wide, wide),
                                 ("latent_output", wide, wide), ("route", 0, wide and not routed and not on_sorted),
                                 ("chosen_experts_gate_up_routing", 0, routed),
                                 ("chosen_experts_down_residual", 0, routed), ("absorbed_query", wide, wide),
                                 ("rms_norm_rows", 2, 2)):
        kernels = pallas_calls(lambda c, t: gen.decode_forward(tiny, c, t)[1], cache, jnp.array([7, 250]), prefix=name)
        assert kernels == (dense + moe * per_moe if projections == "pallas" else 0), name

    def norms_adding(cache, tokens):  # post-attention norm kernels that add o_proj's float32 partial sums themselves
        jaxpr = jax.make_jaxpr(lambda c, t: gen.decode_forward(tiny, c, t)[1])(cache, tokens).jaxpr
        return sum(e.primitive.name == "pallas_call" and str(e.params["name"]).startswith("rms_norm_rows")
                   and e.invars[-1].aval.dtype == jnp.float32 and e.invars[-1].aval.ndim == 3
                   and e.invars[-1].aval.shape[-1] == tiny.config.hidden_size for e in all_eqns(jaxpr))

    assert norms_adding(cache, jnp.array([7, 250])) == 0  # two tokens a step: XLA adds them
    for step in range(3):
        for row in range(2):
            want = full[row, len(prompts[row]) + step - 1]
            err = np.abs(np.asarray(logits[row]) - want).max() / np.abs(want).max()
            assert err <= 1e-5, (step, row, err)
        cache, logits = gen.decode_step(tiny, cache, [extra[0][step], extra[1][step]])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9, 6])
    if projections == "pallas":
        # one token a step: with the attention kernels (tiny16), each loop's post-attention norm adds them itself
        # and the input norm is taken by the attention's first kernel (stacked_matvec), not a kernel of its own;
        # without them (tiny), the input norm still runs on its own kernel
        cache = dsv2_jax.init_cache(tiny.config, 1, 16, dtype=jnp.float32)
        cache, _ = gen.prefill(tiny, cache, prompts[:1], chunk_size=4)
        assert norms_adding(cache, jnp.array([7])) == (1 + moe if wide else 0)
        norms = pallas_calls(lambda c, t: gen.decode_forward(tiny, c, t)[1], cache, jnp.array([7]),
                             prefix="rms_norm_rows")
        assert norms == (1 + moe if wide else 2 * (1 + moe))
        _, logits = gen.decode_step(tiny, cache, [extra[0][0]])
        want = full[0, len(prompts[0])]
        assert np.abs(np.asarray(logits[0]) - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("dtype,param_dtype,hidden", [(jnp.float32, jnp.float32, 128), (jnp.bfloat16, jnp.bfloat16, 128),
                                                      (jnp.float32, jnp.float32, 96), (jnp.bfloat16, jnp.float32, 128)])
def test_one_token_head_on_the_kernel(dtype, param_dtype, hidden, decode_kernels, monkeypatch):
    """decode_head: one token with the projections on stacked_matvec, where XLA_FLAGS turns XLA's GEMM fusions
    off, takes the final norm and the head's product in one stacked_partials kernel (the norm in XLA first at a
    width of 96, not a power of two). Its logits equal model.head's: float32 within 1e-6, bf16 within 1e-5 of a
    float64 product of the same rounded operands (the normalised row and the head in bf16). With the fusions on,
    two tokens, XLA's projections, or a head stored in float32 under bf16 compute, XLA's product stays."""
    from dsv2_jax.layers import rms_norm

    config = ModelConfig.from_preset("tiny").replace(hidden_size=hidden)
    model = random_model(config, dtype, param_dtype)
    x = jnp.asarray(np.random.default_rng(3).normal(0.0, 2.0, (2, 1, hidden)), dtype)
    on_kernel = param_dtype == dtype

    def kernels(x):
        return pallas_calls(lambda x: gen.decode_head(model, x), x, prefix="stacked_matvec")

    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
    decode_kernels("auto", "xla")
    assert kernels(x[:1]) == 0
    decode_kernels("auto", "pallas")
    assert kernels(x) == 0 and kernels(x[:1]) == on_kernel
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_triton_gemm=true")
    assert kernels(x[:1]) == 0
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=0")
    assert kernels(x[:1]) == on_kernel
    got = np.asarray(gen.decode_head(model, x[:1]), np.float64)
    assert got.shape == (1, config.vocab_size)
    if dtype == jnp.float32:
        want = np.asarray(model.head(x[:1])[:, 0], np.float64)
    else:  # the operands as both products round them, multiplied in float64
        normed = rms_norm(x[:1, 0], model.norm.weight[...], model.norm.eps, dtype)
        want = np.asarray(normed, np.float64) @ np.asarray(model.head_weight(), np.float64)
    tol = 1e-6 if dtype == jnp.float32 else 1e-5
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_xla_gemm_fusions_off_reads_the_flags_last_setting():
    off = gen.xla_gemm_fusions_off
    assert not off({}) and not off({"XLA_FLAGS": "--xla_gpu_autotune_level=0"})
    assert off({"XLA_FLAGS": "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false"})
    assert off({"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=FALSE"}) and off({"XLA_FLAGS": "-xla_gpu_enable_triton_gemm=0"})
    assert not off({"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_triton_gemm"})
    assert not off({"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_triton_gemm=true"})
    assert not off({"XLA_FLAGS": "--xla_gpu_enable_triton_gemm_any=false"})


def test_decode_step_of_many_rows_on_the_kernels(tiny16, decode_kernels):
    """A decoding step of 20 rows (more than one 16-row tile) with the projections on stacked_matvec: the layers'
    attention projections, the latent kernels and, on the sorted experts' path, the router's and shared experts'
    products read their layer out of the stacks, and the logits still equal the full forward pass (1e-5)."""
    from dsv2_jax.grouped_matmul import MATVEC_MAX_TOKENS

    decode_kernels("sorted", "pallas")
    B = 20
    assert 16 < B <= MATVEC_MAX_TOKENS
    prompts = random_prompts(256, [3 + b % 4 for b in range(B)], seed=9)
    extra = [int(t) for t in np.random.default_rng(9).integers(2, 256, B)]
    full = full_forward_logits(tiny16, [p + [e] for p, e in zip(prompts, extra)])
    cache = dsv2_jax.init_cache(tiny16.config, B, 16, dtype=jnp.float32)
    cache, _ = gen.prefill(tiny16, cache, prompts, chunk_size=8)
    # per MoE layer: q_a with kv_a, q_b, o_proj, the router, the shared experts' gate with up, and down
    kernels = pallas_calls(lambda c, t: gen.decode_forward(tiny16, c, t)[1], cache, jnp.asarray(extra),
                           prefix="stacked_matvec")
    assert kernels == 4 + 6 * (tiny16.config.num_moe_layers > 0)  # the MoE layers traced once, in their loop
    _, logits = gen.decode_step(tiny16, cache, extra)
    for row in range(B):
        want = full[row, len(prompts[row])]
        err = np.abs(np.asarray(logits[row]) - want).max() / np.abs(want).max()
        assert err <= 1e-5, (row, err)


def test_one_row_decode_equals_full_forward(tiny):
    """One row: its decoding step writes the cache in place (dynamic_update_slice, not a scatter); logits still
    equal the full forward pass (1e-5) and the latents land in the slots after the prompt; a step on a full cache
    is refused."""
    prompt, extra = random_prompts(256, (5,), seed=6)[0], [11, 200, 3]
    full = full_forward_logits(tiny, [prompt + extra])
    cache = dsv2_jax.init_cache(tiny.config, 1, 16, dtype=jnp.float32)
    cache, logits = gen.prefill(tiny, cache, [prompt], chunk_size=4)
    for step, token in enumerate(extra):
        want = full[0, len(prompt) + step - 1]
        assert np.abs(np.asarray(logits[0]) - want).max() <= 1e-5 * np.abs(want).max(), step
        cache, logits = gen.decode_step(tiny, cache, [token])
    filled = np.abs(np.asarray(cache.c_kv[:, 0])).sum(axis=(0, 2)) > 0
    np.testing.assert_array_equal(filled, np.arange(16) < len(prompt) + len(extra))
    full = cache._replace(lengths=jnp.array([16], jnp.int32))  # no slot left: an error, not a silent write
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] already hold 16 tokens"):
        gen.decode_step(tiny, full, [5])


def test_chunked_prefill_equals_one_shot(tiny):
    prompts = random_prompts(256, (13, 5, 9), seed=1)
    caches = {}
    # chunk 4 in a cache of 14 slots: the last chunk moves back to slots 10..13; one chunk of 16 in a cache of
    # 40 slots attends over a window of 16 slots only.
    for chunk, max_len in ((4, 14), (16, 40)):
        cache = dsv2_jax.init_cache(tiny.config, 3, max_len, dtype=jnp.float32)
        caches[chunk] = gen.prefill(tiny, cache, prompts, chunk_size=chunk)
    (c4, l4), (c16, l16) = caches[4], caches[16]
    assert c16.c_kv.shape[2] == 40
    full = full_forward_logits(tiny, prompts)
    np.testing.assert_array_equal(np.asarray(c4.lengths), [13, 5, 9])
    for row, p in enumerate(prompts):
        n = len(p)
        for a, b in ((c4.c_kv, c16.c_kv), (c4.k_pe, c16.k_pe)):
            a, b = np.asarray(a[:, row, :n]), np.asarray(b[:, row, :n])
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
        want = full[row, n - 1]
        for got in (l4[row], l16[row]):
            assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()


def test_bf16_prefill_in_a_cache_of_any_length(tiny):
    """bf16 chunked prefill whose key window is not a whole number of a flash kernel's blocks (chunks of 32 queries
    over a cache of 100 slots; on a GPU, tokamax's kernel, which pads the keys itself) gives the last logits of
    the same bf16 model's full forward pass within 1% of their norm (0.2% on CPU), for prompts of 70 and 45
    tokens."""
    prompts = random_prompts(256, (70, 45), seed=3)
    bf16 = nnx.merge(nnx.graphdef(dsv2_jax.abstract_model(tiny.config, dtype=jnp.bfloat16)), nnx.state(tiny))
    full = full_forward_logits(bf16, prompts)
    cache = dsv2_jax.init_cache(tiny.config, 2, 100)
    cache, logits = gen.prefill(bf16, cache, prompts, chunk_size=32)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [70, 45])
    for row, p in enumerate(prompts):
        got, want = np.asarray(logits[row], np.float32), full[row, len(p) - 1]
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2, row


# ---------------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_cache_holds_only_the_latent(dtype):
    config = ModelConfig.from_preset("tiny")
    B, T = 2, 24
    cache = dsv2_jax.init_cache(config, B, T, dtype=dtype)
    itemsize = jnp.dtype(dtype).itemsize
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * itemsize
    assert gen.cache_bytes_per_token(cache) == expected
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    assert total == config.num_hidden_layers * B * T * expected + B * 4  # + the int32 lengths
    v2 = jax.eval_shape(lambda: dsv2_jax.init_cache(ModelConfig.from_preset("deepseek-v2"), 1, 8))
    assert (v2.c_kv.shape[-1] + v2.k_pe.shape[-1]) * v2.c_kv.shape[0] == 34_560  # REFERENCE.md, per token


# ---------------------------------------------------------------------------------------------- compilation
def test_nothing_recompiles_per_token(tiny):
    compiles = []

    def listener(event, duration, **kw):  # tracing, lowering and backend compilation all count
        if event.startswith("/jax/core/compile/"):
            compiles.append(event)

    # Compiles the shape bucket (2 rows, chunk 4, cache 16, output 16) with one prefill chunk and one decode call.
    dsv2_jax.generate(tiny, random_prompts(256, (4, 2)), 5, chunk_size=4)
    seen = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # two prefill chunks, then nine one-token calls of the decode loop fed by its own outputs
        out = dsv2_jax.generate(tiny, random_prompts(256, (3, 7), seed=2), 9, chunk_size=4, on_tokens=seen.append)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(seen) == 9 and all(len(r) == 9 for r in out)
    assert compiles == [], f"{len(compiles)} compilations in a warm shape bucket"
    assert [[s[i][0] for s in seen] for i in range(2)] == out  # streamed tokens are the returned ones


# ---------------------------------------------------------------------------------------------- stopping, sampling
def test_eos_stops_each_row(tiny):
    prompts = random_prompts(256, (4, 7), seed=3)
    free = dsv2_jax.generate(tiny, prompts, 8)
    eos = free[1][3]  # a token row 1 emits at step 3
    stopped = dsv2_jax.generate(tiny, prompts, 8, eos_token_id=eos)
    for row, s in zip(free, stopped):
        expected = row[:row.index(eos) + 1] if eos in row else row
        assert s == expected
    assert len(stopped[1]) <= 4


def test_seeded_sampling_is_reproducible(tiny):
    prompts = random_prompts(256, (4, 8), seed=4)
    a = dsv2_jax.generate(tiny, prompts, 8, temperature=1.0, seed=11)
    b = dsv2_jax.generate(tiny, prompts, 8, temperature=1.0, seed=11)
    c = dsv2_jax.generate(tiny, prompts, 8, temperature=1.0, seed=12)
    assert a == b and a != c
    greedy = dsv2_jax.generate(tiny, prompts, 8)
    assert dsv2_jax.generate(tiny, prompts, 8, temperature=0.7, top_k=1, seed=5) == greedy


def allowed_tokens(logits, temperature, top_k, top_p):
    """The allowed set and its renormalised probabilities, by a plain numpy reading of top-k then top-p."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = list(order[:top_k] if top_k else order)
    p = np.exp(z[keep] - z[keep].max())
    p /= p.sum()
    if top_p is not None:
        cut = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix whose mass reaches top_p
        keep, p = keep[:cut], p[:cut] / p[:cut].sum()
    return dict(zip((int(k) for k in keep), p))


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (8, 0.8)])
def test_top_k_top_p_stay_in_the_allowed_set(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, 64).astype(np.float32)
    temperature, n = 0.8, 4000
    allowed = allowed_tokens(logits, temperature, top_k, top_p)
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(gen.sample_logits, static_argnums=(2, 3, 4))(
        jnp.broadcast_to(jnp.asarray(logits), (n, 64)), keys, temperature, top_k, top_p))
    assert set(draws.tolist()) <= set(allowed)
    for token, p in allowed.items():  # and the allowed tokens come at their renormalised rates
        assert abs(np.mean(draws == token) - p) < 0.03, (token, p)


def test_top_p_keeps_as_many_tied_tokens_as_the_mass_needs():
    """Five tied highest logits and top_p 0.5: transformers' TopPLogitsWarper keeps three of them (each holds ~0.2
    of the mass); so does sample_logits, the lowest ids among the tied ones."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper
    logits = np.full(16, -3.0, np.float32)
    logits[[2, 5, 7, 11, 13]] = 4.0
    want = TopPLogitsWarper(0.5)(None, torch.tensor(logits[None]))
    n, keys = 2000, jax.random.split(jax.random.key(1), 2000)
    draws = np.asarray(jax.jit(gen.sample_logits, static_argnums=(2, 3, 4))(
        jnp.broadcast_to(jnp.asarray(logits), (n, 16)), keys, 1.0, None, 0.5))
    assert int(torch.isfinite(want).sum()) == 3 and set(draws.tolist()) == {2, 5, 7}


def test_numpy_prompts_and_settings(tiny):
    """A 2-D array of prompts and NumPy numbers for the settings, as a list and Python numbers give."""
    prompts = [[1, 2, 3], [4, 5, 6]]
    want = dsv2_jax.generate(tiny, prompts, 3, temperature=0.7, top_k=5, top_p=0.9, seed=2)
    got = dsv2_jax.generate(tiny, np.array(prompts, np.int32), 3, temperature=np.float32(0.7), top_k=np.int64(5),
                            top_p=np.float64(0.9), seed=2)
    assert got == want
    with pytest.raises(ValueError, match="temperature"):
        dsv2_jax.generate(tiny, prompts, 3, temperature=True)


# ---------------------------------------------------------------------------------------------- sharding
def test_sharded_generation_equals_single_device(tmp_path):
    """8 fake devices: batch over data × expert (3 prompts padded to 4 rows), heads and MLP over tensor."""
    path = tmp_path
    save_hf_model(random_hf_model(seed=9), path)
    mesh = dsv2_jax.make_mesh(data=2, expert=2, tensor=2)
    single = dsv2_jax.from_hf(path, dtype=jnp.float32)
    sharded = dsv2_jax.from_hf(path, dtype=jnp.float32, mesh=mesh)
    prompts = random_prompts(160, seed=5)
    for kw in (dict(), dict(temperature=1.0, top_p=0.9, seed=3)):
        want = dsv2_jax.generate(single, prompts, 6, chunk_size=8, **kw)
        got = dsv2_jax.generate(sharded, prompts, 6, chunk_size=8, mesh=mesh, **kw)
        assert got == want, kw


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors(tiny):
    mpe = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dsv2_jax.generate(tiny, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dsv2_jax.generate(tiny, [[1] * (mpe - 2)], 4)
    with pytest.raises(ValueError, match="cache size max_len=8"):
        dsv2_jax.generate(tiny, [[1, 2, 3, 4, 5]], 4, max_len=8)
    with pytest.raises(ValueError, match="token id 512 outside the vocabulary"):
        dsv2_jax.generate(tiny, [[1, 512]], 4)
    with pytest.raises(ValueError, match="top_p"):
        dsv2_jax.generate(tiny, [[1, 2]], 4, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dsv2_jax.generate(tiny, [[1, 2]], 0)


# ---------------------------------------------------------------------------------------------- the CLI
def load_cli():
    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def word_tokenizer(path, vocab_size):
    """A word-level tokenizer.json: ids 0/1 are <bos>/<eos>, the rest words w2, w3, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<bos>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<bos>", "<eos>"])
    tok.save(os.path.join(path, "tokenizer.json"))


def test_cli_streams_the_generated_text(tmp_path, capsys):
    hf = random_hf_model(seed=4)
    save_hf_model(hf, tmp_path)
    word_tokenizer(tmp_path, hf.config.vocab_size)
    cli = load_cli()
    text = "w5 w17 w99 w3"
    cli.main(["--hf", str(tmp_path), "--prompt", text, "--max-new-tokens", "6", "--dtype", "float32"])
    captured = capsys.readouterr()
    out = captured.out
    model = dsv2_jax.from_hf(tmp_path, dtype=jnp.float32)
    tokens = dsv2_jax.generate(model, [[5, 17, 99, 3]], 6, eos_token_id=1)[0]
    words = " ".join(f"w{t}" for t in tokens if t > 1)
    assert words and words in out
    assert "prefill" in captured.err and "decode" in captured.err and "tokens/s" in captured.err


def test_cli_byte_level_from_a_checkpoint(tmp_path, tiny, capsys):
    dsv2_jax.save(tiny, tmp_path / "ckpt")
    cli = load_cli()
    cli.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "def f(", "--max-new-tokens", "7", "--dtype", "float32",
              "--ignore-eos"])
    tokens = dsv2_jax.generate(tiny, [list(b"def f(")], 7)[0]
    assert capsys.readouterr().out == ByteTokenizer().decode(tokens) + "\n"


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--top-p", "0.9"], "--temperature 0 \\(the default\\) is greedy"),
    (["--prompt-ids", "1 2", "--bos"], "with --prompt-ids put it in the ids")])
def test_cli_refuses_options_that_would_do_nothing(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        load_cli().main(["--ckpt", "unused"] + args)
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_cli_needs_a_tokenizer_for_text(tmp_path, capsys):
    save_hf_model(random_hf_model(seed=4), tmp_path)
    cli = load_cli()
    with pytest.raises(SystemExit) as e:
        cli.main(["--hf", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "2"])
    assert e.value.code != 0
    assert "tokenizer.json" in capsys.readouterr().err
