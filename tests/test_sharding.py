"""Meshes, parameter shardings and the expert-parallel MoE against the single-device model and plain loops.

8 fake CPU devices (conftest.py). fp32 throughout; tolerances are relative to the largest |value| of each array.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from test_model import all_eqns

import dsv2_jax
from dsv2_jax import ModelConfig, sharding
from dsv2_jax.model import DeepseekV2
from dsv2_jax.moe import MoE, dropless_experts, route

CONFIG = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, initializer_range=0.1)
RTOL = 1e-5


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


def batch_sharded(x, mesh):
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(sharding.batch_axes())))


def all_to_alls(compiled) -> list[str]:
    """The all-to-all instructions of a compiled program."""
    return [line for line in compiled.as_text().splitlines() if "all-to-all(" in line]


def silu(v):
    return v / (1 + np.exp(-v))


# ---------------------------------------------------------------------- the mesh and user errors
def test_make_mesh_sizes_and_errors():
    mesh = dsv2_jax.make_mesh(fsdp=2, expert=-1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="only one size may be -1"):
        dsv2_jax.make_mesh(data=-1, tensor=-1)
    with pytest.raises(ValueError, match="fixed sizes multiply to 3.*8 devices"):
        dsv2_jax.make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="multiply to 4 devices, but there are 8"):
        dsv2_jax.make_mesh(expert=2, tensor=2)
    with pytest.raises(ValueError, match="tensor must be a positive integer or -1"):
        dsv2_jax.make_mesh(data=8, tensor=0)


def test_config_and_mesh_errors_name_the_field():
    with pytest.raises(ValueError, match="n_routed_experts=4 is not divisible by the mesh's expert axis size 8"):
        sharding.check_config(CONFIG.replace(n_routed_experts=4), dsv2_jax.make_mesh(expert=8))
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by the mesh's tensor axis size 8"):
        dsv2_jax.init_model(CONFIG, dsv2_jax.make_mesh(tensor=8))
    abstract = nnx.state(dsv2_jax.abstract_model(CONFIG.replace(hidden_size=132)))
    with pytest.raises(ValueError, match=r"parameter dense_layers\.attn\.kv_a_proj.*size 132.*\('fsdp',\) of size 8"):
        sharding.state_shardings(abstract, dsv2_jax.make_mesh(fsdp=8))
    explicit = jax.make_mesh((1, 2, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Explicit,) * 4)
    with pytest.raises(ValueError, match="not of AxisType.Auto"):
        with sharding.activation_mesh(explicit):
            pass
    with pytest.raises(ValueError, match="capacity_factor must be None"):
        dsv2_jax.abstract_model(CONFIG).forward(jnp.zeros((1, 4), jnp.int32), capacity_factor=0.0)


def test_loading_onto_a_mesh_checks_it_first(tmp_path):
    """dsv2_jax.load / from_hf with a mesh that lacks make_mesh's axes or has Explicit ones: the error init_model
    gives, before anything is read (it was a KeyError, or a ShardingTypeError at the first forward)."""
    from hf_models import random_hf_model, save_hf_model
    save_hf_model(random_hf_model(seed=3), tmp_path / "hf")
    dsv2_jax.save(DeepseekV2(CONFIG, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    wrong_axes = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    explicit = jax.make_mesh((1, 2, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Explicit,) * 4)
    for mesh, message in [(wrong_axes, r"missing \['fsdp', 'expert', 'tensor'\]"), (explicit, "not of AxisType.Auto")]:
        with pytest.raises(ValueError, match=message):
            dsv2_jax.from_hf(tmp_path / "hf", mesh=mesh)
        with pytest.raises(ValueError, match=message):
            dsv2_jax.load(tmp_path / "ckpt", mesh=mesh)


def test_calling_the_model_checks_its_inputs():
    """model(...) with concrete ids: an id outside the vocabulary (jnp.take gives NaN logits past the end and the
    last row for -1), ids not [batch, seq] integers, positions of another shape: errors naming them. Traced calls
    (under jit) are not checked."""
    model = DeepseekV2(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    V = CONFIG.vocab_size
    for ids, kw, message in [(jnp.array([[1, V]]), {}, f"hold {V}, outside the vocabulary"),
                             (jnp.array([[-1, 2]]), {}, "hold -1, outside"),
                             (jnp.array([1, 2]), {}, r"shape \[batch, seq\], got int32\[2\]"),
                             (jnp.array([[1.0, 2.0]]), {}, "must be integers"),
                             (jnp.array([[1, 2]]), {"positions": jnp.zeros((1, 3), jnp.int32)}, "positions must")]:
        with pytest.raises(ValueError, match=message):
            model(ids, **kw)
    ok = jnp.array([[1, V - 1]])
    np.testing.assert_allclose(np.asarray(jax.jit(lambda i: model(i))(ok)), np.asarray(model(ok)), rtol=1e-6,
                               atol=1e-6)


# ---------------------------------------------------------------------- parameters really split
def expected_shard_shapes(mesh_shape):
    """Shard shapes by the table: params over fsdp, routed experts over expert, heads/MLP width/vocab over tensor."""
    f, e, t = mesh_shape["fsdp"], mesh_shape["expert"], mesh_shape["tensor"]
    L, E, D, I, H = CONFIG.num_moe_layers, CONFIG.num_experts, CONFIG.hidden_size, CONFIG.moe_intermediate_size, 4
    return {
        ("moe_layers", "mlp", "gate_proj"): (L, E // e, D // f, I // t),
        ("moe_layers", "mlp", "down_proj"): (L, E // e, I // t, D // f),
        ("moe_layers", "mlp", "router"): (L, D // f, E),
        ("moe_layers", "mlp", "shared_experts", "up_proj"): (L, D // f, I // t),
        ("moe_layers", "attn", "q_b_proj"): (L, 64, H // t, 48),
        ("dense_layers", "mlp", "gate_proj"): (1, D // f, CONFIG.intermediate_size // t),
        ("embed_tokens", "embedding"): (CONFIG.vocab_size // t, D // f),
        ("lm_head",): (D // f, CONFIG.vocab_size // t),
    }


def check_split(state, mesh):
    flat = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
    for path, shape in expected_shard_shapes(mesh.shape).items():
        array = flat[path][...]
        assert {s.data.shape for s in array.addressable_shards} == {shape}, path
        blocks = {tuple((i.start, i.stop) for i in idx) for idx in array.sharding.devices_indices_map(
            array.shape).values()}
        assert len(blocks) == math.prod(array.shape[d] // shape[d] for d in range(array.ndim)), path


def test_init_model_creates_sharded_weights_equal_to_eager_init():
    mesh = dsv2_jax.make_mesh(fsdp=2, expert=2, tensor=2)
    model = dsv2_jax.init_model(CONFIG, mesh, seed=3)
    state = nnx.state(model)
    check_split(state, mesh)
    want = nnx.state(DeepseekV2(CONFIG, rngs=nnx.Rngs(3)))
    for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want)):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-6, atol=1e-7, err_msg=str(path))


# ---------------------------------------------------------------------- logits and gradients on meshes
MESHES = [dict(data=8), dict(data=2, expert=2, tensor=2), dict(expert=4, tensor=2), dict(fsdp=2, expert=4),
          dict(expert=8)]


def loss_fn(graphdef, state, ids):
    out = nnx.merge(graphdef, state).forward(ids)
    logits = out.logits
    # touches every logit with a different weight, so every gradient matters
    return jnp.mean(jnp.sin(logits * 3.0) * jnp.arange(logits.shape[-1])), (logits, out.router, out.dropped)


@pytest.fixture(scope="module")
def single_device():
    graphdef, state = nnx.split(DeepseekV2(CONFIG, rngs=nnx.Rngs(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 8)))
    step = jax.jit(jax.value_and_grad(lambda s, i: loss_fn(graphdef, s, i), has_aux=True))
    (loss, (logits, router, dropped)), grads = step(state, ids)
    return graphdef, state, ids, dict(loss=loss, logits=logits, router=router, dropped=dropped, grads=grads)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_mesh_logits_and_gradients_equal_single_device(single_device, mesh_shape):
    graphdef, state, ids, want = single_device
    mesh = dsv2_jax.make_mesh(**mesh_shape)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    check_split(state, mesh)

    def step(state, ids):
        with sharding.activation_mesh(mesh):
            return jax.value_and_grad(lambda s: loss_fn(graphdef, s, ids), has_aux=True)(state)

    compiled = jax.jit(step).lower(state, batch_sharded(ids, mesh)).compile()
    n_ep = mesh_shape.get("expert", 1)
    if n_ep > 1:  # the MoE layers dispatch over the expert axis in dropless buffers of n_ep chunks of C rows
        T_loc = ids.size // (mesh.size // mesh_shape.get("tensor", 1))
        C = T_loc * min(CONFIG.num_experts_per_tok, CONFIG.num_experts // n_ep)
        assert f"f32[{C},{CONFIG.hidden_size}]" in " ".join(all_to_alls(compiled))
    (loss, (logits, router, dropped)), grads = compiled(state, batch_sharded(ids, mesh))
    assert float(dropped) == 0.0 and bool(router.kept.all())
    np.testing.assert_array_equal(np.asarray(router.experts), np.asarray(want["router"].experts))
    assert rel_err(logits, want["logits"]) <= RTOL
    assert rel_err(loss, want["loss"]) <= RTOL
    flat_grads = dict(nnx.to_flat_state(grads))
    for path, g in nnx.to_flat_state(want["grads"]):
        assert rel_err(flat_grads[path][...], g[...]) <= RTOL, path
    # the MoE parameters' gradients come back in the parameters' own shardings (reduce-scattered over fsdp)
    for name in ("router", "gate_proj", "up_proj", "down_proj"):
        g, p = flat_grads[("moe_layers", "mlp", name)][...], state["moe_layers"]["mlp"][name][...]
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim), name


def test_from_hf_places_parameters_in_their_shardings(tmp_path):
    from hf_models import hf_logits, random_hf_model, save_hf_model

    hf = random_hf_model(seed=5)
    path = save_hf_model(hf, tmp_path / "hf")
    mesh = dsv2_jax.make_mesh(fsdp=2, expert=2, tensor=2)
    model = dsv2_jax.from_hf(path, dtype=jnp.float32, mesh=mesh)
    experts = model.moe_layers.mlp.gate_proj[...]
    assert experts.sharding.spec == PartitionSpec(None, "expert", "fsdp", "tensor")
    assert {s.data.shape for s in experts.addressable_shards} == {(2, 4, 32, 16)}
    ids = np.random.default_rng(2).integers(0, 160, (4, 12))
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, ids):
        with sharding.activation_mesh(mesh):
            return nnx.merge(graphdef, state)(ids)

    want = hf_logits(hf, ids)
    assert rel_err(logits(state, batch_sharded(jnp.asarray(ids), mesh)), want) <= RTOL


# ---------------------------------------------------------------------- capacity dropping
def reference_kept(experts, scores, n_shards, n_ep, capacity):
    """Per token shard and receiving device: keep the `capacity` copies of highest affinity (ties: token order)."""
    T, K = experts.shape
    E_loc = CONFIG.num_experts // n_ep
    kept = np.zeros((T, K), bool)
    per = T // n_shards
    for s in range(n_shards):
        for d in range(n_ep):
            copies = [(t, k) for t in range(s * per, (s + 1) * per) for k in range(K) if experts[t, k] // E_loc == d]
            copies.sort(key=lambda tk: -scores[tk[0], experts[tk]])  # stable: token order among equal affinities
            for t, k in copies[:capacity]:
                kept[t, k] = True
    return kept


def reference_moe(layer, x, weights, experts):
    """Σ_k weight_k · expert_k(x) + shared(x), one token and one pair at a time."""
    gate, up, down = (np.asarray(p[...], np.float64) for p in (layer.gate_proj, layer.up_proj, layer.down_proj))
    sh = layer.shared_experts
    sg, su, sd = (np.asarray(p[...], np.float64) for p in (sh.gate_proj, sh.up_proj, sh.down_proj))
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        y[t] = (silu(x[t] @ sg) * (x[t] @ su)) @ sd
        for k in range(experts.shape[1]):
            e = experts[t, k]
            y[t] += weights[t, k] * ((silu(x[t] @ gate[e]) * (x[t] @ up[e])) @ down[e])
    return y


def test_per_shard_runs_the_function_on_each_devices_shard():
    """sharding.per_shard (how tokamax's flash attention runs under a mesh): attention computed per (batch, heads)
    shard equals the whole computation, and the function sees only its device's rows."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(8, 6, 4, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.tril(np.ones((6, 6), bool))[None].repeat(8, 0))

    def attention(q, k, v, mask):
        scores = jnp.where(mask[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, k), -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)

    heads = ("batch", "seq", "heads", "head_dim")
    mesh = dsv2_jax.make_mesh(data=4, tensor=2)
    with sharding.activation_mesh(mesh):
        got = jax.jit(sharding.per_shard(attention, (heads, heads, heads, ("batch", "seq", None)), heads))(
            q, k, v, mask)
        means = jax.jit(sharding.per_shard(lambda x: jnp.broadcast_to(x.mean(0), x.shape), (("batch", None),),
                                           ("batch", None)))(jnp.arange(16.0).reshape(8, 2))
        odd = jax.jit(sharding.per_shard(attention, (heads, heads, heads, ("batch", "seq", None)), heads))(
            q[:3], k[:3], v[:3], mask[:3])  # 3 rows over 4 batch shards: run unsplit
    assert rel_err(got, attention(q, k, v, mask)) <= 1e-6
    assert rel_err(odd, attention(q[:3], k[:3], v[:3], mask[:3])) <= 1e-6
    np.testing.assert_array_equal(np.asarray(means)[:, 0], np.repeat([1.0, 5.0, 9.0, 13.0], 2))  # 4 shards × 2 rows
    assert sharding.per_shard(attention, (), ()) is attention  # no mesh: the function itself


def test_gpu_kernels_run_inside_the_expert_parallel_layer(monkeypatch):
    """The Pallas grouped-matmul kernels (what GPUs run; interpreted here) inside the expert-parallel shard_map, on
    expert=4 × tensor=2 in bf16, under save_dots (their custom VJP, the kept outputs): the same routing, logits and
    gradients as XLA's ragged_dot there (whose sharded run equals the single-device model in fp32, above), up to
    bf16 rounding."""
    from dsv2_jax import grouped_matmul
    c = CONFIG.replace(hidden_size=128, moe_intermediate_size=256)  # whole 128-column tiles per shard
    graphdef, state = nnx.split(DeepseekV2(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    mesh = dsv2_jax.make_mesh(expert=4, tensor=2)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    ids = batch_sharded(jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (8, 8))), mesh)

    def run(state, ids, remat):
        def loss(s):
            with sharding.activation_mesh(mesh):
                out = nnx.merge(graphdef, s).forward(ids, remat=remat)
            return jnp.mean(jnp.sin(out.logits * 3.0)), (out.logits, out.router.experts)
        return jax.value_and_grad(loss, has_aux=True)(state)

    def norm_err(got, want):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    results = {}
    try:
        for backend in ("ragged_dot", "pallas"):
            monkeypatch.setenv("DSV2_GROUPED_MATMUL", backend)
            grouped_matmul._backend.cache_clear()
            jax.clear_caches()  # inner jitted functions would keep the other backend's trace
            jaxpr = jax.make_jaxpr(run, static_argnums=2)(state, ids, "save_dots").jaxpr
            assert any(e.primitive.name == "pallas_call" for e in all_eqns(jaxpr)) == (backend == "pallas")
            results[backend] = jax.jit(run, static_argnums=2)(state, ids, "save_dots")
    finally:
        grouped_matmul._backend.cache_clear()
        jax.clear_caches()
    (_, (want, want_experts)), want_grads = results["ragged_dot"]
    (_, (got, got_experts)), got_grads = results["pallas"]
    np.testing.assert_array_equal(np.asarray(got_experts), np.asarray(want_experts))
    assert norm_err(got, want) <= 2e-3
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert norm_err(a, b) <= 2e-3


@pytest.fixture(scope="module")
def moe_layer():
    layer = MoE(CONFIG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(4))
    x = np.random.default_rng(4).normal(size=(8, 8, CONFIG.hidden_size)).astype(np.float32)
    return layer, x


@pytest.mark.parametrize("mesh_shape,factor", [(None, 0.6), (dict(expert=4, tensor=2), 0.5)])
def test_capacity_drops_exactly_the_lowest_affinity_pairs(moe_layer, mesh_shape, factor):
    layer, x = moe_layer
    graphdef, state = nnx.split(layer)
    T, K, D = 64, CONFIG.num_experts_per_tok, CONFIG.hidden_size
    mesh = dsv2_jax.make_mesh(**mesh_shape) if mesh_shape else None
    n_shards, n_ep = (4, 4) if mesh else (1, 1)
    capacity = math.ceil(factor * (T // n_shards) * K / n_ep)

    def run(state, x, kept_fixed):
        with sharding.activation_mesh(mesh):
            y, r = nnx.merge(graphdef, state)(x, capacity_factor=factor)
        # the reference of the gradient: the dropless layer with exactly the same pairs removed
        m = nnx.merge(graphdef, state)
        xt = x.reshape(T, D)
        r_ref = m.route(xt)
        r_ref = r_ref._replace(weights=r_ref.weights * kept_fixed)
        y_ref = dropless_experts(xt, r_ref, m.gate_proj[...], m.up_proj[...], m.down_proj[...])
        y_ref = y_ref.reshape(x.shape) + m.shared_experts(x)
        return y, r, y_ref

    def losses(state, x, kept_fixed):
        y, r, y_ref = run(state, x, kept_fixed)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * w), jnp.sum(y_ref * w)

    xs = batch_sharded(jnp.asarray(x), mesh) if mesh else jnp.asarray(x)
    if mesh:
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
    compiled = jax.jit(run).lower(state, xs, jnp.ones((T, K))).compile()
    if mesh:  # fixed-capacity buffers: n_ep chunks of `capacity` rows
        assert all_to_alls(compiled) and all(f"f32[{capacity},{D}]" in line or f"s32[{capacity}]" in line
                                             for line in all_to_alls(compiled))
    y, r, _ = compiled(state, xs, jnp.ones((T, K)))
    experts, scores = np.asarray(r.experts), np.asarray(r.scores)
    want_r = route(CONFIG, jnp.asarray(x.reshape(T, D)) @ layer.router[...])
    np.testing.assert_array_equal(experts, np.asarray(want_r.experts))
    kept = reference_kept(experts, scores, n_shards, n_ep, capacity)
    assert 0.2 < 1 - kept.mean() < 0.8  # the capacity really drops, and not everything
    np.testing.assert_array_equal(np.asarray(r.kept), kept)
    want = reference_moe(layer, x.reshape(T, D).astype(np.float64), np.asarray(r.weights) * kept, experts)
    assert rel_err(np.asarray(y).reshape(T, D), want) <= RTOL

    grad = jax.jit(jax.grad(lambda s, x, k, i: losses(s, x, k)[i], argnums=(0, 1)), static_argnums=3)
    (gs, gx), (gs_ref, gx_ref) = (grad(state, xs, jnp.asarray(kept, jnp.float32), i) for i in (0, 1))
    assert rel_err(gx, gx_ref) <= RTOL
    for (path, a), (_, b) in zip(nnx.to_flat_state(gs), nnx.to_flat_state(gs_ref)):
        assert rel_err(a[...], b[...]) <= RTOL, path


def test_model_reports_the_dropped_fraction(single_device):
    graphdef, state, ids, _ = single_device
    mesh = dsv2_jax.make_mesh(data=2, expert=2, tensor=2)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))

    @jax.jit
    def forward(state, ids):
        with sharding.activation_mesh(mesh):
            return nnx.merge(graphdef, state).forward(ids, capacity_factor=1.0)

    out = forward(state, batch_sharded(ids, mesh))
    r = out.router
    T, K = ids.size, CONFIG.num_experts_per_tok
    capacity = math.ceil(1.0 * (T // 4) * K / 2)  # 4 token shards (data x expert), 2 expert devices
    kept = [reference_kept(np.asarray(r.experts[i]), np.asarray(r.scores[i]), 4, 2, capacity)
            for i in range(CONFIG.num_moe_layers)]
    np.testing.assert_array_equal(np.asarray(r.kept), np.stack(kept))
    want = 1 - np.mean(kept)
    assert want > 0
    np.testing.assert_allclose(float(out.dropped), want, rtol=1e-6)


def test_small_batches_are_padded_to_the_token_shards(moe_layer):
    """Decoding: 3 tokens over 8 token shards. The layer called as the inference code calls it: dropless."""
    layer, x = moe_layer
    x = jnp.asarray(x[:1, :3])
    want_y, want_r = layer(x)
    mesh = dsv2_jax.make_mesh(data=2, expert=4)
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))

    @jax.jit
    def call(state, x):
        with sharding.activation_mesh(mesh):
            return nnx.merge(graphdef, state)(x)

    y, r = call(state, x)
    assert rel_err(y, want_y) <= RTOL
    np.testing.assert_array_equal(np.asarray(r.experts), np.asarray(want_r.experts))
    assert bool(r.kept.all())


# ---------------------------------------------------------------------- device-limited routing
def test_group_limited_routing_reaches_at_most_topk_group_devices():
    """n_group = expert-axis size: each group of experts is one device's experts, so a token's experts lie on at
    most topk_group devices (the paper's M). Device placement read from the expert weights' sharding."""
    c = CONFIG.replace(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=4)
    mesh = dsv2_jax.make_mesh(expert=4, tensor=2)
    layer = MoE(c, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, c.hidden_size)).astype(np.float32))

    @jax.jit
    def call(state, x):
        with sharding.activation_mesh(mesh):
            return nnx.merge(graphdef, state)(x)

    _, r = call(state, batch_sharded(x, mesh))
    gate = state["gate_proj"][...]
    device_of_expert = np.zeros(c.num_experts, int)
    for device, idx in gate.sharding.devices_indices_map(gate.shape).items():
        coords = np.argwhere(mesh.devices == device)[0]
        device_of_expert[idx[0]] = coords[mesh.axis_names.index("expert")]
    devices = device_of_expert[np.asarray(r.experts)]
    spans = np.array([len(set(row)) for row in devices])
    assert spans.max() <= c.topk_group
    # without the group limit the same scores send many tokens to more than topk_group devices
    greedy = route(c.replace(topk_method="greedy"), jnp.log(r.scores))
    assert max(len(set(row)) for row in device_of_expert[np.asarray(greedy.experts)]) > c.topk_group
