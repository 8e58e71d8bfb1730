"""Router and grouped experts against plain loops."""

import collections
import contextlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import ModelConfig
from dsv2_jax.moe import dropless_experts, route

TINY = ModelConfig.from_preset("tiny")


def reference_route(scores, c):
    """Straight from REFERENCE.md, one token at a time."""
    E, G, K = c.num_experts, c.num_groups, c.num_experts_per_tok
    weights, experts = [], []
    for s in scores:
        s = s.copy()
        if c.topk_method == "group_limited_greedy":
            group_max = s.reshape(G, E // G).max(axis=1)
            keep = np.argsort(-group_max, kind="stable")[: c.topk_group]
            for g in range(G):
                if g not in keep:
                    s[g * (E // G):(g + 1) * (E // G)] = 0.0
        idx = np.argsort(-s, kind="stable")[:K]
        w = s[idx]
        if c.norm_topk_prob and K > 1:
            w = w / (w.sum() + 1e-20)
        else:
            w = w * c.routed_scaling_factor
        weights.append(w)
        experts.append(idx)
    return np.array(weights), np.array(experts)


@pytest.mark.parametrize("overrides", [
    dict(topk_method="greedy", n_group=1, topk_group=1),
    dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3),
    dict(topk_method="group_limited_greedy", n_group=8, topk_group=3, num_experts_per_tok=3, norm_topk_prob=True),
    dict(topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=16.0, num_experts_per_tok=1),
])
def test_router_matches_reference(overrides):
    c = TINY.replace(**overrides)
    logits = np.random.default_rng(1).normal(size=(256, c.num_experts)).astype(np.float32) * 2
    r = route(c, jnp.asarray(logits))
    scores = np.asarray(jax.nn.softmax(logits, axis=-1))
    np.testing.assert_allclose(np.asarray(r.scores), scores, rtol=1e-6)
    want_w, want_e = reference_route(scores, c)
    np.testing.assert_array_equal(np.asarray(r.experts), want_e)
    np.testing.assert_allclose(np.asarray(r.weights), want_w, rtol=1e-6)
    if c.topk_method == "group_limited_greedy":  # every token's experts lie in at most topk_group groups
        groups = np.asarray(r.experts) // (c.num_experts // c.num_groups)
        assert max(len(set(g)) for g in groups) <= c.topk_group


def test_grouped_experts_match_per_expert_loop():
    rng = np.random.default_rng(0)
    T, D, I, E, K = 50, 16, 8, 6, 3
    x = rng.normal(size=(T, D)).astype(np.float32)
    gate, up = (rng.normal(size=(E, D, I)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(E, I, D)).astype(np.float32)
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    experts[:10] = [0, 1, 2]  # an expert nobody picks (5 for the first rows) and uneven groups
    weights = rng.uniform(size=(T, K)).astype(np.float32)

    from dsv2_jax.moe import RouterOutput
    r = RouterOutput(jnp.asarray(weights), jnp.asarray(experts), jnp.zeros((T, E)))
    got = np.asarray(dropless_experts(jnp.asarray(x), r, jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down)))

    def silu(v):
        return v / (1 + np.exp(-v))

    want = np.zeros((T, D), np.float64)
    for e in range(E):
        for t in range(T):
            for k in range(K):
                if experts[t, k] == e:
                    h = silu(x[t] @ gate[e]) * (x[t] @ up[e])
                    want[t] += weights[t, k] * (h @ down[e])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_grouped_expert_gradients_in_bf16_match_fp32_loop():
    """Gradients of the routed experts (x, gate, up, down) through the grouped matmul's backward products, in bf16
    at the sizes that take the tuned tokamax kernels on a Hopper GPU (ragged_dot elsewhere), with experts getting
    ~1900, ~1900, ~230 and ~60 rows (fewer than a tile), against a float32 per-expert loop on the same bf16
    values: within bf16 rounding (2e-2 of the largest entry)."""
    rng = np.random.default_rng(3)
    T, D, I, E, K = 2048, 128, 128, 4, 2
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    x = bf(rng.normal(size=(T, D)))
    gate, up = bf(rng.normal(size=(E, D, I)) / 8), bf(rng.normal(size=(E, D, I)) / 8)
    down = bf(rng.normal(size=(E, I, D)) / 8)
    experts = np.stack([rng.choice(E, K, replace=False, p=[0.5, 0.45, 0.04, 0.01]) for _ in range(T)])
    experts = jnp.asarray(experts, jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(T, K)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)

    from dsv2_jax.moe import RouterOutput
    r = RouterOutput(weights, experts, jnp.zeros((T, E)))

    def grouped(x, gate, up, down):
        return jnp.sum(dropless_experts(x, r, gate, up, down).astype(jnp.float32) * cotangent)

    def loop(x, gate, up, down):
        y = jnp.zeros((T, D), jnp.float32)
        for e in range(E):
            h = jax.nn.silu(x @ gate[e]) * (x @ up[e])
            w_e = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=1)
            y = y + w_e[:, None] * (h @ down[e])
        return jnp.sum(y * cotangent)

    got = jax.jit(jax.grad(grouped, (0, 1, 2, 3)))(x, gate, up, down)
    f32 = [a.astype(jnp.float32) for a in (x, gate, up, down)]
    want = jax.jit(jax.grad(lambda *a: loop(*a), (0, 1, 2, 3)))(*f32)
    for name, g, w in zip(("x", "gate", "up", "down"), got, want):
        err = np.abs(np.asarray(g, np.float32) - np.asarray(w)).max()
        assert err <= 2e-2 * np.abs(np.asarray(w)).max(), (name, err)


GROUPED_SIZES = [
    [0, 1, 63, 129, 1000, 0, 3000, 32],  # 4224 rows: whole tiles; empty and one-row experts
    [2, 0, 5, 1, 4092, 0, 0, 0],  # 4100 rows: not whole tiles
    [0, 6, 0, 0, 0, 0, 6, 0],  # 12 rows (decoding two tokens)
    [0, 0, 0, 6, 0, 0, 0, 0],  # 6 rows (decoding one token)
]


def _grouped_products(f, x, w, dy):
    """(output, input gradient, weight gradient) of f(x, w) for the output cotangent dy."""
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


@pytest.mark.parametrize("path", ["grouped_matmul", "outputs_saved", "pallas", "mosaic"])
@pytest.mark.parametrize("sizes", GROUPED_SIZES)
def test_grouped_matmul_bf16_products_match_fp32(sizes, path):
    """All three products of the grouped matmul (output, input gradient, weight gradient) in bf16 against the
    float32 products of the same bf16 values: within bf16 rounding, 1e-2 relative (Frobenius) error, and each
    group's weight gradient within 1e-2 of its own norm (exact zeros for an empty group), so that a wrong small group
    cannot hide in a large one's norm. On a GPU these run the kernels `grouped_matmul` picks there (tokamax's forward
    kernels with the Pallas weight gradient at these few rows a group, or the Pallas kernels; under `outputs_saved`,
    tokamax undifferentiated and Pallas differentiated), for path "pallas" the Pallas kernels themselves (interpreted
    on CPU), and for path "mosaic" (GPU with tokamax only) tokamax's kernels with jax's Mosaic weight gradient, which
    they take from 2,048 rows a group; a weight-gradient kernel that is a few percent off, as tokamax's default tiles
    were, fails here."""
    rng = np.random.default_rng(5)
    M, K, N = sum(sizes), 256, 128
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    x, w, dy = bf(rng.normal(size=(M, K))), bf(rng.normal(size=(len(sizes), K, N))), bf(rng.normal(size=(M, N)))
    gs = jnp.asarray(sizes, jnp.int32)
    from dsv2_jax import grouped_matmul as gm

    f = {"pallas": gm._pallas_grouped_matmul, "mosaic": gm._with_vjp(
        gm._tokamax_product, product_weight_gradient=gm._mosaic_weight_gradient)}.get(path, gm.grouped_matmul)
    if path == "mosaic" and (jax.default_backend() != "gpu" or gm._tokamax_ragged_dots() is None):
        pytest.skip("tokamax's and jax's Mosaic GPU kernels run on Hopper GPUs only")
    with gm.outputs_saved() if path == "outputs_saved" else contextlib.nullcontext():  # GPU: tokamax + Pallas
        got = jax.jit(lambda *a: _grouped_products(lambda x, w: f(x, w, gs), *a))(x, w, dy)
    want = jax.jit(lambda *a: _grouped_products(
        lambda x, w: jax.lax.ragged_dot(x, w, gs, precision="highest"), *a))(
        *(a.astype(jnp.float32) for a in (x, w, dy)))
    for name, g, r in zip(("output", "input gradient", "weight gradient"), got, want):
        g, r = np.asarray(g, np.float32), np.asarray(r)
        err = np.linalg.norm(g - r) / np.linalg.norm(r)
        assert err < 1e-2, (name, err)
    for group, (n, g, r) in enumerate(zip(sizes, np.asarray(got[2], np.float32), np.asarray(want[2]))):
        if n == 0:
            assert not g.any(), ("empty group's weight gradient", group)
        else:
            assert np.linalg.norm(g - r) < 1e-2 * np.linalg.norm(r), ("weight gradient", group, n)


@pytest.mark.parametrize("sizes,extra_rows", [(GROUPED_SIZES[0], 0), (GROUPED_SIZES[1], 37), (GROUPED_SIZES[3], 3),
                                              ([0] * 8, 5)])
def test_pallas_grouped_matmul_matches_loop(sizes, extra_rows):
    """The Pallas kernels (`ragged_matmul` forward and input gradient, `weight_gradient`), joined by their custom
    VJP, against a per-group numpy loop in float32 (1e-5 relative): empty groups, one-row groups, groups sharing a
    row block, rows past the groups (zeros out, no weight gradient). The kernels run in Pallas's interpreter (CPU);
    on a GPU they are compiled for bf16 only, which the test above checks there."""
    from dsv2_jax import grouped_matmul as gm

    if jax.default_backend() == "gpu":
        pytest.skip("float32 tiles of this size do not fit a GPU's shared memory; the bf16 test covers the GPU")

    rng = np.random.default_rng(6)
    G, K, N = len(sizes), 256, 128
    M = sum(sizes) + extra_rows
    x, w, dy = (rng.normal(size=s).astype(np.float32) for s in ((M, K), (G, K, N), (M, N)))
    ends = np.cumsum(sizes)
    y_want, dx_want, dw_want = np.zeros((M, N)), np.zeros((M, K)), np.zeros((G, K, N))
    for g, (n, e) in enumerate(zip(sizes, ends)):
        rows = slice(e - n, e)
        y_want[rows] = x[rows] @ w[g]
        dx_want[rows] = dy[rows] @ w[g].T
        dw_want[g] = x[rows].T @ dy[rows]
    gs = jnp.asarray(sizes, jnp.int32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda *a: _grouped_products(lambda x, w: gm._pallas_grouped_matmul(x, w, gs), *a))(x, w, dy)
    for name, g, want in zip(("output", "input gradient", "weight gradient"), got, (y_want, dx_want, dw_want)):
        g = np.asarray(g)
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * max(np.abs(want).max(), 1.0), err_msg=name)


def test_permutation_gathers_match_autodiff():
    """gather_copies / permute_rows / combine_copies (custom VJPs that gather where autodiff scatters) against plain
    indexing and its autodiff, in float32."""
    from dsv2_jax.moe import combine_copies, gather_copies, inverse_permutation, permute_rows

    rng = np.random.default_rng(7)
    T, K, D = 5, 3, 4
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    order = jnp.asarray(rng.permutation(T * K), jnp.int32)
    inv = inverse_permutation(order)
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(inv)], np.arange(T * K))
    d = jnp.asarray(rng.normal(size=(T * K, D)), jnp.float32)
    for ours, plain, arg in ((lambda a: gather_copies(a, order, inv, K), lambda a: a[order // K], x),
                             (lambda a: permute_rows(a, order, inv), lambda a: a[order], d)):
        y, vjp = jax.vjp(ours, arg)
        y_want, vjp_want = jax.vjp(plain, arg)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_want))
        np.testing.assert_allclose(np.asarray(vjp(d)[0]), np.asarray(vjp_want(d)[0]), rtol=1e-6, atol=1e-6)

    # combine_copies: the sorted rows weighted back into their tokens, against permuting them back and an einsum
    weights = jnp.asarray(rng.uniform(size=(T, K)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    y, vjp = jax.vjp(lambda a, w: combine_copies(a, w, order, inv), d, weights)
    y_want, vjp_want = jax.vjp(lambda a, w: jnp.einsum("tkd,tk->td", a[inv].reshape(T, K, D), w), d, weights)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_want), rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(dy), vjp_want(dy)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_grouped_matmul_vjp_runs_the_differentiated_product_under_differentiation():
    """_with_vjp(product, differentiated): an undifferentiated call runs `product`; under differentiation the
    forward and the input gradient run `differentiated` (how auto pairs tokamax with the Pallas kernels inside
    outputs_saved()). Here product = jax.lax.ragged_dot, differentiated = the Pallas kernels (interpreted off GPU)."""
    from dsv2_jax import grouped_matmul as gm
    from test_model import _primitive_counts, all_eqns

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(40, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 128, 128)), jnp.bfloat16)
    gs = jnp.asarray([10, 0, 30], jnp.int32)
    f = gm._with_vjp(lambda a, b, g, t: jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2) if t else b, g),
                     gm._pallas_product)
    primal = _primitive_counts(jax.make_jaxpr(f)(x, w, gs).jaxpr)
    assert primal["ragged_dot_general"] == 1 and primal["pallas_call"] == 0
    grad = jax.make_jaxpr(jax.grad(lambda x, w: f(x, w, gs).astype(jnp.float32).sum(), (0, 1)))(x, w)
    names = collections.Counter(str(e.params["name"]) for e in all_eqns(grad.jaxpr)
                                if e.primitive.name == "pallas_call")
    assert names == {"grouped_matmul": 2, "grouped_matmul_weight_gradient": 1}, names
    assert _primitive_counts(grad.jaxpr)["ragged_dot_general"] == 0


def test_grouped_matmul_backend_choice(monkeypatch):
    """DSV2_GROUPED_MATMUL: auto is ragged_dot off GPU; a forced backend is taken, under outputs_saved() too; a bad
    value or tokamax where it does not import is a clear error."""
    from dsv2_jax import grouped_matmul as gm

    choose = gm._backend.__wrapped__
    monkeypatch.setenv("DSV2_GROUPED_MATMUL", "auto")
    if jax.default_backend() == "gpu":
        tokamax = gm._tokamax_ragged_dots() is not None
        assert choose() == ("tokamax" if tokamax else "pallas")
        assert choose(outputs_saved=True) == ("tokamax+pallas" if tokamax else "pallas")
    else:
        assert choose() == choose(outputs_saved=True) == "ragged_dot"
    monkeypatch.setenv("DSV2_GROUPED_MATMUL", "pallas")
    assert choose() == choose(outputs_saved=True) == "pallas"
    monkeypatch.setenv("DSV2_GROUPED_MATMUL", "cutlass")
    with pytest.raises(ValueError, match="DSV2_GROUPED_MATMUL must be one of"):
        choose()
    if gm._tokamax_ragged_dots() is None:
        monkeypatch.setenv("DSV2_GROUPED_MATMUL", "tokamax")
        with pytest.raises(ValueError, match="does not import here"):
            choose()


def test_mosaic_weight_gradient_pads_rows_and_falls_back(monkeypatch):
    """_mosaic_weight_gradient's choice, with a stand-in for jax's Mosaic GPU kernel (GPU-only; its results are
    checked on a GPU by test_grouped_matmul_bf16_products_match_fp32): rows padded with zeros to a multiple of 8 and
    the output gradient cast to the rows' dtype; widths that are not whole tiles, or no such kernel in this jax, go
    to the Pallas kernel, and so do fewer than MOSAIC_WEIGHT_GRADIENT_MIN_ROWS rows a group beside tokamax. Where
    jax ships the kernel's module, its signature is the one this library calls."""
    from dsv2_jax import grouped_matmul as gm

    if importlib.util.find_spec("jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu") is not None:
        assert gm._mosaic_transposed_ragged_dot.__wrapped__() is not None
    calls = []

    def op(lhs, rhs, *, group_sizes, **tiles):
        calls.append((lhs.shape, rhs.dtype, np.asarray(lhs[-1]), tiles))
        return jnp.zeros((group_sizes.shape[0], lhs.shape[1], rhs.shape[1]), lhs.dtype)

    def pallas(lhs, dout, group_sizes):
        calls.append(("pallas", lhs.shape))
        return jnp.zeros((group_sizes.shape[0], lhs.shape[1], dout.shape[1]), lhs.dtype)

    monkeypatch.setattr(gm, "_pallas_weight_gradient", pallas)
    gs = jnp.asarray([3, 0, 10], jnp.int32)
    x, dy = jnp.ones((13, 256), jnp.bfloat16), jnp.ones((13, 128), jnp.float32)
    monkeypatch.setattr(gm, "_mosaic_transposed_ragged_dot", lambda: op)
    assert gm._mosaic_weight_gradient(x, dy, gs).shape == (3, 256, 128)
    (shape, dtype, last_row, tiles), = calls
    assert shape == (16, 256) and dtype == jnp.bfloat16 and not last_row.any()
    assert tiles == gm.MOSAIC_WEIGHT_GRADIENT_TILES
    calls.clear()
    gm._tokamax_weight_gradient(x, dy, gs)  # 13 rows over 3 groups: below MOSAIC_WEIGHT_GRADIENT_MIN_ROWS a group
    many = 3 * gm.MOSAIC_WEIGHT_GRADIENT_MIN_ROWS
    gm._tokamax_weight_gradient(jnp.ones((many, 256), jnp.bfloat16), jnp.ones((many, 128), jnp.bfloat16), gs)
    assert [c[0] for c in calls] == ["pallas", (many, 256)]
    calls.clear()
    gm._mosaic_weight_gradient(jnp.ones((13, 192), jnp.bfloat16), dy, gs)  # 192 columns: not whole tiles
    monkeypatch.setattr(gm, "_mosaic_transposed_ragged_dot", lambda: None)
    gm._mosaic_weight_gradient(x, dy, gs)
    assert calls == [("pallas", (13, 192)), ("pallas", (13, 256))]


def test_tokamax_products_take_the_transposed_kernel_for_large_input_gradients(monkeypatch):
    """_tokamax_product's choice, with stand-ins for tokamax's ops and the transposed-rhs kernel (both GPU-only; their
    results are checked on a GPU by test_grouped_matmul_bf16_products_match_fp32): from 4,096 rows an input gradient
    (rhs transposed) whose widths are whole tiles runs on `_transposed_rhs_product`, rows padded to whole tiles and
    cut back after; other shapes and the forward go to tokamax's small or large op."""
    from dsv2_jax import grouped_matmul as gm

    calls = []

    class Op:
        def __init__(self, name):
            self.name, self.config = name, types.SimpleNamespace(block_n=128, block_k=64)

        def __call__(self, lhs, rhs, group_sizes, ragged_dot_dimension_numbers, preferred_element_type):
            transposed = tuple(ragged_dot_dimension_numbers.dot_dimension_numbers[0][1]) == (2,)
            calls.append((self.name, lhs.shape[0], transposed))
            return jnp.zeros((lhs.shape[0], rhs.shape[1] if transposed else rhs.shape[2]), lhs.dtype)

    def transposed(lhs, rhs, group_sizes, config):
        calls.append(("transposed", lhs.shape[0], config.block_n))
        return jnp.zeros((lhs.shape[0], rhs.shape[1]), lhs.dtype)

    monkeypatch.setattr(gm, "_tokamax_ragged_dots", lambda: (Op("small"), Op("large")))
    monkeypatch.setattr(gm, "_transposed_rhs_product", transposed)
    gs = jnp.zeros(8, jnp.int32)
    for M, rhs, transpose, want in ((4100, (8, 256, 128), True, ("transposed", 4224, 128)),
                                    (4096, (8, 200, 128), True, ("large", 4096, True)),  # 200 columns: not whole tiles
                                    (100, (8, 256, 128), True, ("small", 128, True)),
                                    (5000, (8, 128, 256), False, ("large", 5120, False))):
        out = gm._tokamax_product(jnp.ones((M, rhs[2] if transpose else rhs[1]), jnp.bfloat16),
                                  jnp.ones(rhs, jnp.bfloat16), gs, transpose)
        assert calls.pop() == want and out.shape == (M, rhs[1] if transpose else rhs[2])


@pytest.mark.parametrize("sizes", GROUPED_SIZES[:2])
def test_transposed_rhs_kernel_gives_tokamax_ops_bits(sizes):
    """GPU with tokamax: the input gradient on `_transposed_rhs_product` (what `_tokamax_product` runs from 4,096
    rows) equals, bit for bit on every row inside the groups, tokamax's own op with the weights transposed by XLA
    (the path it replaced): empty, one-row and sub-tile groups, and rows not a whole number of tiles."""
    from dsv2_jax import grouped_matmul as gm

    if jax.default_backend() != "gpu" or gm._tokamax_ragged_dots() is None:
        pytest.skip("tokamax's Hopper kernels need a GPU and tokamax")
    rng = np.random.default_rng(7)
    M, K, N = sum(sizes) + 3, 128, 256  # three rows past the groups
    dout = jnp.asarray(rng.normal(size=(M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(len(sizes), N, K)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    pad = -M % 128
    want = gm._tokamax_ragged_dots()[1](jnp.pad(dout, ((0, pad), (0, 0))), w, group_sizes=gs,
                                         ragged_dot_dimension_numbers=dims, preferred_element_type=dout.dtype)[:M]
    got = jax.jit(lambda d, w, g: gm._tokamax_product(d, w, g, True))(dout, w, gs)
    rows = sum(sizes)
    np.testing.assert_array_equal(np.asarray(got[:rows], np.float32), np.asarray(want[:rows], np.float32))


def test_kernel_backends_name_the_paths_taken(monkeypatch):
    """layers.kernel_backends (what the benchmarks record) reports the attention and grouped-matmul paths: the
    CPU defaults, and forced choices."""
    from dsv2_jax import grouped_matmul as gm
    from dsv2_jax.layers import kernel_backend, kernel_backends

    def fresh():
        gm._backend.cache_clear()
        kernel_backend.cache_clear()

    try:
        for attention, grouped in (("auto", "auto"), ("xla", "pallas"), ("tokamax", "ragged_dot")):
            monkeypatch.setenv("DSV2_ATTENTION", attention)
            monkeypatch.setenv("DSV2_GROUPED_MATMUL", grouped)
            fresh()
            want = ({"attention": "xla", "grouped_matmul": "ragged_dot"} if grouped == "auto"
                    else {"attention": attention, "grouped_matmul": grouped})
            if grouped != "auto" or jax.default_backend() != "gpu":
                assert kernel_backends() == want
    finally:
        monkeypatch.undo()
        fresh()


def test_a_broken_tokamax_install_warns(monkeypatch, tmp_path):
    """tokamax installed but failing to import (here: a missing dependency of its own) is a warning naming the
    error, and the grouped matmul falls back; tokamax not installed at all is silent."""
    import warnings

    from dsv2_jax import grouped_matmul as gm

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where it is not installed
        if importlib.util.find_spec("tokamax") is None:
            assert gm._tokamax_ragged_dots.__wrapped__() is None
    (tmp_path / "tokamax").mkdir()
    (tmp_path / "tokamax" / "__init__.py").write_text("import fire_not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "tokamax" or m.startswith("tokamax.")]:
        monkeypatch.delitem(sys.modules, name)  # where tokamax is installed and imported already (a GPU run)
    with pytest.warns(RuntimeWarning, match="tokamax is installed but does not import .*fire_not_installed_here"):
        assert gm._tokamax_ragged_dots.__wrapped__() is None


def _chosen_loop(x, experts, gate, up, down, shared):
    """[T, K + S, D]: each token through each of its chosen experts, then the S shared chunks, float64 numpy."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))

    def mlp(v, g, u, d):
        a = v @ g
        return (a / (1 + np.exp(-a)) * (v @ u)) @ d

    T, K = experts.shape
    I = gate.shape[2]
    S = 0 if shared is None else shared[0].shape[1] // I
    out = np.zeros((T, K + S, x.shape[1]))
    for t in range(T):
        for k in range(K):
            e = experts[t, k]
            out[t, k] = mlp(x[t], gate[e], up[e], down[e])
        for s in range(S):
            cols = slice(s * I, (s + 1) * I)
            sg, su, sd = (np.asarray(a, np.float64) for a in shared)
            out[t, K + s] = mlp(x[t], sg[:, cols], su[:, cols], sd[cols])
    return out


@pytest.mark.parametrize("n_shared", [0, 2])
def test_chosen_experts_kernels_match_loop(n_shared):
    """chosen_experts_mlp (the decoding kernels, in Pallas's interpreter off GPU) against a per-(token, expert) numpy
    loop in float32 (1e-5 relative): tokens sharing an expert, a token's experts in any order, shared experts as
    extra chunks; contractions longer than one block; one layer of [layers, ...] stacks picked by `layer`."""
    from dsv2_jax.grouped_matmul import chosen_experts_mlp

    if jax.default_backend() == "gpu":
        pytest.skip("float32 on CPU; the GPU runs the bf16 case below")
    rng = np.random.default_rng(9)
    T, D, I, E = 3, 192, 128, 6
    x = rng.normal(size=(T, D)).astype(np.float32)
    gate, up = (rng.normal(size=(E, D, I)).astype(np.float32) / 8 for _ in range(2))
    down = rng.normal(size=(E, I, D)).astype(np.float32) / 8
    experts = np.array([[5, 0], [0, 5], [3, 2]], np.int32)
    shared = None
    if n_shared:
        shared = tuple(rng.normal(size=s).astype(np.float32) / 8 for s in ((D, n_shared * I), (D, n_shared * I),
                                                                          (n_shared * I, D)))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(chosen_experts_mlp(x, experts, gate, up, down, shared))
    want = _chosen_loop(x, experts, gate, up, down, shared)
    assert got.shape == (T, 2 + n_shared, D)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # stacked weights: the kernels read layer 1 of [2, ...] stacks themselves (layer 0 holds other values)
    stacked = [np.stack([a[::-1].copy(), a]) for a in (gate, up, down)]
    stacked_shared = None if shared is None else tuple(np.stack([-a, a]) for a in shared)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(chosen_experts_mlp(x, experts, *stacked, stacked_shared, jnp.int32(1)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="must be multiples of 16"):
        chosen_experts_mlp(x[:, :100], experts, gate[:, :100], up[:, :100], down[:, :, :100])


@pytest.mark.parametrize("T", [1, 2])
def test_chosen_experts_kernels_in_bf16(T):
    """The same kernels at V2-Lite's widths in bf16 (compiled on a GPU; one token has tiles of its own, run on
    the GPU only), against the float32 loop on the bf16 values: within bf16 rounding (1e-2 of the largest entry)."""
    from dsv2_jax.grouped_matmul import chosen_experts_mlp

    if T == 1 and jax.default_backend() != "gpu":
        pytest.skip("the interpreter ignores the one-token tiles' warps and stages; two tokens cover the kernels")
    rng = np.random.default_rng(10)
    D, I, E, K = 2048, 1408, 8, 6
    bf = lambda *s: jnp.asarray(rng.normal(size=s) / 16, jnp.bfloat16)  # noqa: E731
    x, gate, up, down = bf(T, D) * 16, bf(E, D, I), bf(E, D, I), bf(E, I, D)
    shared = (bf(D, 2 * I), bf(D, 2 * I), bf(2 * I, D))
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    got = np.asarray(chosen_experts_mlp(x, experts, gate, up, down, shared))
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    want = _chosen_loop(f32(x), experts, f32(gate), f32(up), f32(down), tuple(map(f32, shared)))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-2, err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_matvec_matches_numpy(dtype):
    """stacked_matvec (decoding's projections; interpreted off GPU) against a float64 numpy product of the chosen
    layer: 1 to 64 tokens (one token on its own path; more than 16 in several 16-row tiles, 37 padded to 64), the
    contraction split in up to 8 parts or none (9 or 3
    parts for a contraction of 9 blocks), float32 inputs exact (1e-6), bf16 inputs (compiled on a GPU) within
    float32 accumulation (1e-5 of the largest entry), bf16 inputs multiplied in float32 (the router's way) exact,
    two weights in one kernel; too many rows are an error."""
    from dsv2_jax.grouped_matmul import MATVEC_MAX_TOKENS, stacked_matvec, stacked_partials

    rng = np.random.default_rng(12)
    L, K, N = 3, 512, 96
    w = jnp.asarray(rng.normal(size=(L, K, N)), dtype)
    for T, programs, compute in ((1, 1, None), (1, 48, None), (5, 48, None), (16, 256, None), (37, 48, None),
                                 (MATVEC_MAX_TOKENS, 256, None), (1, 48, jnp.float32), (3, 48, jnp.float32)):
        x = jnp.asarray(rng.normal(size=(T, K)), dtype)
        want = np.asarray(x, np.float64) @ np.asarray(w[2], np.float64)
        got = np.asarray(stacked_matvec(x, w, jnp.int32(2), dtype=compute, block_k=64, block_n=32,
                                        programs=programs))
        assert got.shape == (T, N) and got.dtype == np.float32
        tol = 1e-6 if dtype == "float32" or compute == jnp.float32 else 1e-5
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    w2 = jnp.asarray(rng.normal(size=(L, K, 32)), dtype)  # two weights of one contraction in one kernel
    for T in (1, 5):
        x = jnp.asarray(rng.normal(size=(T, K)), dtype)
        got = stacked_matvec(x, (w, w2), jnp.int32(1), block_k=64, block_n=32, programs=48)
        for g, a in zip(got, (w, w2)):
            want = np.asarray(x, np.float64) @ np.asarray(a[1], np.float64)
            assert g.shape == want.shape
            tol = 1e-6 if dtype == "float32" else 1e-5
            np.testing.assert_allclose(np.asarray(g), want, rtol=0, atol=tol * np.abs(want).max())
    w3 = jnp.asarray(rng.normal(size=(L, 576, N)), dtype)  # 9 blocks of 64: split in 9 parts, or 3 for 2 rows
    for T, parts in ((1, 9), (2, 3)):
        x = jnp.asarray(rng.normal(size=(T, 576)), dtype)
        assert stacked_partials(x, w3, jnp.int32(0), block_k=64, block_n=32, programs=48 // T).shape[0] == parts
        want = np.asarray(x, np.float64) @ np.asarray(w3[0], np.float64)
        got = stacked_matvec(x, w3, jnp.int32(0), block_k=64, block_n=32, programs=48 // T)
        tol = 1e-6 if dtype == "float32" else 1e-5
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol * np.abs(want).max())
    with pytest.raises(ValueError, match=f"at most {MATVEC_MAX_TOKENS} rows"):
        stacked_matvec(jnp.zeros((MATVEC_MAX_TOKENS + 1, K), dtype), w, 0)


def test_stacked_partials_default_tiles_by_tokens():
    """stacked_partials' default tiles by rows: 128 × 64 blocks, the contraction of 64 blocks split for 1024 programs
    over the 8 column blocks at one token (64 parts), 256 at 2-32 tokens (32) and 128 at 33-64 (16); the rows
    padded to 16, 32 or 64."""
    from dsv2_jax.grouped_matmul import stacked_partials

    w = jax.ShapeDtypeStruct((2, 64 * 128, 8 * 64), jnp.bfloat16)
    for T, parts, rows in ((1, 64, 1), (3, 32, 16), (32, 32, 32), (33, 16, 64), (64, 16, 64)):
        x = jax.ShapeDtypeStruct((T, 64 * 128), jnp.bfloat16)
        assert jax.eval_shape(lambda x, w: stacked_partials(x, w, 1), x, w).shape == (parts, rows, 512), T


def test_auto_projections_by_tokens(decode_kernels, monkeypatch):
    """DSV2_DECODE_PROJECTIONS=auto on a GPU: steps of up to MATVEC_MAX_TOKENS tokens take stacked_matvec, more
    XLA's products; pallas takes it up to MATVEC_MAX_TOKENS and refuses more; off GPU auto never does."""
    from dsv2_jax import grouped_matmul as gm

    decode_kernels("auto", "auto")
    monkeypatch.setattr(gm.jax, "default_backend", lambda: "cpu")  # the same on either backend the test runs on
    assert not any(gm.use_stacked_matvec(t) for t in (1, 64))
    monkeypatch.setattr(gm.jax, "default_backend", lambda: "gpu")
    taken = [t for t in range(1, 100) if gm.use_stacked_matvec(t)]
    assert taken == list(range(1, gm.MATVEC_MAX_TOKENS + 1))
    decode_kernels("auto", "pallas")
    assert gm.use_stacked_matvec(20) and gm.use_stacked_matvec(gm.MATVEC_MAX_TOKENS)
    with pytest.raises(ValueError, match="at most 64"):
        gm.use_stacked_matvec(gm.MATVEC_MAX_TOKENS + 1)


def test_decoding_kernels_read_a_layer_index():
    """A `LayerIndex(counter, scale, offset)` handed to a decoding kernel reads layer counter · scale + offset, as
    that int would, with the counter traced under jit (a layer loop running two layers an iteration hands both its
    counter); interpreted off GPU. The attention's kernels take it the same way (the decoding loop's test)."""
    from dsv2_jax.grouped_matmul import LayerIndex, chosen_experts_mlp, stacked_matvec
    from dsv2_jax.layers import rms_norm_rows

    rng = np.random.default_rng(3)
    L, D, E, I = 5, 64, 4, 32
    w = jnp.asarray(rng.normal(size=(L, D, 48)), jnp.float32)
    norm = jnp.asarray(rng.uniform(0.5, 1.5, size=(L, D)), jnp.float32)
    gate, up = (jnp.asarray(rng.normal(size=(L, E, D, I)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(size=(L, E, I, D)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(1, D)), jnp.float32)
    experts = jnp.array([[0, 3]], jnp.int32)
    kernels = {"stacked_matvec": lambda layer: stacked_matvec(x, w, layer, block_k=32, block_n=16),
               "rms_norm_rows": lambda layer: rms_norm_rows(x, norm, layer, eps=1e-6, dtype=jnp.float32),
               "chosen_experts_mlp": lambda layer: chosen_experts_mlp(x, experts, gate, up, down, None, layer)}
    for counter, scale, offset in ((1, 2, 1), (0, 2, 4), (2, 1, 0)):
        layer = counter * scale + offset
        for name, kernel in kernels.items():
            got = np.asarray(jax.jit(lambda c: kernel(LayerIndex(c, scale, offset)))(jnp.int32(counter)))
            np.testing.assert_array_equal(got, np.asarray(jax.jit(kernel)(jnp.int32(layer))), err_msg=name)
            assert not np.allclose(got, np.asarray(jax.jit(kernel)(jnp.int32((layer + 1) % L)))), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_partials_normalises_one_row(dtype):
    """stacked_partials with a norm (a decoding layer's input norm in its first kernel; interpreted off GPU): one
    row normalised with layer 2 of stacked RMSNorm weights, then times layer 2 of two weights. float32: against
    float64 numpy (1e-6 of the largest entry); both types: against rms_norm_rows, then the kernel without a norm
    (1e-6: the same rounded inputs). Norm weights of another width, or two rows, are an error."""
    from dsv2_jax.grouped_matmul import stacked_partials
    from dsv2_jax.layers import rms_norm_rows

    rng = np.random.default_rng(13)
    L, K, eps = 3, 512, 1e-6
    ws = tuple(jnp.asarray(rng.normal(size=(L, K, n)), dtype) for n in (96, 32))
    norm = jnp.asarray(rng.uniform(0.5, 1.5, size=(L, K)), dtype)
    x = jnp.asarray(3 * rng.normal(size=(1, K)), dtype)
    tiles = dict(block_k=64, block_n=32, programs=48)
    got = np.asarray(stacked_partials(x, ws, jnp.int32(2), norm, eps=eps, **tiles).sum(0)[:1])
    normed = rms_norm_rows(x, norm, jnp.int32(2), eps=eps, dtype=jnp.dtype(dtype))
    want = np.asarray(stacked_partials(normed, ws, jnp.int32(2), **tiles).sum(0)[:1])
    assert got.shape == (1, 128) and np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    if dtype == "float32":
        x64 = np.asarray(x, np.float64)
        n64 = x64 / np.sqrt((x64 ** 2).mean() + eps) * np.asarray(norm[2], np.float64)
        want64 = np.concatenate([n64 @ np.asarray(w[2], np.float64) for w in ws], axis=1)
        np.testing.assert_allclose(got, want64, rtol=0, atol=1e-6 * np.abs(want64).max())
    for bad_x, bad_norm in ((x, norm[:, :256]), (jnp.concatenate([x, x]), norm)):
        with pytest.raises(ValueError, match="norm weights"):
            stacked_partials(bad_x, ws, jnp.int32(2), bad_norm, eps=eps, **tiles)


@pytest.mark.parametrize("norm,scaling", [(False, 1.0), (True, 1.0), (False, 2.5)])
def test_route_kernel_matches_route(norm, scaling):
    """route_kernel (decoding's routing in one kernel; interpreted off GPU) against `route` of the summed partial
    logits: the same experts in the same order (ties: the lower id first, two exact ties built in), scores and
    weights to 1e-6 of the largest (a GPU's exp differs in the last bits); 1 and 5 tokens of 16 rows, 4 partial
    sums; group-limited routing is refused."""
    from dsv2_jax.moe import route, route_kernel, routes_on_kernel

    c = TINY.replace(n_routed_experts=16, num_experts_per_tok=6, topk_method="greedy", norm_topk_prob=norm,
                     routed_scaling_factor=scaling)
    assert routes_on_kernel(c) and not routes_on_kernel(TINY)
    rng = np.random.default_rng(14)
    partials = rng.normal(size=(4, 16, 16)).astype(np.float32)
    partials[:, 0, [2, 5]] = partials[:, 0, [2]] + 6.0  # token 0: experts 2 and 5 tie for the top, then 3 and 9
    partials[:, 0, [3, 9]] = partials[:, 0, [3]] + 3.0
    for tokens in (1, 5):
        got = route_kernel(c, jnp.asarray(partials), tokens)
        want = route(c, jnp.asarray(partials).sum(axis=0)[:tokens])
        np.testing.assert_array_equal(np.asarray(got.experts), np.asarray(want.experts))
        for name in ("weights", "scores"):
            w = np.asarray(getattr(want, name))
            np.testing.assert_allclose(np.asarray(getattr(got, name)), w, rtol=0, atol=1e-6 * np.abs(w).max(),
                                       err_msg=name)
    assert list(np.asarray(got.experts[0, :4])) == [2, 5, 3, 9]
    with pytest.raises(ValueError, match="power-of-two"):
        route_kernel(TINY, jnp.asarray(partials[:, :, :8]), 1)


@pytest.mark.parametrize("dtype,T", [("float32", 3), ("bfloat16", 1)])
def test_routed_experts_mlp_equals_route_then_chosen_experts(dtype, T):
    """routed_experts_mlp (decoding's MoE layer in two kernels: the routing taken in the gate/up kernel, the weighted
    sum and the residual add in the down kernel, whose last program per column block sums it; interpreted off GPU)
    against route_kernel, chosen_experts_mlp and the weighted sum and residual add in XLA: the same experts and
    weights, scores and output to 1e-6 of the largest in float32 and within one bf16 rounding in bf16; 4 routed of
    16 experts plus 2 shared (6 products per token, not a power of two; two experts tied), renormalised and scaled
    weights, one layer of two-layer stacks; the counters come back as zeros. Bad partials or counters are errors."""
    from dsv2_jax.grouped_matmul import arrival_counts, chosen_experts_mlp, routed_experts_mlp
    from dsv2_jax.moe import greedy_routing, route_kernel

    rng = np.random.default_rng(16)
    D, I, E, K, L = 64, 32, 16, 4, 2
    arr = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, dtype)  # noqa: E731
    gate, up = arr(L, E, D, I, scale=0.3), arr(L, E, D, I, scale=0.3)
    down = arr(L, E, I, D, scale=0.3)
    shared = (arr(L, D, 2 * I, scale=0.3), arr(L, D, 2 * I, scale=0.3), arr(L, 2 * I, D, scale=0.3))
    x, residual = arr(T, D), arr(T, D)
    partials = rng.normal(size=(4, T + 1, E)).astype(np.float32)
    partials[:, 0, [3, 7]] = partials[:, 0, [3]] + 4.0  # token 0: experts 3 and 7 tie for the top (3 first)
    partials = jnp.asarray(partials)
    for norm, scaling in ((True, 1.0), (False, 2.5)):
        c = TINY.replace(n_routed_experts=E, num_experts_per_tok=K, topk_method="greedy", norm_topk_prob=norm,
                         routed_scaling_factor=scaling)
        with jax.default_matmul_precision("highest"):
            h, counts, scores, weights, experts = routed_experts_mlp(
                x, partials, residual, arrival_counts(T, D), gate, up, down, shared, jnp.int32(1),
                routing=greedy_routing(c))
            r = route_kernel(c, partials, T)
            y = chosen_experts_mlp(x, r.experts, gate, up, down, shared, jnp.int32(1))
        coef = jnp.concatenate([r.weights, jnp.ones((T, 2), jnp.float32)], axis=1)
        want = residual + (y * coef[:, :, None]).sum(axis=1).astype(residual.dtype)
        np.testing.assert_array_equal(np.asarray(experts), np.asarray(r.experts))
        assert list(np.asarray(experts[0, :2])) == [3, 7]
        for got_, want_ in ((weights, r.weights), (scores, r.scores)):
            np.testing.assert_allclose(np.asarray(got_), np.asarray(want_), rtol=0, atol=1e-6)
        assert h.dtype == residual.dtype and np.asarray(counts).sum() == 0 and counts.shape == (T, D // 16)
        got, want = np.asarray(h, np.float32), np.asarray(want, np.float32)
        ulp = 1e-6 if dtype == "float32" else 2.0 ** -7
        np.testing.assert_allclose(got, want, rtol=0, atol=ulp * np.abs(want).max())
    with pytest.raises(ValueError, match="counts"):
        routed_experts_mlp(x, partials, residual, jnp.zeros((T, 2), jnp.int32), gate, up, down, shared,
                           jnp.int32(1), routing=greedy_routing(c))
    with pytest.raises(ValueError, match="router partials"):
        routed_experts_mlp(x, partials[:, :, :12], residual, arrival_counts(T, D), gate, up, down, shared,
                           jnp.int32(1), routing=greedy_routing(c))


def test_moe_router_on_stacked_matvec(decode_kernels):
    """With the router's stack in ExpertStacks (decoding with DSV2_DECODE_PROJECTIONS), the router's float32 logits
    come from stacked_matvec reading the stacked layer: the same routing and output as the module's own router."""
    from test_model import pallas_calls

    from dsv2_jax.moe import ExpertStacks, MoE
    from flax import nnx

    c = TINY.replace(n_routed_experts=16, moe_intermediate_size=128)  # 16 experts: the kernel's widths
    moe = MoE(c, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    moe.router[...] = moe.router[...] * 20
    x = jnp.asarray(np.random.default_rng(13).normal(size=(2, 1, c.hidden_size)), jnp.float32)
    decode_kernels("chosen", "pallas")
    two_layers = lambda p: jnp.stack([-p[...], p[...]])  # noqa: E731  (layer 1 is the module's)
    s = moe.shared_experts
    stacks = ExpertStacks(*map(two_layers, (moe.gate_proj, moe.up_proj, moe.down_proj)),
                          tuple(map(two_layers, (s.gate_proj, s.up_proj, s.down_proj))), jnp.int32(1),
                          router=two_layers(moe.router))
    with jax.default_matmul_precision("highest"):
        want, r_want = moe(x, decoding=True)
        got, r_got = moe(x, decoding=True, stacks=stacks)
    assert pallas_calls(lambda v: moe(v, decoding=True, stacks=stacks)[0], x, prefix="stacked_matvec") == 1
    np.testing.assert_array_equal(np.asarray(r_got.experts), np.asarray(r_want.experts))
    np.testing.assert_allclose(np.asarray(r_got.scores), np.asarray(r_want.scores), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * np.abs(want).max())


def test_moe_add_decoded_equals_residual_plus_the_layer(decode_kernels):
    """MoE.add_decoded (a decoding step's routing, experts and residual add in two kernels; interpreted off GPU)
    equals residual + MoE(x, decoding=True) on the chosen-experts kernels, both given the same router partials: with
    the module's own weights and with one layer of two-layer stacks; the same routing; float32, 1e-6 of the
    largest entry; the counters come back as zeros."""
    from dsv2_jax.grouped_matmul import arrival_counts
    from dsv2_jax.moe import ExpertStacks, MoE, adds_decoded
    from flax import nnx

    c = TINY.replace(n_routed_experts=16, moe_intermediate_size=128, topk_method="greedy")
    moe = MoE(c, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(5))
    for p, scale in ((moe.router, 20), (moe.gate_proj, 5), (moe.up_proj, 5), (moe.down_proj, 5)):
        p[...] = p[...] * scale  # weights large enough that the routing and the experts matter
    rng = np.random.default_rng(21)
    D = c.hidden_size
    x, residual = (jnp.asarray(rng.normal(size=(2, 1, D)), jnp.float32) for _ in range(2))
    decode_kernels("chosen", "pallas")
    assert adds_decoded(c, 2, D)
    router, half, xt = moe.router[...], D // 2, x.reshape(2, D)
    partials = jnp.stack([xt[:, :half] @ router[:half], xt[:, half:] @ router[half:]])  # [2, T, E] float32
    two_layers = lambda p: jnp.stack([-p[...], p[...]])  # noqa: E731  (layer 1 is the module's)
    s = moe.shared_experts
    stacks = ExpertStacks(*map(two_layers, (moe.gate_proj, moe.up_proj, moe.down_proj)),
                          tuple(map(two_layers, (s.gate_proj, s.up_proj, s.down_proj))), jnp.int32(1))
    with jax.default_matmul_precision("highest"):
        y, r_want = moe(x, decoding=True, router_partials=partials)
        want = np.asarray(residual + y)
        for w in (None, stacks):
            got, counts, r_got = moe.add_decoded(x, residual, partials, arrival_counts(2, D), stacks=w)
            np.testing.assert_array_equal(np.asarray(r_got.experts), np.asarray(r_want.experts))
            np.testing.assert_allclose(np.asarray(r_got.weights), np.asarray(r_want.weights), rtol=0, atol=1e-6)
            assert got.shape == residual.shape and not np.asarray(counts).any()
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.abs(np.asarray(y)).max() > 0.1


def test_moe_decoding_kernels_equal_the_sorted_path(decode_kernels):
    """MoE(x, decoding=True) on the chosen-experts kernels (forced; interpreted off GPU) equals the sorted dropless
    path with the shared experts (float32, 1e-5 relative), with the same routing; auto takes them only on GPU, and
    only when decoding."""
    from test_model import pallas_calls

    from dsv2_jax.moe import MoE
    from flax import nnx

    def chosen_kernels(f, x):
        return pallas_calls(f, x, prefix="chosen_experts")

    c = TINY.replace(moe_intermediate_size=128)
    moe = MoE(c, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    for p in (moe.gate_proj, moe.up_proj, moe.down_proj, moe.router):
        p[...] = p[...] * 20  # weights large enough that the experts matter
    x = jnp.asarray(np.random.default_rng(11).normal(size=(3, 1, c.hidden_size)), jnp.float32)
    decoding = lambda v: moe(v, decoding=True)[0]  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want, r_want = moe(x)
        decode_kernels("chosen")
        got, r_got = moe(x, decoding=True)
    assert chosen_kernels(decoding, x) == 2
    np.testing.assert_array_equal(np.asarray(r_got.experts), np.asarray(r_want.experts))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(np.asarray(want)).max() > 0.1
    decode_kernels("auto")  # one token: 2 copies for 8 experts, under CHOSEN_MAX_COPIES; seven tokens: over
    from dsv2_jax.grouped_matmul import CHOSEN_MAX_COPIES
    many = jnp.concatenate([x, x, x[:1]])
    assert 2 <= CHOSEN_MAX_COPIES * c.num_experts < 2 * many.shape[0]
    assert chosen_kernels(decoding, x[:1]) == (2 if jax.default_backend() == "gpu" else 0)
    assert chosen_kernels(decoding, many) == chosen_kernels(lambda v: moe(v)[0], x[:1]) == 0
    decode_kernels("sorted")
    assert chosen_kernels(decoding, x[:1]) == 0
    decode_kernels("fused")
    with pytest.raises(ValueError, match="DSV2_DECODE_EXPERTS must be one of"):
        moe(x, decoding=True)
