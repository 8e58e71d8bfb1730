"""Model behaviour that transformers cannot check: packing, moe_layer_freq, dtypes, parameter counts."""

import collections
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax import ModelConfig, count_params
from dsv2_jax.model import DeepseekV2, layer_runs

TINY = ModelConfig.from_preset("tiny")


def random_model(config, seed=0, **kw):
    return DeepseekV2(config, rngs=nnx.Rngs(seed), **kw)


@nnx.jit
def logits(model, ids, positions=None, segment_ids=None):
    return model(ids, positions, segment_ids)


def test_param_counts_of_released_configs():
    assert count_params(ModelConfig.from_preset("deepseek-v2")) == (235_741_434_880, 20_851_512_320)
    assert count_params(ModelConfig.from_preset("deepseek-v2-lite")) == (15_706_484_224, 2_451_435_008)


def test_packed_segments_equal_separate_sequences():
    config = TINY.replace(initializer_range=0.1)
    model = random_model(config)
    docs = np.random.default_rng(0).integers(0, config.vocab_size, (3, 8))
    n, length = docs.shape
    segs = np.repeat(np.arange(1, n + 1), length)[None]
    pos = np.tile(np.arange(length), n)[None]
    packed = np.asarray(logits(model, jnp.asarray(docs.reshape(1, -1)), jnp.asarray(pos), jnp.asarray(segs)))
    alone = np.asarray(logits(model, jnp.asarray(docs)))  # one document per row
    np.testing.assert_allclose(packed.reshape(alone.shape), alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


def test_document_mask_marks_runs_of_segment_ids():
    """DocumentMask.of: each run of equal segment ids is one document (padding included), and its mask equals a
    plain loop's: query i sees key j when j <= i and every token from j to i lies in i's run."""
    from dsv2_jax.attention import DocumentMask, causal_mask
    segments = np.asarray([[1, 1, 1, 2, 2, 0, 0, 0], [3] * 8, [1, 1, 2, 2, 1, 1, 4, 5]])
    documents = DocumentMask.of(jnp.asarray(segments))
    np.testing.assert_array_equal(documents.starts, [[0, 0, 0, 3, 3, 5, 5, 5], [0] * 8, [0, 0, 2, 2, 4, 4, 6, 7]])
    want = np.asarray([[[j <= i and (segments[b, j:i + 1] == segments[b, i]).all() for j in range(8)]
                        for i in range(8)] for b in range(3)])
    np.testing.assert_array_equal(documents.as_array(), want)
    np.testing.assert_array_equal(causal_mask(jnp.asarray(segments)), want)
    # contiguous ids: the same mask as equal ids below the diagonal
    same = (segments[:2, :, None] == segments[:2, None, :]) & np.tri(8, dtype=bool)
    np.testing.assert_array_equal(want[:2], same)


def test_layer_runs_follow_moe_layer_freq():
    c = TINY.replace(num_hidden_layers=7, first_k_dense_replace=1, moe_layer_freq=2)
    assert c.layer_kinds == ("dense", "dense", "moe", "dense", "moe", "dense", "moe")
    assert layer_runs(c) == [("dense", 0, 2), ("moe", 0, 1), ("dense", 2, 1), ("moe", 1, 1), ("dense", 3, 1),
                             ("moe", 2, 1)]
    assert layer_runs(TINY) == [("dense", 0, 1), ("moe", 0, 3)]


def test_interleaved_layers_run_in_config_order():
    """moe_layer_freq=2: the scanned stacks equal running each layer by hand in config order."""
    c = TINY.replace(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2, initializer_range=0.1)
    model = random_model(c)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (2, 9)))
    got = np.asarray(logits(model, ids))

    from dsv2_jax.attention import causal_mask
    from dsv2_jax.rope import rope_cos_sin

    @nnx.jit
    def layer_by_layer(model, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        cos, sin = rope_cos_sin(c, positions)
        mask = causal_mask(jnp.ones(ids.shape, jnp.int32))
        x = model.embed_tokens(ids)
        index = {"dense": 0, "moe": 0}
        for kind in c.layer_kinds:
            stack = model.moe_layers if kind == "moe" else model.dense_layers
            graphdef, state = nnx.split(stack)
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[index[kind]], state))
            x, _ = layer(x, cos, sin, mask)
            index[kind] += 1
        return jnp.einsum("bsd,dv->bsv", model.norm(x), model.lm_head[...])

    want = np.asarray(layer_by_layer(model, ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_unrolled_layers_equal_the_scan():
    """forward(scan=False) runs the stacks unrolled (no lax.scan left): same logits, routing and gradients, under
    remat too (one dense layer, then three MoE layers in one stack)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 8)))
    c = TINY.replace(initializer_range=0.1)
    graphdef, state = nnx.split(random_model(c))

    def loss(state, scan, remat):
        out = nnx.merge(graphdef, state).forward(ids, scan=scan, remat=remat)
        return out.logits.mean() + out.router.scores.var(), out

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    (_, want), g0 = run(state, True, "none")
    for remat in ("none", "save_dots"):
        (_, got), g = run(state, False, remat)
        for a, b in zip(jax.tree.leaves((got.logits, got.router)), jax.tree.leaves((want.logits, want.router))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    primitives = _primitive_counts(jax.make_jaxpr(lambda s: loss(s, False, "full"))(state).jaxpr)
    remat = jax.make_jaxpr(jax.checkpoint(lambda x: x))(1.0).eqns[0].primitive.name  # named per jax version
    assert primitives["scan"] == 0 and primitives[remat] == c.num_hidden_layers


def test_router_outputs_cover_every_moe_layer():
    model = random_model(TINY)
    out = nnx.jit(lambda m, ids: m.forward(ids))(model, jnp.zeros((2, 6), jnp.int32))
    L, T = TINY.num_moe_layers, 12
    assert out.router.experts.shape == (L, T, TINY.num_experts_per_tok)
    assert out.router.scores.shape == (L, T, TINY.num_experts)
    np.testing.assert_allclose(np.asarray(out.router.scores).sum(-1), 1.0, rtol=1e-5)


def test_embedding_gradient_sums_repeated_tokens_in_float32():
    """The embedding table's gradient equals a float64 sum of each token's rows rounded once to the table's dtype:
    for a bf16 table where one token fills half the batch (a bf16 running sum of its 2,048 rows would stop growing),
    and for a float32 table (1e-6)."""
    from dsv2_jax.layers import Embed

    rng = np.random.default_rng(0)
    V, D = 16, 8
    ids = np.where(rng.random((4, 1024)) < 0.5, 0, rng.integers(1, V, (4, 1024))).astype(np.int32)
    ct = rng.normal(0.01, 0.01, (4, 1024, D))  # mostly positive: the frequent token's sum is ~2,000 rows' size
    for dtype, rtol in ((jnp.bfloat16, 2.0 ** -8), (jnp.float32, 1e-6)):
        embed = Embed(V, D, std=0.02, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        d = jnp.asarray(ct, dtype)

        def loss(e):
            return jnp.sum(e(jnp.asarray(ids)).astype(jnp.float32) * d.astype(jnp.float32))

        got = nnx.grad(loss)(embed).embedding[...]
        assert got.dtype == dtype
        exact = np.zeros((V, D))
        np.add.at(exact, ids.reshape(-1), np.asarray(d, np.float64).reshape(-1, D))  # the rows as passed in dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=rtol, atol=1e-6 * np.abs(exact).max())


def test_bf16_compute_with_fp32_params_tracks_fp32():
    config = TINY.replace(initializer_range=0.05)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)))
    f32 = random_model(config)
    bf16 = random_model(config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert jax.tree.leaves(nnx.state(bf16, nnx.Param))[0].dtype == jnp.float32
    a, b = np.asarray(logits(f32, ids)), np.asarray(logits(bf16, ids))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() / np.abs(a).max() < 5e-2
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.9


def pallas_calls(f, *args, prefix: str) -> int:
    """How many Pallas kernels whose name starts with `prefix` the function runs on args."""
    return sum(e.primitive.name == "pallas_call" and str(e.params["name"]).startswith(prefix)
               for e in all_eqns(jax.make_jaxpr(f)(*args).jaxpr))


def all_eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (scan bodies, custom VJPs, remat) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from all_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from all_eqns(sub)


def _primitive_counts(jaxpr):
    return collections.Counter(eqn.primitive.name for eqn in all_eqns(jaxpr))


def test_save_dots_keeps_the_expert_products(monkeypatch):
    """Under save_dots the backward pass reuses the experts' grouped-matmul outputs: each layer's three products
    run once forward, and the backward adds only their input and weight gradients (six), as without remat; 'full'
    recomputes the three. Checked with the Pallas backend (its custom VJP, as on GPU) and with ragged_dot."""
    from dsv2_jax import grouped_matmul as gm
    c = TINY.replace(hidden_size=128, moe_intermediate_size=128, intermediate_size=128, num_hidden_layers=2)
    model = random_model(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((1, 16), jnp.int32)
    for backend, primitive in (("pallas", "pallas_call"), ("ragged_dot", "ragged_dot_general")):
        monkeypatch.setenv("DSV2_GROUPED_MATMUL", backend)
        gm._backend.cache_clear()
        for (remat, want), scan in itertools.product((("none", 9), ("full", 12), ("save_dots", 9)), (True, False)):
            def loss(state):
                out = nnx.merge(graphdef, state).forward(ids, remat=remat, scan=scan)
                return out.logits.astype(jnp.float32).mean()
            got = _primitive_counts(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)[primitive]
            assert got == want, (backend, remat, scan)
    gm._backend.cache_clear()


def test_save_dots_marks_the_expert_outputs_saved_in_scanned_stacks_only(monkeypatch):
    """grouped_matmul.outputs_saved() (on GPU, auto then differentiates the experts on the Pallas kernels, whose
    recomputation JAX drops inside a lax.scan where tokamax's is kept) holds while the experts' products are traced
    in scanned stacks under save_dots, and nowhere else: unrolled, tokamax's recomputation is dropped too."""
    from dsv2_jax import grouped_matmul as gm
    from dsv2_jax import moe
    seen, original = [], moe.grouped_matmul

    def spy(*args):
        seen.append(gm._OUTPUTS_SAVED.get())
        return original(*args)

    monkeypatch.setattr(moe, "grouped_matmul", spy)
    graphdef, state = nnx.split(random_model(TINY))
    ids = jnp.zeros((1, 8), jnp.int32)
    for remat, scan in itertools.product(("none", "full", "save_dots"), (True, False)):
        seen.clear()
        jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).forward(ids, remat=remat, scan=scan).logits)(state)
        assert seen and set(seen) == {remat == "save_dots" and scan}, (remat, scan, seen)


def _recomputing_flash(q, k, v, mask, causal, scale):
    """A CPU stand-in for tokamax's flash attention: a custom VJP with optimize_remat, whose residuals (the softmax
    weights) a remat policy that does not keep them recomputes by running the forward again. exp2 marks the
    forward (the model uses it nowhere else). The model hands it document ranges (a DocumentMask), not an array."""
    from dsv2_jax.attention import DocumentMask
    assert isinstance(mask, DocumentMask) and causal, (type(mask), causal)
    mask = mask.as_array()
    f32 = jnp.float32

    def fwd(q, k, v, mask):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) * scale
        s = jnp.where(mask[:, None], s, -jnp.inf)
        e = jnp.exp2((s - s.max(-1, keepdims=True)) * np.log2(np.e))
        p = e / e.sum(-1, keepdims=True)
        return jnp.einsum("bhqk,bkhv->bqhv", p, v.astype(f32)).astype(q.dtype), (q, k, v, p)

    def bwd(res, g):
        q, k, v, p = res
        dv = jnp.einsum("bhqk,bqhv->bkhv", p, g.astype(f32))
        dp = jnp.einsum("bqhv,bkhv->bhqk", g.astype(f32), v.astype(f32))
        ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
        dq, dk = jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(f32)), jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(f32))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

    attend = jax.custom_vjp(lambda q, k, v, mask: fwd(q, k, v, mask)[0])
    attend.defvjp(fwd, bwd, optimize_remat=True)
    return attend(q, k, v, mask)


def test_save_dots_keeps_the_flash_kernels_output(monkeypatch):
    """With a flash kernel (DSV2_ATTENTION=tokamax; here a stand-in with tokamax's kind of VJP), save_dots keeps
    the kernel's output and residuals (attention.flash_attention): its forward runs once per layer in a
    differentiated step, as without remat, where 'full' runs it twice. Gradients equal the XLA path's (fp32,
    1e-5), unrolled and scanned."""
    from dsv2_jax import attention
    from dsv2_jax.layers import kernel_backend
    monkeypatch.setattr(attention, "tokamax_attention", _recomputing_flash)
    c = TINY.replace(initializer_range=0.1, num_hidden_layers=2)  # a dense layer, then a MoE layer
    graphdef, state = nnx.split(random_model(c))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 8)))
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]])

    def loss(state, remat, scan):
        return nnx.merge(graphdef, state).forward(ids, segment_ids=segments, remat=remat, scan=scan).logits.mean()

    try:
        monkeypatch.setenv("DSV2_ATTENTION", "xla")
        kernel_backend.cache_clear()
        grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
        want = grad(state, "none", True)
        monkeypatch.setenv("DSV2_ATTENTION", "tokamax")
        kernel_backend.cache_clear()
        for remat, per_layer, scan in (("save_dots", 1, False), ("full", 2, False), ("save_dots", 1, True)):
            traced = grad.trace(state, remat, scan)
            layers = len(layer_runs(c)) if scan else c.num_hidden_layers  # a scan's body holds one layer
            assert _primitive_counts(traced.jaxpr.jaxpr)["exp2"] == per_layer * layers, (remat, scan)
            for a, b in zip(jax.tree.leaves(traced.lower().compile()(state)), jax.tree.leaves(want)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    finally:
        monkeypatch.undo()
        kernel_backend.cache_clear()


def _attention_reference(q, k, v, mask, scale):
    """Softmax attention in float32 where the bool mask [B, Sq, Sk] allows (or a DocumentMask's array)."""
    from dsv2_jax.attention import DocumentMask
    mask = mask.as_array() if isinstance(mask, DocumentMask) else mask
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    s = jnp.einsum("bqhd,bkhd->bhqk", f32[0], f32[1], precision="highest") * scale
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), -1)
    return jnp.einsum("bhqk,bkhv->bqhv", p, f32[2], precision="highest")


def test_padded_to_blocks_keeps_the_output_and_gradients():
    """A flash kernel's sequence padded to whole blocks (attention.padded_to_blocks) gives the unpadded output and
    gradients of q, k and v (fp32, 1e-6), with document ranges (padding tokens among them, rows of one document)
    and with a mask array; the kernel sees whole blocks, and rows of one document stay all-zero starts (the
    causal-only backward); whole-block sequences go through untouched."""
    from dsv2_jax.attention import DocumentMask, padded_to_blocks
    B, S, H, scale = 2, 13, 2, 0.3
    q, k, v, g = (jax.random.normal(key, (B, S, H, d), jnp.float32)
                  for key, d in zip(jax.random.split(jax.random.key(1), 4), (6, 6, 4, 4)))
    documents = DocumentMask.of(jnp.asarray([[1] * 5 + [2] * 6 + [0] * 2, [3] * S]))
    one_document = DocumentMask.of(jnp.ones((B, S), jnp.int32))
    lengths, starts = [], []

    def kernel(q, k, v, mask, causal, scale):
        assert causal
        lengths.append(q.shape[1])
        if isinstance(mask, DocumentMask):
            starts.append(mask.starts)
        return _attention_reference(q, k, v, mask, scale)

    def grads(attend, mask):
        out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
        return out, *pullback(g)

    for mask in (documents, documents.as_array(), one_document):
        want = grads(lambda q, k, v, m: _attention_reference(q, k, v, m, scale), mask)
        got = grads(lambda q, k, v, m: padded_to_blocks(kernel, q, k, v, m, True, scale, block=8), mask)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert lengths == [16, 16, 16]
    assert starts[-1].shape == (B, 16) and not np.asarray(starts[-1]).any()
    padded_to_blocks(kernel, q, k, v, documents, True, scale, block=S)
    assert lengths[-1] == S


def test_tokamax_attention_on_short_sequences():
    """On a GPU with tokamax: sequences shorter than, or not a whole number of, the kernels' blocks (one row of 16
    tokens, two of 100) give finite gradients within bf16 rounding of a float32 reference, with document ranges and
    with a mask array, and with rows of one document (the causal-only backward). tokamax's backward kernels read
    past such a sequence's end (attention.padded_to_blocks). Prefill's shape, 32 queries over a window of 100 keys
    with a mask array, goes unpadded (its forward pads the keys itself) and gives the reference's output."""
    import pytest
    pytest.importorskip("tokamax")
    if jax.default_backend() != "gpu":
        pytest.skip("tokamax's flash kernels run on GPUs")
    from dsv2_jax.attention import DocumentMask, tokamax_attention
    scale = 192 ** -0.5
    for B, S in ((1, 16), (2, 100)):
        q, k, v, g = (jax.random.normal(key, (B, S, 4, d), jnp.bfloat16)
                      for key, d in zip(jax.random.split(jax.random.key(S), 4), (192, 192, 128, 128)))
        segments = np.ones((B, S), np.int32)
        segments[:, S // 2:] = 2
        segments[-1, 3 * S // 4:] = 0
        for documents in (DocumentMask.of(jnp.asarray(segments)), DocumentMask.of(jnp.ones((B, S), jnp.int32))):
            out, pullback = jax.vjp(lambda q, k, v: _attention_reference(q, k, v, documents, scale), q, k, v)
            want = (out, *pullback(g.astype(jnp.float32)))
            for mask in (documents, documents.as_array()):
                out, pullback = jax.vjp(lambda q, k, v: tokamax_attention(q, k, v, mask, True, scale), q, k, v)
                for a, b in zip((out, *pullback(g)), want):
                    a, b = np.asarray(a, np.float32), np.asarray(b)
                    assert np.isfinite(a).all(), (B, S)
                    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2, (B, S)
    slots = 64 + jnp.arange(32)  # a prefill chunk's queries at slots 64..95 over a window of 100 keys
    mask = (jnp.arange(100) <= slots[:, None])[None]
    q, k, v = (jax.random.normal(key, (2, n, 4, d), jnp.bfloat16)
               for key, n, d in zip(jax.random.split(jax.random.key(7), 3), (32, 100, 100), (192, 192, 128)))
    want = _attention_reference(q, k, v, mask, scale)
    got = np.asarray(tokamax_attention(q, k, v, mask, False, scale), np.float32)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_tokamax_takes_document_ranges():
    """On a GPU with tokamax: the model's document ranges (a DocumentMask: the kernel's per-query key start) give
    the attention and its gradients of the [B, S, S] mask array, within bf16 rounding of each other and of a
    float32 reference; so do they where every row is one document (the backward then runs tokamax's causal-only
    kernels, which `test_key_ranges_backward_takes_the_causal_kernels_for_one_document_rows` checks on CPU)."""
    import pytest
    pytest.importorskip("tokamax")
    if jax.default_backend() != "gpu":
        pytest.skip("tokamax's flash kernels run on GPUs")
    from dsv2_jax.attention import DocumentMask, _tokamax_key_ranges, tokamax_attention
    B, S, H = 2, 512, 2
    q, k, v, g = (jax.random.normal(key, (B, S, H, d), jnp.bfloat16)
                  for key, d in zip(jax.random.split(jax.random.key(0), 4), (192, 192, 128, 128)))
    documents = DocumentMask.of(jnp.asarray([[1] * 100 + [2] * 300 + [0] * 112, [5] * S]))
    scale = 192 ** -0.5

    def attention(q, k, v, mask):  # the output and the gradients of q, k, v under the cotangent g
        out, pullback = jax.vjp(lambda q, k, v: tokamax_attention(q, k, v, mask, True, scale), q, k, v)
        return out, pullback(g)

    reference = functools.partial(_attention_reference, scale=scale)

    traced = jax.make_jaxpr(attention)(q, k, v, documents).jaxpr  # the ranges reach the kernel: no [B, S, S] array
    assert not any(v.aval.shape[-2:] == (S, S) for e in all_eqns(traced) for v in e.outvars), "a mask array was built"
    ranges = jax.jit(attention)(q, k, v, documents)
    array = jax.jit(attention)(q, k, v, documents.as_array())
    out, pullback = jax.vjp(lambda q, k, v: reference(q, k, v, documents.as_array()), q, k, v)
    want = (out, pullback(g.astype(jnp.float32)))
    rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)) / np.linalg.norm(
        np.asarray(b, np.float32))
    for a, b, c in zip(jax.tree.leaves(ranges), jax.tree.leaves(array), jax.tree.leaves(want)):
        assert rel(a, c) < 1e-2 and rel(b, c) < 1e-2 and rel(a, b) < 5e-3, (rel(a, c), rel(b, c), rel(a, b))

    # Every row one document: the backward takes tokamax's causal-only kernels (bench/RESULTS.md §16: bit for bit).
    Mask, op = _tokamax_key_ranges()

    def causal_only(q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: op(q, k, v, mask=Mask(is_causal=True), logits_scale=scale), q, k, v)
        return out, pullback(g)

    one = DocumentMask.of(jnp.ones((B, S), jnp.int32))
    ranges = jax.jit(attention)(q, k, v, one)
    causal = jax.jit(causal_only)(q, k, v)
    out, pullback = jax.vjp(lambda q, k, v: reference(q, k, v, one.as_array()), q, k, v)
    for a, b, c in zip(jax.tree.leaves(ranges), jax.tree.leaves(causal),
                       jax.tree.leaves((out, pullback(g.astype(jnp.float32))))):
        assert rel(a, c) < 1e-2 and rel(b, c) < 1e-2 and rel(a, b) < 5e-3, (rel(a, c), rel(b, c), rel(a, b))


def test_key_ranges_backward_takes_the_causal_kernels_for_one_document_rows():
    """The key ranges' backward (`_key_ranges_vjp`, with stand-ins for tokamax's Mask and VJP op): causal-only
    kernels exactly when every row of the batch is one document (all key starts 0), the ranges otherwise, and
    any other mask passed through unchanged."""
    import dataclasses

    from dsv2_jax.attention import DocumentMask, _key_ranges_vjp

    @dataclasses.dataclass(frozen=True)
    class Mask:  # the fields of tokamax's Mask that _key_ranges_vjp reads
        k_start: jnp.ndarray | None = None
        is_causal: bool = False
        k_end: jnp.ndarray | None = None
        bool_mask = q_start = q_end = None

    def vjp(residuals, out, d_out, q, *, mask, logits_scale):  # which kernels ran: 0 causal only, 1 ranges
        assert logits_scale == 0.5
        return q * 0 + (0.0 if mask.k_start is None and mask.is_causal else 1.0)

    def kernels(mask):
        return _key_ranges_vjp(Mask, vjp, None, None, None, jnp.zeros(3), mask=mask, logits_scale=0.5)

    @jax.jit
    def documents(segment_ids):  # the model's ranges, decided on the device
        return kernels(Mask(k_start=DocumentMask.of(segment_ids).starts[:, None, :], is_causal=True))

    assert documents(jnp.ones((2, 8), jnp.int32)).tolist() == [0.0] * 3  # one document per row
    assert documents(jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])).tolist() == [1.0] * 3  # padding: a second range
    assert documents(jnp.asarray([[1] * 8, [1] * 3 + [2] * 5])).tolist() == [1.0] * 3  # two documents in one row
    starts = jnp.zeros((2, 1, 8), jnp.int32)
    assert kernels(Mask(k_start=starts)).tolist() == [1.0] * 3  # ranges without the causal hint: passed through
    assert kernels(Mask(k_start=starts, is_causal=True, k_end=starts + 1)).tolist() == [1.0] * 3  # with key ends too


def test_remat_policies_do_not_change_gradients():
    model = random_model(TINY)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 8)))

    def loss(state, remat):
        return nnx.merge(graphdef, state).forward(ids, remat=remat).logits.mean()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g0 = grad(state, "none")
    for remat in ("full", "save_dots"):
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(grad(state, remat))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
