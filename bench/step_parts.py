"""Parts of the batch-12 training step outside its big kernels, each timed as the code runs it and in the form it
replaced (or an alternative), checked against each other: the MoE layer's row gathers, the experts' combine
backward with the router's scatter, the norm of a layer-stacked gradient, the input gradient of the experts'
grouped matmul (rhs transposed), and the loss's passes over one chunk's logits (`training.softmax_rows` against
XLA's fusions, float32 and bf16 logits). GPU; defaults are batch 12 × 4096 tokens at V2-Lite widths, and for the
loss 2 × 1024 rows (batch 2, the default loss_chunk) of V2-Lite's 102,400 logits.

    python bench/step_parts.py                      # all parts
    python bench/step_parts.py --parts norm transposed
    python bench/step_parts.py --parts loss --loss-tiles 1,2048,4,3 1,4096,4,3 8,2048,4,3   # + these kernel tiles
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(name, f, *args, calls=20, ref=None, per_wait=1):
    """Median ms of `calls` jitted calls (per_wait > 1: of rounds of that many calls dispatched back to back, one
    wait each, per call: for parts of well under a millisecond, where a wait per call adds the host's round trip);
    with ref, the largest difference from it."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(f)
    out = jax.block_until_ready(f(*args))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        for _ in range(per_wait):
            result = f(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - t) / per_wait)
    check = ""
    if ref is not None:
        diffs = [float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
                 for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))]
        check = f"   max |difference| {max(diffs):.3g}"
    print(f"  {name:68s} {np.median(times) * 1e3:8.3f} ms{check}", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["gather", "combine", "norm", "transposed", "loss"],
                        choices=["gather", "combine", "norm", "transposed", "loss"])
    parser.add_argument("--tokens", type=int, default=12 * 4096)
    parser.add_argument("--loss-rows", type=int, default=2 * 1024, help="the loss's chunk: batch × loss_chunk rows")
    parser.add_argument("--vocab", type=int, default=102400)
    parser.add_argument("--loss-tiles", nargs="*", default=[], metavar="ROWS,COLUMNS,WARPS,STAGES",
                        help="softmax_rows tiles to time beside the code's (training.LOSS_KERNEL_TILES)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    from dsv2_jax import grouped_matmul as gm
    from dsv2_jax import moe
    from dsv2_jax import training
    from dsv2_jax.training import global_norm

    T, K, D, E, I = args.tokens, 6, 2048, 64, 1408  # noqa: E741
    rng = np.random.default_rng(0)
    experts = jnp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32))
    weights = jnp.asarray(rng.random((T, K)).astype(np.float32))
    order, group_sizes = moe.sort_by_expert(experts, E)
    inv = moe.inverse_permutation(order)
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (T, D), jnp.bfloat16)
    rows = jax.random.normal(keys[1], (T * K, D), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (T, D), jnp.float32)

    def take_rows(a, idx):  # a[idx] as one in-bounds gather: no clamping or negative-index fix-up
        dims = lax.GatherDimensionNumbers(offset_dims=tuple(range(1, a.ndim)), collapsed_slice_dims=(0,),
                                          start_index_map=(0,))
        return lax.gather(a, idx[:, None], dims, (1,) + a.shape[1:], mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)

    if "gather" in args.parts:
        print(f"the experts' input rows, x[order // {K}] -> [{T * K}, {D}] bf16")
        ref = timed("gather_copies (the code's)", lambda x, o: moe.gather_copies(x, o, inv, K), x, order)
        timed("one in-bounds gather of token ids computed first", lambda x, o: take_rows(
            x, lax.optimization_barrier(o // K)), x, order, ref=ref)
        timed("floor: jnp.tile of x, the same bytes written", lambda x: jnp.tile(x, (K, 1)), x)

    if "combine" in args.parts:
        print("the combine's backward (sorted rows' and weights' gradients), then the router's scatter into [T, E]")
        token_rows = jnp.repeat(jnp.arange(T, dtype=jnp.int32), K).reshape(T, K)

        def scatter(d_weights):  # where the weights' gradient goes next: top_k's gradient into the router's [T, E]
            return jnp.zeros((T, E), jnp.float32).at[token_rows, experts].add(d_weights)

        def now(y, w, dy):
            d_sorted, d_weights, _, _ = moe._combine_copies_bwd((y, w, order, inv), dy)
            return d_sorted, scatter(d_weights)

        def before(y, w, dy):  # the same without the barrier: XLA fuses the weights' gradient into the scatter
            d_sorted = (dy[order // K] * w.reshape(-1)[order][:, None]).astype(y.dtype)
            d_weights = (y[inv].reshape(T, K, -1).astype(jnp.float32) * dy[:, None, :]).sum(axis=-1)
            return d_sorted, scatter(d_weights)

        ref = timed("without the barrier (before)", before, rows, weights, dy)
        timed("moe._combine_copies_bwd (the code's)", now, rows, weights, dy, ref=ref)

    if "norm" in args.parts:
        print(f"the norm of a [3, {E}, {D}, {I}] bf16 gradient made by autodiff from its three layers' slices")
        stack = jnp.zeros((3, E, D, I), jnp.bfloat16)
        parts = [jax.random.normal(k, (E, D, I), jnp.bfloat16) for k in jax.random.split(keys[3], 3)]
        gradient = lambda p: jax.vjp(lambda w: [w[i] for i in range(3)], stack)[1](p)[0]  # noqa: E731
        ref = timed("training.global_norm (the code's)", lambda p: global_norm(gradient(p)), parts)
        timed("optax.global_norm (before)", lambda p: optax.global_norm(gradient(p)), parts, ref=ref)
        timed("float32 squares in one reduction", lambda p: jnp.sqrt(jnp.sum(jnp.square(
            gradient(p).astype(jnp.float32)))), parts, ref=ref)
        timed("floor: the three slices' own norms", lambda p: jnp.sqrt(sum(
            jnp.sum(jnp.square(q.astype(jnp.float32))) for q in p)), parts, ref=ref)

    if "transposed" in args.parts:
        if gm._tokamax_ragged_dots() is None:
            sys.exit("--parts transposed needs tokamax (GPU)")
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

        large = gm._tokamax_ragged_dots()[1]
        M = T * K
        dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
        for name, k, n in (("gate/up", I, D), ("down", D, I)):
            print(f"the {name} input gradient: [{M}, {k}] times [{E}, {n}, {k}] transposed, per group")
            lhs = jax.random.normal(keys[4], (M, k), jnp.bfloat16)
            rhs = jax.random.normal(keys[5], (E, n, k), jnp.bfloat16) * 0.02
            for _ in range(2):  # twice, alternating
                ref = timed("tokamax's op, rhs transposed by XLA first (before)", lambda a, b, g: large(
                    a, b, group_sizes=g, ragged_dot_dimension_numbers=dims, preferred_element_type=a.dtype),
                    lhs, rhs, group_sizes)
                timed("_transposed_rhs_product (the code's)", lambda a, b, g: gm._transposed_rhs_product(
                    a, b, g, large.config), lhs, rhs, group_sizes, ref=ref)
                timed("floor: tokamax's kernel on rhs transposed beforehand", lambda a, b, g: gm._tokamax_product(
                    a, b, g, False), lhs, jnp.swapaxes(rhs, 1, 2), group_sizes, ref=ref)
            for bm, bn, stages, grid_n in ((128, 128, 4, 2), (128, 128, 5, 2), (128, 128, 4, 4), (192, 128, 4, 2)):
                if n % (bn * grid_n):  # as jax's own sweep of that kernel: whole snake tiles only
                    continue
                f = functools.partial(ragged_dot_mgpu.ragged_dot, block_m=bm, block_n=bn, block_k=64,
                                      max_concurrent_steps=stages, grid_block_n=grid_n, transpose_rhs=True)
                timed(f"jax's ragged_dot_mgpu, transpose_rhs, {bm}x{bn}x64, {stages} stages, grid_block_n {grid_n}",
                      lambda a, b, g: f(a, b, group_sizes=g), lhs, rhs, group_sizes, ref=ref)

    if "loss" in args.parts:
        R, V = args.loss_rows, args.vocab
        targets = jax.random.randint(keys[0], (R,), 0, V)
        row_weights = jax.random.uniform(keys[1], (R,))
        for name in ("float32", "bfloat16"):
            print(f"the loss's passes over [{R}, {V}] {name} logits: log-sum-exp, then d logits in bf16")
            logits = (4 * jax.random.normal(keys[2], (R, V), jnp.float32)).astype(name)
            ref = timed("XLA's fusions (training._softmax_passes)", lambda x, t, w: training._softmax_passes(
                x, t, w, jnp.bfloat16), logits, targets, row_weights, per_wait=10)
            tiles = [training.LOSS_KERNEL_TILES[name]] + [
                dict(zip(("block_r", "block_v", "num_warps", "num_stages"), map(int, t.split(","))))
                for t in args.loss_tiles]
            for i, tile in enumerate(tiles):
                label = "training.softmax_rows (the code's)" if i == 0 else "softmax_rows"
                timed(f"{label}, {tile['block_r']} rows x {tile['block_v']} columns, {tile['num_warps']} warps, "
                      f"{tile['num_stages']} stages", functools.partial(
                          training.softmax_rows, grad_dtype=jnp.bfloat16, **tile), logits, targets, row_weights,
                      ref=ref, per_wait=10)


if __name__ == "__main__":
    main()
