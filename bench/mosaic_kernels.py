"""Mosaic GPU forms (Pallas's Hopper backend: TMA pipelines into shared memory, wgmma) of the one-token decoding
kernels, timed beside the library's Pallas Triton kernels in one process (bench/RESULTS.md §32). None of them is in
the library: the experts' pair at best ties `chosen_experts_mlp`, the persistent chain ties separate kernels, and
the dense products gain ~0.3-0.5 µs each. On an H100/H200:

    python bench/mosaic_kernels.py experts         # the chosen-experts pair: Mosaic row and W^T @ x^T forms, Pallas
    python bench/mosaic_kernels.py chain           # five dependent products: 5 kernels, one with grid barriers
    python bench/mosaic_kernels.py products        # q_proj with kv_a_proj, and o_proj: Mosaic against stacked_matvec
    python bench/mosaic_kernels.py experts --cpu   # the experts' check alone, in Mosaic GPU's interpreter

Every form runs over 12 layers' weights (V2-Lite's widths) in a `fori_loop`, 3 passes, so nothing stays in L2; the
kernels' durations come from the profiler (medians of the calls, µs). Weights go to `jax.jit` as arguments: closed
over, they would be embedded in the program as constants (gigabytes) and the compilation would not end.

The forms: the token is row 0 of a [64, k] tile (wgmma's A; the "row form"), or one of 8 columns of x^T (wgmma's B,
the weight tile transposed as A: the "W^T @ x^T form", a 2 KB token tile a step instead of 16 KB). The experts'
row form writes each expert's 8 rows into one [64, I] h, so that the down kernel takes 6 routed + 2 shared experts
as wgmma's 64 rows at once and keeps row 8j for expert j.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from bench.trace_summary import _device_pids, _load  # noqa: E402
from dsv2_jax.grouped_matmul import layer_operand  # noqa: E402

bf, f32 = jnp.bfloat16, jnp.float32
L, BK, REPS = 12, 128, 3
WG = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
INTERPRET = {}  # {"interpret": InterpretGPUParams()} under --cpu


def kernel_medians(trace_dir: str) -> dict:
    """{kernel name: [calls, median µs]} of the device kernels in the trace under trace_dir."""
    trace = _load(trace_dir)
    pids, by = _device_pids(trace), {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("pid") in pids and e.get("dur"):
            by.setdefault(e["name"][:60], []).append(e["dur"])
    return {k: [len(v), round(statistics.median(v), 3)] for k, v in sorted(by.items())}


def profiled(name, f, *args):
    """Compile and run f(*args) once, then profile 3 runs: prints the kernels' medians."""
    jax.block_until_ready(f(*args))
    trace_dir = tempfile.mkdtemp(prefix="mosaic_kernels_")
    with jax.profiler.trace(trace_dir):
        for _ in range(3):
            jax.block_until_ready(f(*args))
    print(json.dumps(dict(form=name, kernels=kernel_medians(trace_dir))), flush=True)


def layer_loop(f):
    """jit of x, w -> f(layer, x, w) over the L layers REPS times, each call's input depending on the last output."""
    def run(x, w):
        def body(i, acc):
            out = f(i % L, x + (acc * 0).astype(x.dtype), w)
            return acc + out.reshape(-1)[:1].astype(f32).reshape(1, 1)
        return jax.lax.fori_loop(0, L * REPS, body, jnp.zeros((1, 1), f32))
    return jax.jit(run)


def rel_err(got, want):
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def token_tile(x, rows):
    """x [1, D]: a [rows, D] tile with the token as row 0, the other rows zero (wgmma's 64 or 8 rows)."""
    return jnp.zeros((rows, x.shape[-1]), x.dtype).at[0].set(x[0])


# ---- the chosen experts of one token --------------------------------------------------------------------------

def with_layer(experts, layer):
    """The experts kernels' int32 operand: the K expert ids, then the layer (may be traced)."""
    return jnp.concatenate([experts.astype(jnp.int32), jnp.asarray(layer, jnp.int32)[None]])


def _experts_gate_up(x_tile, experts, gate, up, sgate, sup, layer, *, transposed, bn=64, steps=4, bk=BK):
    """Row form: x_tile [64, D] (row 0 the token), h [64, I] bf16, row 8j = expert j's silu(x Wg) * (x Wu).
    Transposed: x_tile [8, D], h^T [I, 64], column 8j = expert j's. gate/up [L, E, D, I]; sgate/sup [L, D, S*I]:
    6 routed experts from the stacks, then the shared ones, products rounded to bf16 before the SwiGLU."""
    D, I, K = gate.shape[2], gate.shape[3], experts.shape[0]
    J, nb = K + sgate.shape[-1] // I, I // bn
    acc_shape, x_block = ((bn, 8), (8, bk)) if transposed else ((64, bn), (64, bk))

    def kernel(e_gmem, x_gmem, g_gmem, u_gmem, sg_gmem, su_gmem, h_gmem):
        p = jax.lax.axis_index("g")
        j, n = p // nb, p % nb
        e, lay = e_gmem[jnp.minimum(j, K - 1)], e_gmem[K]

        def scope(acc_g, acc_u):
            def run(g, u, c):
                def step(_, x_s, g_s, u_s):
                    if transposed:
                        xt = plgpu.transpose_ref(x_s, (1, 0))
                        plgpu.wgmma(acc_g, plgpu.transpose_ref(g_s, (1, 0)), xt)
                        plgpu.wgmma(acc_u, plgpu.transpose_ref(u_s, (1, 0)), xt)
                    else:
                        plgpu.wgmma(acc_g, x_s, g_s)
                        plgpu.wgmma(acc_u, x_s, u_s)
                plgpu.emit_pipeline(step, grid=(D // bk,), max_concurrent_steps=steps, in_specs=[
                    plgpu.BlockSpec(x_block, lambda k: (0, k), delay_release=1),
                    plgpu.BlockSpec((bk, bn), lambda k: (k, c), delay_release=1),
                    plgpu.BlockSpec((bk, bn), lambda k: (k, c), delay_release=1)])(x_gmem, g, u)
            pl.when(j < K)(lambda: run(g_gmem.at[lay, e], u_gmem.at[lay, e], n))
            pl.when(j >= K)(lambda: run(sg_gmem.at[lay], su_gmem.at[lay], (j - K) * nb + n))
            g, u = (a[...].astype(bf).astype(f32) for a in (acc_g, acc_u))
            return (g / (1.0 + jnp.exp(-g)) * u).astype(bf)
        h = pl.run_scoped(scope, plgpu.ACC(acc_shape), plgpu.ACC(acc_shape))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(acc_shape, bf))
        def store(o_smem):
            o_smem[...] = h
            plgpu.commit_smem()
            if transposed:
                plgpu.copy_smem_to_gmem(o_smem, h_gmem.at[pl.ds(n * bn, bn), pl.ds(8 * j, 8)])
            else:
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, 8)], h_gmem.at[pl.ds(8 * j, 8), pl.ds(n * bn, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    kernel.__name__ = "experts_gate_up_wt_xt" if transposed else "experts_gate_up"
    out = (I, 8 * J) if transposed else (8 * J, I)
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(out, bf), grid=(J * nb,), grid_names=("g",),
                        compiler_params=WG, **INTERPRET)(with_layer(experts, layer), x_tile, gate, up, sgate, sup)


def _experts_down(h, experts, dn, sdn, layer, *, bn=64, steps=4, bk=BK):
    """h [64, I] from the row form's gate/up; dn [L, E, I, D]; sdn [L, S*I, D]. Returns [J, D] float32."""
    I, D, K = dn.shape[2], dn.shape[3], experts.shape[0]
    J, nb = h.shape[0] // 8, D // bn

    def kernel(e_gmem, h_gmem, d_gmem, sd_gmem, y_gmem):
        p = jax.lax.axis_index("g")
        j, n = p // nb, p % nb
        e, lay = e_gmem[jnp.minimum(j, K - 1)], e_gmem[K]

        def scope(acc):
            def run(w):
                def step(_, a_s, w_s):
                    plgpu.wgmma(acc, a_s, w_s)
                plgpu.emit_pipeline(step, grid=(I // bk,), max_concurrent_steps=steps, in_specs=[
                    plgpu.BlockSpec((64, bk), lambda k: (0, k), delay_release=1),
                    plgpu.BlockSpec((bk, bn), lambda k: (k, n), delay_release=1)])(h_gmem, w)
            pl.when(j < K)(lambda: run(d_gmem.at[lay, e]))
            pl.when(j >= K)(lambda: run(sd_gmem.at[lay, pl.ds((j - K) * I, I)]))
            return acc[...]
        y = pl.run_scoped(scope, plgpu.ACC((64, bn)))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((64, bn), f32))
        def store(o_smem):
            o_smem[...] = y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(8 * j, 8)], y_gmem.at[j, pl.ds(0, 8), pl.ds(n * bn, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    kernel.__name__ = "experts_down"
    y = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((J, 8, D), f32), grid=(J * nb,), grid_names=("g",),
                     compiler_params=WG, **INTERPRET)(with_layer(experts, layer), h, dn, sdn)
    return y[:, 0]


def mosaic_experts_mlp(x, experts, gate, up, dn, shared, layer, tiles=(64, 4, 64, 4), **kw):
    """The row-form pair: chosen_experts_mlp(x, experts[None], gate, up, dn, shared, layer)[0], [J, D] float32.
    tiles: gate/up's column block and pipeline stages, then down's."""
    h = _experts_gate_up(token_tile(x, 64), experts, gate, up, shared[0], shared[1], layer, transposed=False,
                         bn=tiles[0], steps=tiles[1], **kw)
    return _experts_down(h, experts, dn, shared[2], layer, bn=tiles[2], steps=tiles[3], **kw)


def transposed_gate_up(x, experts, gate, up, shared, layer, **kw):
    """The W^T @ x^T gate/up: [J, I] bf16 (the down kernel of this form is not written)."""
    h_t = _experts_gate_up(token_tile(x, 8), experts, gate, up, shared[0], shared[1], layer, transposed=True,
                           **kw)
    return h_t[:, ::8].T


def experts(cpu: bool) -> list:
    """The pair checked on two layers (rows returned), then, on the GPU, every form timed."""
    from dsv2_jax.grouped_matmul import chosen_experts_mlp
    E, D, I, S, K = (8, 256, 128, 2, 6) if cpu else (64, 2048, 1408, 2, 6)
    layers = 2 if cpu else L

    def stack(shape, k):
        base = jax.random.normal(jax.random.key(k), shape, bf) / 32
        return base[None] * jnp.linspace(0.5, 1.5, layers).astype(bf).reshape((layers,) + (1,) * len(shape))
    gate, up, dn = stack((E, D, I), 1), stack((E, D, I), 2), stack((E, I, D), 3)
    shared = tuple(stack(s, k) for k, s in ((4, (D, S * I)), (5, (D, S * I)), (6, (S * I, D))))
    rng = np.random.default_rng(0)
    chosen = jnp.asarray([rng.choice(E, K, replace=False) for _ in range(layers)], jnp.int32)
    x = jax.random.normal(jax.random.key(9), (1, D), bf)
    checks = []
    for lay in range(2):
        want = chosen_experts_mlp(x, chosen[lay][None], gate, up, dn, shared, lay, interpret=cpu)[0]
        got = mosaic_experts_mlp(x, chosen[lay], gate, up, dn, shared, lay, bk=64 if cpu else BK)
        row = dict(check=f"layer {lay}", row_form_rel_err_vs_chosen_experts_mlp=rel_err(got, want))
        if not cpu:  # the interpreter has no rule for transposed refs
            xf = x[0].astype(f32)

            def product(routed, shared_w):  # [J, I]: routed experts, then shared, rounded to bf16 as the kernel
                return jnp.concatenate([jnp.einsum("d,edi->ei", xf, routed[lay, chosen[lay]].astype(f32)),
                                        (xf @ shared_w[lay].astype(f32)).reshape(S, I)]).astype(bf).astype(f32)
            g, u = product(gate, shared[0]), product(up, shared[1])
            h_want = (jax.nn.silu(g) * u).astype(bf).astype(f32)
            h_got = transposed_gate_up(x, chosen[lay], gate, up, shared, lay).astype(f32)
            row["transposed_gate_up_rel_err_vs_float32"] = rel_err(h_got, h_want)
        print(json.dumps(row), flush=True)
        checks.append(row)
    if cpu:
        return checks
    forms = {f"mosaic row form {t}": (lambda lay, x, w, t=t: mosaic_experts_mlp(x, w[4][lay], *w[:4], lay, t))
             for t in [(64, 4, 64, 4), (64, 3, 64, 6), (128, 2, 128, 4)]}
    forms["mosaic row form, 64-row steps (64, 8, 64, 8)"] = (
        lambda lay, x, w: mosaic_experts_mlp(x, w[4][lay], *w[:4], lay, (64, 8, 64, 8), bk=64))
    for bn, steps in [(64, 4), (64, 6)]:
        forms[f"mosaic W^T @ x^T gate/up ({bn}, {steps})"] = (
            lambda lay, x, w, bn=bn, steps=steps: transposed_gate_up(x, w[4][lay], w[0], w[1], w[3], lay, bn=bn,
                                                                     steps=steps))
    forms["pallas triton chosen_experts_mlp"] = (
        lambda lay, x, w: chosen_experts_mlp(x, w[4][lay][None], *w[:4], lay)[0])
    weights = (gate, up, dn, shared, chosen)
    for name, f in forms.items():
        profiled(name, layer_loop(f), x, weights)
    return checks


# ---- a chain of five dependent products, separate or in one kernel ---------------------------------------------

NP = [7, 1, 1, 1, 4]                    # weight tiles a program, by phase
ACTIVE = [132, 128, 44, 128, 132]       # programs with tiles, by phase (132: one per SM, all resident)
XC = [2048] + [a * 64 for a in ACTIVE[:4]]   # the phases' input columns
SLOT = [list(range(7)), [7], [0], [1], [2, 3, 4, 5]]   # shared-memory slots: phases 3-5 reuse phase 1's
BAR = [list(range(7)), [7], [8], [9], [10, 11, 12, 13]]


def _phase_ops(q, lay, ws, xs, outs, wbuf, xbuf, obuf, wbar, xbar):
    """Phase p, program q: acc = sum_i x_p[:, slice q] @ W_p[q * NP[p] + i] ([64, 128] @ [128, 64] by wgmma),
    rows 0-7 of acc (bf16) to columns q*64.. of the next phase's input."""
    def load_w(p):
        @pl.when(q < ACTIVE[p])
        def _():
            for i in range(NP[p]):
                plgpu.copy_gmem_to_smem(ws[p].at[lay, q * NP[p] + i], wbuf.at[SLOT[p][i]], wbar.at[BAR[p][i]])

    def load_x(p):
        @pl.when(q < ACTIVE[p])
        def _():
            plgpu.copy_gmem_to_smem(xs[p].at[:, pl.ds((q % (XC[p] // BK)) * BK, BK)], xbuf, xbar.at[p])

    def compute(p):
        @pl.when(q < ACTIVE[p])
        def _():
            plgpu.barrier_wait(xbar.at[p])

            def scope(acc):
                for i in range(NP[p]):
                    plgpu.barrier_wait(wbar.at[BAR[p][i]])
                    plgpu.wgmma(acc, xbuf, wbuf.at[SLOT[p][i]])
                plgpu.wgmma_wait(0)
                return acc[...]
            obuf[...] = pl.run_scoped(scope, plgpu.ACC((64, 64))).astype(bf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(obuf.at[pl.ds(0, 8)], outs[p].at[pl.ds(0, 8), pl.ds(q * 64, 64)])
            plgpu.wait_smem_to_gmem(0)
    return load_w, load_x, compute


def _chain_scratch():
    return [plgpu.SMEM((8, BK, 64), bf), plgpu.SMEM((64, BK), bf), plgpu.SMEM((64, 64), bf),
            plgpu.Barrier(num_arrivals=1, num_barriers=14), plgpu.Barrier(num_arrivals=1, num_barriers=5)]


def _chain_outs():
    return [jax.ShapeDtypeStruct((64, c), bf) for c in XC[1:]] + [jax.ShapeDtypeStruct((64, ACTIVE[4] * 64), bf)]


def chain_persistent(x1, ws, lay, *, prefetch=True, barrier=True):
    """The five phases in one kernel of 132 programs, a grid barrier between phases (a global semaphore each
    program signals and waits on until it reaches 132). prefetch: each phase's weights are loaded before the
    barrier ahead of it (phases 1-2 at the start, 3-5 once phase 1's tiles are consumed). barrier=False: wrong
    data, the read floor."""
    G = ACTIVE[0]

    def body(lay_gmem, x1g, w0, w1, w2, w3, w4, x2, x3, x4, x5, y, wbuf, xbuf, obuf, wbar, xbar):
        q = jax.lax.axis_index("g")
        load_w, load_x, compute = _phase_ops(q, lay_gmem[0], [w0, w1, w2, w3, w4], [x1g, x2, x3, x4, x5],
                                             [x2, x3, x4, x5, y], wbuf, xbuf, obuf, wbar, xbar)
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR((6,)))
        load_x(0)
        load_w(0)
        if prefetch:
            load_w(1)
        compute(0)
        if prefetch:
            for p in (2, 3, 4):
                load_w(p)
        for p in range(1, 5):
            if barrier:
                plgpu.semaphore_signal(sem.at[p - 1], 1, memory_scope="gpu")
                plgpu.semaphore_wait(sem.at[p - 1], G, decrement=False, memory_scope="gpu")
            if not prefetch:
                load_w(p)
            load_x(p)
            compute(p)
        if barrier:  # every program is past every wait once all have signalled the last count: reset to zero
            plgpu.semaphore_signal(sem.at[5], 1, memory_scope="gpu")

            @pl.when(q == 0)
            def _():
                plgpu.semaphore_wait(sem.at[5], G, memory_scope="gpu")
                for p in range(4):
                    plgpu.semaphore_wait(sem.at[p], G, memory_scope="gpu")
    return plgpu.kernel(body, out_type=_chain_outs(), grid=(G,), grid_names=("g",), compiler_params=WG,
                        scratch_types=_chain_scratch())(layer_operand(lay)[0], x1, *ws)[-1]


def chain_separate(x1, ws, lay):
    """The five phases as five kernels."""
    x = x1
    for p in range(5):
        def body(lay_gmem, xg, wg, og, wbuf, xbuf, obuf, wbar, xbar, p=p):
            slots = [[None] * 5 for _ in range(3)]
            slots[0][p], slots[1][p], slots[2][p] = wg, xg, og
            load_w, load_x, compute = _phase_ops(jax.lax.axis_index("g"), lay_gmem[0], *slots, wbuf, xbuf, obuf,
                                                 wbar, xbar)
            load_x(p)
            load_w(p)
            compute(p)
        body.__name__ = f"phase{p + 1}"
        x = plgpu.kernel(body, out_type=_chain_outs()[p], grid=(ACTIVE[p],), grid_names=("g",), compiler_params=WG,
                         scratch_types=_chain_scratch())(layer_operand(lay)[0], x, ws[p])
    return x


def chain_reference(x1, ws, lay):
    x = x1[0].astype(f32)
    for p in range(5):
        w = ws[p][lay].astype(f32).reshape(ACTIVE[p], NP[p], BK, 64).sum(1)
        xq = x.reshape(-1, BK)[jnp.arange(ACTIVE[p]) % (XC[p] // BK)]
        x = jnp.einsum("ak,akn->an", xq, w).astype(bf).astype(f32).reshape(-1)
    return x


def chain():
    sms = getattr(jax.devices()[0], "core_count", None)
    if sms is not None and sms < ACTIVE[0]:  # a grid barrier needs every program resident: one per SM
        print(json.dumps(dict(chain=f"skipped: {ACTIVE[0]} programs need as many SMs, the GPU has {sms}")))
        return
    ws = [jax.random.normal(jax.random.key(p), (L, ACTIVE[p] * NP[p], BK, 64), bf) / 16 for p in range(5)]
    x1 = token_tile(jax.random.normal(jax.random.key(9), (1, XC[0]), bf), 64)
    mb = sum(a * n for a, n in zip(ACTIVE, NP)) * BK * 64 * 2 / 1e6
    print(json.dumps(dict(weights_mb_a_layer=round(mb, 1))), flush=True)
    forms = {"5 kernels": chain_separate,
             "one kernel, weights loaded ahead, no barriers (wrong data: the floor)":
                 functools.partial(chain_persistent, barrier=False),
             "one kernel, grid barriers, weights loaded after each": functools.partial(chain_persistent,
                                                                                        prefetch=False),
             "one kernel, grid barriers, weights loaded before them": chain_persistent}
    for name, f in forms.items():
        errs = [rel_err(f(x1, ws, lay)[0].astype(f32), chain_reference(x1, ws, lay)) for lay in (0, 3)]
        print(json.dumps(dict(form=name, rel_err_vs_float32=errs)), flush=True)
        profiled(name, layer_loop(lambda lay, x, w, f=f: f(x, w, lay)), x1, ws)


# ---- the dense one-token products --------------------------------------------------------------------------------

def mosaic_matvec(x, ws, layer, *, parts, stages=4, bn=64, name="mosaic_matvec"):
    """x [1, K] bf16 times layer `layer` of each of ws ([L, K, N_i]): a tuple of [N_i] float32. W^T @ x^T form, a
    program per (64 columns, 1/parts of the contraction), the parts' float32 sums added by XLA."""
    K = x.shape[1]
    nbs = [w.shape[-1] // bn for w in ws]
    NB, N, ksteps = sum(nbs), sum(w.shape[-1] for w in ws), K // parts // BK

    def kernel(l_gmem, x_gmem, *refs):
        w_refs, o_gmem = refs[:-1], refs[-1]
        p = jax.lax.axis_index("g")
        n, s = p % NB, p // NB

        def scope(acc):
            def run(w, c):
                def step(_, x_s, w_s):
                    plgpu.wgmma(acc, plgpu.transpose_ref(w_s, (1, 0)), plgpu.transpose_ref(x_s, (1, 0)))
                plgpu.emit_pipeline(step, grid=(ksteps,), max_concurrent_steps=min(stages, ksteps), in_specs=[
                    plgpu.BlockSpec((8, BK), lambda k: (0, s * ksteps + k), delay_release=1),
                    plgpu.BlockSpec((BK, bn), lambda k: (s * ksteps + k, c), delay_release=1)])(x_gmem, w)
            start = 0
            for w, nb in zip(w_refs, nbs):
                pl.when((n >= start) & (n < start + nb))(lambda w=w, start=start: run(w.at[l_gmem[0]], n - start))
                start += nb
            return acc[...]
        r = pl.run_scoped(scope, plgpu.ACC((bn, 8)))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bn, 8), f32))
        def store(o_smem):
            o_smem[...] = r
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[s, pl.ds(n * bn, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    kernel.__name__ = name
    out = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((parts, N, 8), f32), grid=(NB * parts,),
                       grid_names=("g",), compiler_params=WG)(layer_operand(layer)[0], token_tile(x, 8), *ws)
    y, ends = out[:, :, 0].sum(0), np.cumsum([0] + [w.shape[-1] for w in ws])
    return tuple(y[a:b] for a, b in zip(ends, ends[1:]))


def products():
    from dsv2_jax.grouped_matmul import PROJECTION_TILES, stacked_matvec
    D = 2048
    keys = jax.random.split(jax.random.key(0), 4)
    weights = tuple(jax.random.normal(k, (L, D, n), bf) / 45 for k, n in zip(keys, (3072, 576, 2048)))
    x = jax.random.normal(keys[3], (1, D), bf)

    def pallas(x, wq, wkv, wo, lay):
        q, kv = stacked_matvec(x, (wq, wkv), lay, **PROJECTION_TILES[("input", 1)])
        o = stacked_matvec(q[:, :D].astype(bf) + kv[:, :1].astype(bf), wo, lay, **PROJECTION_TILES[("o_proj", 1)])
        return q[0], kv[0], o[0]

    def mosaic(x, wq, wkv, wo, lay, pq, po):
        q, kv = mosaic_matvec(x, (wq, wkv), lay, parts=pq, name=f"mosaic_input_{pq}_parts")
        (o,) = mosaic_matvec((q[:D].astype(bf) + kv[:1].astype(bf))[None], (wo,), lay, parts=po,
                             name=f"mosaic_o_proj_{po}_parts")
        return q, kv, o
    forms = {"pallas triton stacked_matvec": pallas}
    for pq, po in [(2, 4), (4, 8), (2, 8), (4, 4)]:
        forms[f"mosaic, q/kv in {pq} parts, o_proj in {po}"] = functools.partial(mosaic, pq=pq, po=po)
    want = jax.jit(pallas)(x, *weights, 5)
    for name, f in forms.items():
        got = jax.jit(f)(x, *weights, 5)
        print(json.dumps(dict(form=name, rel_err_vs_stacked_matvec=max(map(rel_err, got, want)))), flush=True)

        def step(lay, x, w, f=f):  # x -> q/kv -> o_proj -> the next layer's x
            o = f(x, *w, lay)[2]
            return (o[None] / (jnp.linalg.norm(o) + 1e-6) * 45).astype(bf)
        profiled(name, layer_loop(step), x, weights)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="*", help="experts, chain, products (default: all three)")
    parser.add_argument("--cpu", action="store_true", help="the experts' check in Mosaic GPU's interpreter")
    args = parser.parse_args(argv)
    runs = {"experts": lambda: experts(cpu=False), "chain": chain, "products": products}
    if unknown := [w for w in args.which if w not in runs]:
        parser.error(f"unknown benchmark {unknown}: choose from {list(runs)}")
    if args.cpu:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private: the interpreter
        INTERPRET["interpret"] = InterpretGPUParams()
        return experts(cpu=True)
    for which in args.which or list(runs):
        t = time.perf_counter()
        runs[which]()
        print(json.dumps(dict(done=which, s=round(time.perf_counter() - t, 1))), flush=True)


if __name__ == "__main__":
    main()
