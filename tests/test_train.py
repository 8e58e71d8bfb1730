"""Training: loss falls, exact resume, kill during save, balance losses, accumulation, schedule, NaN stop."""

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_model import all_eqns

from dsv2_jax import ModelConfig
from dsv2_jax.model import DeepseekV2
from dsv2_jax.moe import RouterOutput
from dsv2_jax.training import (
    OptimizerConfig,
    StepSettings,
    balance_losses,
    learning_rate_schedule,
    linear_cross_entropy,
    load_recipe,
    logsumexp_once,
    train,
    train_step,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["model_overrides={num_hidden_layers: 2}", "data.seq_len=64", "batch_size=4", "log_every=1",
         "eval_every=1000", "checkpoint_every=3", "optimizer.warmup_steps=3", "mesh={data: 1}"]


def small_recipe(*extra):
    return load_recipe(TINY_YAML, SMALL + list(extra))


def test_loss_falls_well_below_start(tmp_path, monkeypatch):
    records = train(small_recipe("steps=30", "batch_size=8", "optimizer.lr=5e-3"), str(tmp_path), progress=False)
    start, end = records[0]["loss"], np.mean([r["loss"] for r in records[-3:]])
    assert end < 0.6 * start, (start, end)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    for key in ("step", "loss", "lr", "grad_norm", "expert_balance", "device_balance", "comm_balance",
                "tokens_per_sec", "mfu", "dropped_fraction", "expert_load", "expert_load_max_over_mean"):
        assert key in lines[-1], key
    assert np.asarray(lines[-1]["expert_load"]).shape == (1, 8)
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    from dsv2_jax.metrics import plot
    for png in plot(str(tmp_path)):
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import dsv2_jax
    monkeypatch.chdir(tmp_path.parent)  # the workdir by a relative path, as on the command line
    model = dsv2_jax.load(tmp_path.name, dtype=jnp.float32)
    assert model.config.num_hidden_layers == 2 and np.isfinite(np.asarray(model(jnp.zeros((1, 4), jnp.int32)))).all()
    # stored a layer (and an expert) a chunk, so an export reads each tensor from its own chunks
    from dsv2_jax.checkpoint import StoredParams, find_step_dir
    stored = StoredParams(find_step_dir(tmp_path.name))
    for path, lead in [(("moe_layers", "mlp", "up_proj"), 2), (("moe_layers", "attn", "k_b_proj"), 1),
                       (("dense_layers", "mlp", "down_proj"), 1)]:
        stored.read(path, (0,))
        chunk, shape = stored._open[path].chunk_layout.read_chunk.shape, stored.meta[path].shape
        assert chunk[:lead] == (1,) * lead and chunk[lead:] == tuple(shape[lead:]), (path, chunk)


def test_stop_and_resume_equals_unbroken_run(tmp_path):
    recipe = small_recipe("steps=8", "keep_checkpoints=5")
    unbroken = train(recipe, str(tmp_path / "a"), progress=False)
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["3", "6", "8"]  # every 3 steps and the end
    first = train(recipe, str(tmp_path / "b"), stop_after=5, progress=False)
    second = train(recipe, str(tmp_path / "b"), progress=False)
    assert [r["step"] for r in first + second] == list(range(1, 9))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in unbroken]  # bit-exact
    # A run that went on past its last checkpoint (steps 7-8 logged, then lost): resumed from step 6, each step
    # is in metrics.jsonl once, with the resumed run's values.
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "8")
    again = train(recipe, str(tmp_path / "a"), progress=False)
    lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in again] == [7, 8] and [r["step"] for r in lines] == list(range(1, 9))
    assert [r["loss"] for r in lines] == [r["loss"] for r in unbroken]
    # another model in the same workdir: an error naming what differs, before anything is restored
    with pytest.raises(ValueError, match="another model: num_hidden_layers 2 there, 1 in the recipe"):
        train(small_recipe("steps=9", "keep_checkpoints=5", "model_overrides={num_hidden_layers: 1}"), str(tmp_path / "a"),
              progress=False)
    # a setting that leaves the parameters' shapes (a longer context) goes on from the checkpoint
    longer = small_recipe("steps=9", "keep_checkpoints=5",
                          "model_overrides={num_hidden_layers: 2, max_position_embeddings: 8192}")
    assert [r["step"] for r in train(longer, str(tmp_path / "a"), progress=False)] == [9]


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    """SIGKILL while an async save is being written; the next start resumes from the previous complete step."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY_YAML, "--workdir", str(workdir),
           "--no-progress", "--steps", "40"] + [x for s in SMALL for x in ("--set", s)] + ["--set", "checkpoint_every=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = workdir / "checkpoints"
    killed_during = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(ckdir) if ckdir.exists() else []
        tmp = [n for n in names if "tmp" in n]
        done = [int(n) for n in names if n.isdigit()]
        if tmp and done:  # a save in flight while an earlier one is complete
            proc.send_signal(signal.SIGKILL)
            killed_during = tmp[0]
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_during is not None, "never caught a save in flight"
    complete = sorted(int(n) for n in os.listdir(ckdir) if n.isdigit())
    recipe = small_recipe("steps=40", "checkpoint_every=2")
    resumed = train(recipe, str(workdir), stop_after=1, progress=False)
    assert resumed[0]["step"] == complete[-1] + 1


def np_balance(scores, experts, mask, E, K, D, M):
    """REFERENCE.md's formulas, one layer and one sequence at a time."""
    L, B, S = scores.shape[0], mask.shape[0], mask.shape[1]
    out = np.zeros(3)
    for l in range(L):
        per_seq = np.zeros((B, 3))
        for b in range(B):
            idx = [t for t in range(S) if mask[b, t]]
            T = len(idx)
            s = scores[l, b, idx]
            ch = np.zeros((T, E))
            for j, t in enumerate(idx):
                ch[j, experts[l, b, t]] = 1
            f = E / (K * T) * ch.sum(0)
            P = s.sum(0) / T
            per_seq[b, 0] = (f * P).sum()
            g = E // D
            fd = np.array([f[d * g:(d + 1) * g].mean() for d in range(D)])
            Pd = np.array([P[d * g:(d + 1) * g].sum() for d in range(D)])
            per_seq[b, 1] = (fd * Pd).sum()
            sent = np.array([[ch[j, d * g:(d + 1) * g].max() for d in range(D)] for j in range(T)])
            f2 = D / (M * T) * sent.sum(0)
            per_seq[b, 2] = (f2 * Pd).sum()
        out += per_seq.mean(0)
    return out


def test_balance_losses_match_numpy_and_reach_the_router():
    rng = np.random.default_rng(0)
    L, B, S, E, K, D, M = 2, 3, 10, 8, 3, 4, 2
    logits = rng.normal(size=(L, B * S, E)).astype(np.float32)
    scores = np.asarray(jax.nn.softmax(logits, -1))
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(B * S)]) for _ in range(L)])
    mask = np.ones((B, S), bool)
    mask[1, 7:] = False  # padding
    r = RouterOutput(jnp.zeros((L, B * S, K)), jnp.asarray(experts, jnp.int32), jnp.asarray(scores))
    (a, b, c), load = balance_losses(r, jnp.asarray(mask), E, K, D, M)
    want = np_balance(scores.reshape(L, B, S, E), experts.reshape(L, B, S, K), mask, E, K, D, M)
    np.testing.assert_allclose([a, b, c], want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(load).sum(-1), 1.0, rtol=1e-6)

    def total(lg):
        rr = r._replace(scores=jax.nn.softmax(lg, -1))
        return sum(balance_losses(rr, jnp.asarray(mask), E, K, D, M)[0])

    grad = jax.grad(total)(jnp.asarray(logits))
    assert np.abs(np.asarray(grad)).max() > 1e-4


def test_gradient_accumulation_equals_one_large_batch():
    config = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, initializer_range=0.05)
    model = DeepseekV2(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    optimizer = optax.sgd(1.0)  # new params = params - gradient: compares the gradients themselves
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, (4, 16)).astype(np.int32)
    segs = np.ones_like(tokens)
    segs[:, 9:] = 2  # two documents per row, and row 3 with padding
    segs[3, 12:] = 0
    pos = np.where(segs == 2, np.arange(16) - 9, np.arange(16)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": segs, "positions": pos}
    settings = StepSettings("none", None, (0.01, 0.02, 0.03), 4, 2)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, settings=settings))
    results = []
    for k in (1, 4):  # one batch of four rows, four micro-batches of one row
        micro = {n: jnp.asarray(v.reshape(k, 4 // k, 16)) for n, v in batch.items()}
        results.append(step(params, optimizer.init(params), micro))
    for p, _, m in results[1:]:
        np.testing.assert_allclose(m["loss"], results[0][2]["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["expert_balance"], results[0][2]["expert_balance"], rtol=1e-6)
        for p0, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p), jax.tree.leaves(results[0][0])):
            ga, gb = np.asarray(p0 - a), np.asarray(p0 - b)  # the gradients, up to rounding of p0 - g
            rounding = 4 * np.finfo(np.float32).eps * np.abs(np.asarray(p0)).max()
            assert np.abs(ga - gb).max() <= 1e-5 * np.abs(gb).max() + rounding


def test_linear_cross_entropy_equals_full_logits():
    """The chunked loss and its gradients equal log_softmax over all logits at once: fp32 to 1e-6 for chunks that
    divide the sequence, do not, and exceed it; in bf16 the gradients stay within bf16 rounding of fp32's. w's
    float32 gradient sum starts from the first chunk's product, not from a zeroed [D, V] buffer."""
    rng = np.random.default_rng(0)
    B, S, D, V = 2, 13, 16, 37
    x = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    weights = jnp.asarray(rng.random((B, S)) * (rng.random((B, S)) > 0.3), jnp.float32)

    def reference(x, w):
        logp = jax.nn.log_softmax(jnp.einsum("bsd,dv->bsv", x, w, precision="highest"), axis=-1)
        return -0.5 * jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)

    want, (want_dx, want_dw) = jax.value_and_grad(reference, (0, 1))(x, w)
    for chunk in (4, 13, 64):
        def loss(x, w, chunk=chunk):
            return 0.5 * linear_cross_entropy(x, w, targets, weights, chunk)
        got, (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(loss)(x, w), want, rtol=1e-6)  # the primal, undifferentiated
        for g, ref in ((dx, want_dx), (dw, want_dw)):
            assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max(), chunk
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got, (dx, dw) = jax.value_and_grad(lambda x, w: 0.5 * linear_cross_entropy(x, w, targets, weights, 4), (0, 1))(
        xb, wb)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(got, want, rtol=2e-2)
    for g, ref in ((dx, want_dx), (dw, want_dw)):
        assert np.abs(np.asarray(g, np.float32) - ref).max() <= 2e-2 * np.abs(ref).max()
    # w's float32 gradient starts from the first chunk's product: no zeroed [D, V] buffer is made to add it to
    # (on the GPU a 0.25 ms fill of V-by-D float32 a step at V2-Lite's widths; bench/RESULTS.md §41).
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: linear_cross_entropy(x, w, targets, weights, 4), (0, 1)))(xb, wb)
    fills = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "broadcast_in_dim"
             and e.outvars[0].aval.shape == (D, V)]
    assert not fills


@pytest.mark.parametrize("operands", ["float32", "bfloat16"])
def test_linear_cross_entropy_with_bf16_logits(operands):
    """logits_dtype "bfloat16": the loss and its gradients equal a float64 cross-entropy over the head's product
    rounded to bf16 (1e-6; gradients of bf16 operands within bf16 rounding), in chunks that divide the sequence and
    do not; that product is the exact one rounded (within one bf16 step), and the loss differs from the float32
    logits' by more than the tolerance. float32 operands take the pinned rounding; bf16 ones (the compute dtype in
    training) a product written in bf16. On a GPU both check that XLA keeps the rounding."""
    rng = np.random.default_rng(1)
    B, S, D, V = 2, 13, 16, 37
    dt = jnp.dtype(operands)
    x = jnp.asarray(rng.normal(size=(B, S, D)), dt)
    w = jnp.asarray(rng.normal(size=(D, V)), dt)  # logits of a few units: bf16 steps of ~1e-2
    targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    weights = jnp.asarray(rng.random((B, S)) * (rng.random((B, S)) > 0.3), jnp.float32)
    stored = jnp.einsum("bsd,dv->bsv", x, w, preferred_element_type=jnp.bfloat16)
    exact = np.einsum("bsd,dv->bsv", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert np.abs(np.asarray(stored, np.float64) - exact).max() <= 2 ** -8 * np.abs(exact).max()
    logits = np.asarray(stored, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    t, wt = np.asarray(targets), np.asarray(weights, np.float64)
    want = -0.5 * np.sum(np.take_along_axis(logp, t[..., None], -1)[..., 0] * wt)
    dlogits = 0.5 * (np.exp(logp) - np.eye(V)[t]) * wt[..., None]
    want_dx = np.einsum("bsv,dv->bsd", dlogits, np.asarray(w, np.float64))
    want_dw = np.einsum("bsd,bsv->dv", np.asarray(x, np.float64), dlogits)
    for chunk in (4, 13):
        def loss(x, w, chunk=chunk):
            return 0.5 * linear_cross_entropy(x, w, targets, weights, chunk, "bfloat16")
        got, (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(loss)(x, w), want, rtol=1e-6)
        for g, ref in ((dx, want_dx), (dw, want_dw)):
            tol = 1e-6 if operands == "float32" else 2 ** -7  # bf16 gradients: rounded, from a bf16 d logits
            assert np.abs(np.asarray(g, np.float64) - ref).max() <= tol * np.abs(ref).max(), chunk
    float32_loss = 0.5 * linear_cross_entropy(x, w, targets, weights, 4)
    assert abs(float(float32_loss) - want) > 1e-5 * abs(want)  # ten times the tolerance above


def test_logsumexp_once_equals_a_float64_reference():
    """The one-pass log-sum-exp against numpy in float64: rows of large and mixed magnitudes (no overflow where a
    plain sum of exp would), all -inf (-inf), some -inf, and +inf (+inf), as jax.nn.logsumexp gives them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 1000)) * np.array([1.0, 30.0, 300.0])[:, None, None] + 1e3 * (rng.random((3, 7, 1)) - .5)
    x[0, 0] = -np.inf
    x[1, 1, :500] = -np.inf
    x[2, 2, 17] = np.inf
    got = np.asarray(jax.jit(logsumexp_once)(jnp.asarray(x, jnp.float32)))
    x32 = np.asarray(x, np.float32).astype(np.float64)  # the same inputs, rounded as the kernel sees them
    m = x32.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.where(np.isfinite(m[..., 0]), (m + np.log(np.exp(x32 - m).sum(-1, keepdims=True)))[..., 0],
                        m[..., 0])
    assert got[0, 0] == -np.inf and got[2, 2] == np.inf
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-6, atol=0)


def test_softmax_rows_kernel_equals_a_float64_reference():
    """The loss's Pallas kernel (interpreted here): each row's log-sum-exp and (softmax − onehot) · weight against
    numpy in float64, for float32 and bf16 logits, in blocks of one and several rows and of columns narrower than the
    vocabulary and wider (the whole row); rows of mixed magnitudes, all -inf (-inf, as logsumexp_once) and partly
    -inf."""
    from dsv2_jax.training import softmax_rows
    rng = np.random.default_rng(2)
    R, V = 24, 512
    x = rng.normal(size=(2, R // 2, V)) * rng.choice([1.0, 30.0], (2, R // 2, 1)) + 50 * rng.normal(size=(2, R // 2, 1))
    x[0, 3] = -np.inf
    x[1, 5, :300] = -np.inf
    targets = rng.integers(0, V, (2, R // 2))
    targets[1, 5] = 400  # a finite logit
    weights = rng.random((2, R // 2)) * (rng.random((2, R // 2)) > 0.2)
    for dtype in (jnp.float32, jnp.bfloat16):
        logits = jnp.asarray(x, dtype)
        seen = np.asarray(logits.astype(jnp.float32), np.float64)  # the values the kernel reads
        m = seen.max(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.where(np.isfinite(m), m + np.log(np.exp(seen - m).sum(-1, keepdims=True)), m)[..., 0]
            want_g = (np.exp(seen - want[..., None]) - np.eye(V)[targets]) * weights[..., None]
        for tiles in (dict(block_r=1, block_v=128), dict(block_r=4, block_v=256), dict(block_r=8, block_v=4096)):
            lse, g = softmax_rows(logits, jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32),
                                  jnp.float32, num_warps=4, num_stages=3, **tiles)
            assert lse.shape == (2, R // 2) and g.shape == (2, R // 2, V) and g.dtype == jnp.float32
            lse, g = np.asarray(lse, np.float64), np.asarray(g, np.float64)
            assert lse[0, 3] == -np.inf, tiles
            finite = np.isfinite(want)
            np.testing.assert_allclose(lse[finite], want[finite], rtol=2e-6, atol=0, err_msg=str(tiles))
            # float32 exp(x - lse): x - lse rounded at the rows' magnitudes (up to a few hundred)
            np.testing.assert_allclose(g[finite], want_g[finite], rtol=0, atol=1e-5, err_msg=str(tiles))
            only = softmax_rows(logits, jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32),
                                num_warps=4, num_stages=3, **tiles)  # without the gradient: the same sums
            np.testing.assert_array_equal(np.asarray(only, np.float64), lse)
    with pytest.raises(ValueError, match="multiple of 128"):
        softmax_rows(jnp.zeros((4, 100)), jnp.zeros(4, jnp.int32), jnp.ones(4), block_r=1, block_v=4096,
                     num_warps=4, num_stages=3)


@pytest.mark.parametrize("logits_dtype", ["float32", "bfloat16"])
def test_linear_cross_entropy_on_the_loss_kernel_equals_xla(monkeypatch, logits_dtype):
    """DSV2_LOSS_KERNEL=pallas (the GPU's default, interpreted here) against =xla: the same loss and gradients
    (1e-6 in float32 operands, within bf16 rounding of the bf16 gradients), alone and under an 8-device mesh whose
    batch axes split the rows (8 rows: the kernel runs per shard; 4: XLA's passes, as the programs show); where the
    vocabulary is not a multiple of 128 or is split over the tensor axis the kernel is not used; an unknown choice
    is an error."""
    from dsv2_jax import make_mesh
    from dsv2_jax.sharding import activation_mesh
    from dsv2_jax.training import loss_kernel
    rng = np.random.default_rng(3)
    S, D, V = 10, 16, 256
    eight = jax.device_count() >= 8  # the fake CPU devices (on one GPU: without the mesh)
    mesh = make_mesh(data=2, fsdp=2, expert=2) if eight else None
    for dtype, tol, B in ((jnp.float32, 1e-6, 8), (jnp.bfloat16, 2 ** -7, 8), (jnp.float32, 1e-6, 4)):
        targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
        weights = jnp.asarray(rng.random((B, S)) * (rng.random((B, S)) > 0.3), jnp.float32)
        x = jnp.asarray(rng.normal(size=(B, S, D)), dtype)
        w = jnp.asarray(rng.normal(size=(D, V)) / 2, dtype)

        def run(choice, mesh=None):
            monkeypatch.setenv("DSV2_LOSS_KERNEL", choice)
            with activation_mesh(mesh):
                assert loss_kernel(V) == (choice == "pallas")
                f = jax.jit(jax.value_and_grad(lambda x, w: linear_cross_entropy(x, w, targets, weights, 4,
                                                                                 logits_dtype), (0, 1)))
                return jax.device_get(f(x, w)), "pallas_call" in str(jax.make_jaxpr(f)(x, w))

        (want, (want_dx, want_dw)), kernel = run("xla")
        assert not kernel
        for on in (None, mesh) if eight else (None,):
            (got, (dx, dw)), kernel = run("pallas", on)
            assert kernel == (on is None or B == 8), (B, on)
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{dtype} {B} {on}")
            for g, ref in ((dx, want_dx), (dw, want_dw)):
                g, ref = np.asarray(g, np.float64), np.asarray(ref, np.float64)
                assert np.abs(g - ref).max() <= tol * np.abs(ref).max(), (dtype, B, on)
    monkeypatch.setenv("DSV2_LOSS_KERNEL", "pallas")
    assert not loss_kernel(100)
    if eight:
        with activation_mesh(make_mesh(data=2, expert=2, tensor=2)):
            assert not loss_kernel(V)
    monkeypatch.setenv("DSV2_LOSS_KERNEL", "triton")
    with pytest.raises(ValueError, match="DSV2_LOSS_KERNEL"):
        loss_kernel(V)
    monkeypatch.setenv("DSV2_LOSS_KERNEL", "auto")
    assert loss_kernel(V) == (jax.default_backend() == "gpu")


def test_schedule_hits_its_step_decays_exactly():
    opt = OptimizerConfig(lr=2.4e-4, warmup_steps=20, decay_at=[0.6, 0.9], decay_factor=0.316)
    lr = learning_rate_schedule(opt, 100)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.2e-4)
    assert float(lr(20)) == pytest.approx(2.4e-4) and float(lr(59)) == pytest.approx(2.4e-4)
    assert float(lr(60)) == pytest.approx(2.4e-4 * 0.316) and float(lr(89)) == pytest.approx(2.4e-4 * 0.316)
    assert float(lr(90)) == pytest.approx(2.4e-4 * 0.316 ** 2) and float(lr(99)) == pytest.approx(2.4e-4 * 0.316 ** 2)
    twice = learning_rate_schedule(OptimizerConfig(lr=1.0, warmup_steps=0, decay_at=[0.5, 0.5], decay_factor=0.5), 10)
    assert float(twice(4)) == 1.0 and float(twice(5)) == 0.25  # a fraction given twice decays twice
    cos = learning_rate_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(110)) == pytest.approx(0.1)


def test_weight_decay_skips_norms():
    from dsv2_jax.training import decay_mask
    model = DeepseekV2(ModelConfig.from_preset("tiny"), rngs=nnx.Rngs(0))
    mask = decay_mask(nnx.state(model).to_pure_dict())
    assert mask["moe_layers"]["attn"]["q_b_proj"] and mask["embed_tokens"]["embedding"]
    assert not mask["norm"]["weight"] and not mask["moe_layers"]["attn"]["kv_a_norm"]
    assert not mask["moe_layers"]["input_norm"]["weight"]


def test_global_norm_is_a_float32_sum_of_bf16_squares():
    from dsv2_jax.training import global_norm
    rng = np.random.default_rng(0)
    tree = {"stack": jnp.asarray(rng.normal(size=(2, 4096, 4096)) * 3.0, jnp.bfloat16),  # summed layer by layer
            "m": jnp.asarray(rng.normal(size=(64, 48)), jnp.bfloat16),
            "v": jnp.asarray(rng.normal(size=7), jnp.float32)}
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    for by_layer in (False, True):  # the stack in one reduction, or a layer at a time (unrolled layers)
        got = float(jax.jit(functools.partial(global_norm, by_layer=by_layer))(tree))
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_clip_by_global_norm_matches_optax():
    from dsv2_jax.training import clip_by_global_norm
    rng = np.random.default_rng(1)
    g = {"a": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    norm = float(optax.global_norm(g))
    for max_norm, by_layer in ((norm / 3, False), (norm * 3, False), (norm / 3, True)):
        ours, theirs = clip_by_global_norm(max_norm, by_layer), optax.clip_by_global_norm(max_norm)
        want, _ = theirs.update(g, theirs.init(g))
        got, state = ours.update(g, ours.init(g))
        assert state == theirs.init(g)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
        assert float(optax.global_norm(got)) == pytest.approx(min(norm, max_norm), rel=1e-6)


def test_xla_flag_reads_the_last_setting():
    from dsv2_jax.sharding import xla_flag
    name = "xla_gpu_enable_triton_gemm"
    assert xla_flag(name, {}) is None and xla_flag(name, {"XLA_FLAGS": "--xla_gpu_autotune_level=0"}) is None
    assert xla_flag(name, {"XLA_FLAGS": f"--xla_gpu_autotune_level=0 --{name}=false"}) == "false"
    assert xla_flag(name, {"XLA_FLAGS": f"-{name}=0 --{name}"}) == "true"  # a bare flag, the later one
    assert xla_flag(name, {"XLA_FLAGS": f"--{name}=false --{name}=True"}) == "True"
    assert xla_flag(name, {"XLA_FLAGS": f"--{name}_any=false"}) is None


def tiny_step_inputs(rows: int, seq: int, dtype=jnp.float32, **overrides):
    """The tiny preset (with overrides) as graphdef and params, and one micro-batch [1, rows, seq] of token 0."""
    config = ModelConfig.from_preset("tiny").replace(**overrides)
    graphdef, state = nnx.split(DeepseekV2(config, dtype=dtype, rngs=nnx.Rngs(0)))
    batch = {"tokens": jnp.zeros((1, rows, seq), jnp.int32), "segment_ids": jnp.ones((1, rows, seq), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, rows, seq))}
    return graphdef, state.to_pure_dict(), batch


def test_training_compiler_options_keep_the_users_choice_and_reach_both_steps(monkeypatch):
    from dsv2_jax import training
    options = functools.partial(training.training_compiler_options, platform="gpu")
    assert options({}) == training.TRAINING_COMPILER_OPTIONS == {"xla_gpu_enable_triton_gemm": False}
    assert options({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}) == training.TRAINING_COMPILER_OPTIONS
    for users in ("--xla_gpu_enable_triton_gemm=true", "-xla_gpu_enable_triton_gemm=false",
                  "--xla_gpu_enable_triton_gemm"):
        assert options({"XLA_FLAGS": f"--xla_dump_to=/tmp/x {users}"}) == {}
    for platform in ("cpu", "tpu"):  # GPU options for GPU compilations only
        assert training.training_compiler_options({}, platform) == {}
    # the options reach XLA with both compilations: XLA refuses an option it does not know, by name
    graphdef, params, batch = tiny_step_inputs(rows=2, seq=8, num_hidden_layers=1)
    optimizer = optax.sgd(1.0)
    settings = StepSettings("none", None, (0.0, 0.0, 0.0), 1, 1)
    monkeypatch.setattr(training, "TRAINING_COMPILER_OPTIONS", {"xla_no_such_option": True})
    step, evaluate = training.jit_steps(graphdef, optimizer, settings, None)
    eval_batch = {k: v[0] for k, v in batch.items()}
    for fn, args in ((step, (params, optimizer.init(params), batch)), (evaluate, (params, eval_batch))):
        with pytest.raises(Exception, match="xla_no_such_option"):
            fn.lower(*args).compile()
    step, _ = training.jit_steps(graphdef, optimizer, settings, None, compiler_options={})  # none at all
    assert np.isfinite(float(step(params, optimizer.init(params), batch)[2]["loss"]))


def test_training_steps_compile_without_xla_gemm_fusions_on_gpus():
    """On a GPU the compiled train and eval steps hold none of XLA's Triton GEMM fusions (TRAINING_COMPILER_OPTIONS),
    where the same train step compiled without options does."""
    from dsv2_jax.sharding import xla_flag
    from dsv2_jax.training import jit_steps
    if jax.default_backend() != "gpu" or xla_flag("xla_gpu_enable_triton_gemm") is not None:
        pytest.skip("the option acts on GPU compilations, where XLA_FLAGS does not set it")
    graphdef, params, batch = tiny_step_inputs(rows=4, seq=256, dtype=jnp.bfloat16, num_hidden_layers=2,
                                               hidden_size=512)
    optimizer = optax.adamw(1e-3)
    settings = StepSettings("none", None, (0.0, 0.0, 0.0), 1, 1)
    args = (params, optimizer.init(params), batch)

    def fusions(fn, *args):
        return fn.lower(*args).compile().as_text().count('"kind":"__triton_nested_gemm_fusion"')

    step, evaluate = jit_steps(graphdef, optimizer, settings, None)
    plain, _ = jit_steps(graphdef, optimizer, settings, None, compiler_options={})
    assert fusions(plain, *args) > 0
    assert fusions(step, *args) == 0 and fusions(evaluate, params, {k: v[0] for k, v in batch.items()}) == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    """With a log and a save at every step, each step's loss is checked before the next step is dispatched. With
    neither due (a save every 2 steps, a log every 1000) a loss is checked once the next step is queued: the same
    step is named, and no checkpoint after it is written."""
    from dsv2_jax.training import NonFiniteLoss
    named = []
    for every, log_every in ((1, 1), (2, 1000)):
        workdir = tmp_path / f"every{every}"
        recipe = small_recipe("steps=20", f"checkpoint_every={every}", f"log_every={log_every}", "optimizer.lr=1e30",
                              "optimizer.warmup_steps=0", "optimizer.clip_norm=1e30")
        with pytest.raises(NonFiniteLoss, match=r"at step (\d+)") as info:
            train(recipe, str(workdir), progress=False)
        bad = int(info.value.args[0].split("at step ")[1].split(";")[0])
        steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
        assert steps and steps[-1] == (bad - 1) // every * every, (bad, steps)
        named.append(bad)
    assert named[0] == named[1] and named[1] % 2 == 1, named  # an odd step: its check came one step late


def test_evaluate_is_the_mean_next_token_loss_of_the_held_out_batches(tmp_path):
    """training.evaluate against log-softmax in float64 over the model's logits for the same held-out batches, with
    targets written out here: the next token of the same document, none across documents, at a row's end or on
    padding. Short documents, so rows hold several."""
    from dsv2_jax.data import Pipeline
    from dsv2_jax.training import EvalData, evaluate, jit_steps
    rng = np.random.default_rng(0)
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text("".join(rng.choice(list("abcdefgh \n"), rng.integers(5, 40))))
    recipe = small_recipe("eval_batches=3", "data.eval_fraction=0.5", f"data.sources=[{tmp_path}/*.txt]")
    config = recipe.model_config()
    graphdef, state = nnx.split(DeepseekV2(config, dtype=jnp.float32, rngs=nnx.Rngs(1)))
    params = state.to_pure_dict()
    _, eval_fn = jit_steps(graphdef, optax.sgd(1.0), StepSettings("none", None, (0.0, 0.0, 0.0), 1, 1), None)
    got = evaluate(recipe, config, eval_fn, params, None)
    model = nnx.merge(graphdef, nnx.State(params))
    data = Pipeline(recipe.data, recipe.batch_size, "eval", model_config=config)
    nll, count, boundaries = 0.0, 0, 0
    for _ in range(recipe.eval_batches):
        batch = next(data)
        logits = np.asarray(model.forward(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                                          jnp.asarray(batch["segment_ids"])).logits, np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        seg = batch["segment_ids"]
        boundaries += int(np.sum((seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)))
        for r in range(seg.shape[0]):
            for t in range(seg.shape[1] - 1):
                if seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]:
                    nll -= logp[r, t, batch["tokens"][r, t + 1]]
                    count += 1
    assert count > 0 and boundaries > 0
    np.testing.assert_allclose(got["eval_loss"], nll / count, rtol=1e-5)
    np.testing.assert_allclose(got["eval_perplexity"], np.exp(nll / count), rtol=1e-5)
    # in the train step's micro-batches (grad_accum rows at a time): the same batches, the same loss
    accum = small_recipe("eval_batches=3", "data.eval_fraction=0.5", f"data.sources=[{tmp_path}/*.txt]", "grad_accum=2")
    data = EvalData(accum, config)
    assert len(list(data.batches())) == 6 and len(list(data.batches())) == 6  # from the split's start each time
    np.testing.assert_allclose(evaluate(accum, config, eval_fn, params, None, data)["eval_loss"], got["eval_loss"],
                               rtol=1e-6)
    # a held-out split with no document is an error when the run starts, naming the setting
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match="eval split has 0 documents.*data.eval_fraction=0.05"):
        EvalData(small_recipe(f"data.sources=[{tmp_path}/one/a.txt]"), config)


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe key.*optimizer.learning_rate"):
        load_recipe(TINY_YAML, ["optimizer.learning_rate=1"])
    with pytest.raises(ValueError, match="grad_accum"):
        load_recipe(TINY_YAML, ["batch_size=6", "grad_accum=4"])
    with pytest.raises(ValueError, match="remat"):
        load_recipe(TINY_YAML, ["remat=sometimes"])
    with pytest.raises(ValueError, match="loss_chunk"):
        load_recipe(TINY_YAML, ["loss_chunk=0"])
    with pytest.raises(ValueError, match="scan_layers"):
        load_recipe(TINY_YAML, ["scan_layers=sometimes"])
    assert load_recipe(TINY_YAML, ["scan_layers=false"]).scan_layers is False
    with pytest.raises(ValueError, match="logits_dtype"):
        load_recipe(TINY_YAML, ["logits_dtype=float16"])
    assert load_recipe(TINY_YAML, ["logits_dtype=bfloat16"]).logits_dtype == "bfloat16"
    for override, key in [("data.seq_len=abc", "data.seq_len"), ("mesh.foo=2", "mesh"), ("mesh.data=0", "mesh.data"),
                          ("model_overrides.num_hidden_layerz=2", "model_overrides"), ("seed=abc", "seed"),
                          ("optimizer.lr.x=1", "optimizer.lr"), ("optimizer.decay_at=0.5", "optimizer.decay_at"),
                          ("optimizer.decay_at=[60]", "optimizer.decay_at"), ("capacity_factor=abc", "capacity_factor"),
                          ("eval_batches=0", "eval_batches"), ("keep_checkpoints=0", "keep_checkpoints"),
                          ("optimizer.clip_norm=0", "optimizer.clip_norm"), ("data=3", "data"),
                          ("balance.device_limit=1.5", "balance.device_limit"), ("model=nonexistent", "model"),
                          ("model_overrides.hidden_size=abc", "model_overrides"), ("data.format=csv", "data.format")]:
        with pytest.raises(ValueError, match=re.escape(key)):
            load_recipe(TINY_YAML, [override])
    assert load_recipe(TINY_YAML, ["data.sources=a.txt"]).data.sources == ["a.txt"]  # one file, not its letters


def test_train_help_lists_every_recipe_key():
    import dataclasses
    from dsv2_jax.data import DataConfig
    from dsv2_jax.training import BalanceConfig, Recipe
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for cls, prefix in [(Recipe, ""), (DataConfig, "data."), (OptimizerConfig, ""), (BalanceConfig, "")]:
        for f in dataclasses.fields(cls):
            assert re.search(rf"(?<![\w.]){re.escape(prefix + f.name)}(?!\w)", cli.RECIPE_KEYS), prefix + f.name


def test_step_settings_scan_layers_unrolls_the_layers():
    """StepSettings.scan_layers reaches the model: the unrolled step has one lax.scan per layer run fewer (the
    chunked cross-entropy keeps its own)."""
    config = ModelConfig.from_preset("tiny")
    graphdef, state = nnx.split(DeepseekV2(config, rngs=nnx.Rngs(0)))
    params = state.to_pure_dict()
    optimizer = optax.sgd(1.0)
    batch = {k: jnp.ones((1, 2, 16), jnp.int32) for k in ("tokens", "segment_ids", "positions")}

    def scans(scan_layers):
        settings = StepSettings("full", None, (0.01, 0.0, 0.0), 1, 1, scan_layers=scan_layers)
        step = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, settings=settings)
        jaxpr = jax.make_jaxpr(step)(params, optimizer.init(params), batch).jaxpr
        return sum(eqn.primitive.name == "scan" for eqn in all_eqns(jaxpr))

    assert scans(True) - scans(False) == 4  # the dense run and the MoE run, forward and backward


@pytest.mark.parametrize("name", ["tiny", "deepseek-v2-lite", "deepseek-v2"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert recipe.model_config().num_hidden_layers in (4, 27, 60)


def test_train_step_on_a_mesh_equals_single_device():
    """One optimizer step with params, optimizer state and batch sharded over 8 fake devices."""
    from dsv2_jax import make_mesh
    from dsv2_jax.sharding import init_model
    from dsv2_jax.training import jit_steps, on_mesh, to_global

    config = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, initializer_range=0.05)
    optimizer = optax.sgd(1.0)  # new params = params - gradient: compares the gradients themselves
    settings = StepSettings("none", None, (0.01, 0.02, 0.03), 4, 2)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 259, (1, 8, 16)).astype(np.int32),
             "segment_ids": np.ones((1, 8, 16), np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (1, 8, 16)).copy()}
    results = []
    for mesh in (None, make_mesh(data=2, expert=2, tensor=2)):
        graphdef, state = nnx.split(init_model(config, mesh=mesh, seed=0))
        params = state.to_pure_dict()
        opt_state = on_mesh(jax.jit(optimizer.init)(params), mesh)
        step, _ = jit_steps(graphdef, optimizer, settings, mesh, params, opt_state)
        before = jax.tree.map(lambda x: x.sharding, params)
        new_params, _, metrics = step(params, opt_state, to_global(batch, mesh))
        if mesh is not None:  # updated params keep their shardings; experts really are split
            assert jax.tree.map(lambda x: x.sharding, new_params) == before
            w = new_params["moe_layers"]["mlp"]["gate_proj"]
            assert w.sharding.shard_shape(w.shape)[1] == config.num_experts // 2
        results.append((jax.device_get(new_params), jax.device_get(metrics)))
    (p0, m0), (p1, m1) = results
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)
    start = jax.device_get(nnx.split(init_model(config, seed=0))[1].to_pure_dict())
    for s0, a, b in zip(jax.tree.leaves(start), jax.tree.leaves(p1), jax.tree.leaves(p0)):
        ga, gb = s0 - a, s0 - b  # the gradients, up to rounding of p - g
        rounding = 4 * np.finfo(np.float32).eps * np.abs(s0).max()
        assert np.abs(ga - gb).max() <= 1e-5 * np.abs(gb).max() + rounding


def test_training_loop_runs_on_a_mesh(tmp_path):
    """train() end to end on 8 fake devices: AdamW state, checkpoints, resume."""
    recipe = small_recipe("steps=3", "batch_size=8", "mesh={data: 2, expert: 2, tensor: 2}", "checkpoint_every=2")
    first = train(recipe, str(tmp_path), stop_after=2, progress=False)
    second = train(recipe, str(tmp_path), progress=False)
    assert [r["step"] for r in first + second] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in first + second)
