"""The decoding MoE layer alone, V2-Lite widths (routed + shared experts), 12 layers' weights so that nothing stays
in L2: µs per layer for the sorted grouped path and for the chosen-experts kernels, the kernels either indexing the
layer out of the stacks (as decoding runs them) or handed each layer's slice inside a layer scan (what XLA copies
first), for several tile shapes. On a GPU:

    python bench/decode_experts.py --tokens 1 4
    python bench/decode_experts.py --tokens 1 2 4 --sweep   # each kernel's tiles alone (the other at its default)
    python bench/decode_experts.py --tokens 1 --prefetch    # the kernels right after a read of the shared experts
    python bench/decode_experts.py --tokens 1 2 --routed [--sweep]   # the MoE layer as steps of 1-2 tokens run it

--routed times `routed_experts_mlp`, the form `generate` runs at one or two tokens a step: the gate/up kernel takes
each token's greedy routing from the router's float32 partial products itself, and the down kernel adds the
experts' weighted sum to the residual. Its reference is XLA's routing, the sorted path and XLA's residual add.

--prefetch asks whether weights already in L2 speed the chosen-experts kernels: before each layer's kernels, XLA
reads that layer's shared-expert weights (a float32 sum the kernels then wait on), and the kernels' time is the
difference between reads-then-kernels and the reads alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TILES = [(128, 64), (128, 32), (64, 32)]  # (block_k, block_n), both kernels
SWEEP = dict(block_k=(128, 256), block_n=(32, 64, 128), num_warps=(2, 4, 8), num_stages=(2, 3, 4))


def main(argv=None):
    """Prints a JSON line per result; returns the timed rows (not --prefetch's) as dicts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v2-lite", help="model widths")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="tokens per step (decoding batch)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10, help="passes over the layers per timed dispatch")
    parser.add_argument("--dispatches", type=int, default=10, help="timed dispatches per row (the fastest counts)")
    parser.add_argument("--limit", type=int, default=None, help="--sweep: at most this many configs per kernel")
    parser.add_argument("--sweep", action="store_true",
                        help="time every tile config in SWEEP for the gate/up kernel, then for the down kernel")
    parser.add_argument("--prefetch", action="store_true",
                        help="time the chosen-experts kernels (default tiles) right after a read of the layer's "
                             "shared-expert weights, against the kernels alone")
    parser.add_argument("--routed", action="store_true",
                        help="time routed_experts_mlp (routing and residual add in the kernels; with --sweep, its "
                             "tiles) against XLA's routing and add around the sorted path")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dsv2_jax import ModelConfig
    from dsv2_jax.grouped_matmul import (DecodeTiles, arrival_counts, chosen_experts_mlp, decode_tiles,
                                         routed_experts_mlp)
    from dsv2_jax.layers import ONE_ROW_ROUTER_ROWS
    from dsv2_jax.moe import RouterOutput, dropless_experts, greedy_routing, route, routes_on_kernel

    c = ModelConfig.from_preset(args.preset)
    if args.routed and not routes_on_kernel(c):  # e.g. group-limited: greedy routing runs the same kernels
        c = c.replace(topk_method="greedy")
    D, I, E, K, S, L = (c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                        c.n_shared_experts, args.layers)
    bf = jnp.bfloat16

    def stack(shape, k):  # one random layer, scaled differently per layer
        base = jax.random.normal(jax.random.key(k), shape, bf) / 32
        return base[None] * jnp.linspace(0.5, 1.5, L).astype(bf).reshape((L,) + (1,) * len(shape))

    weights = (stack((E, D, I), 1), stack((E, D, I), 2), stack((E, I, D), 3),
               stack((D, S * I), 4), stack((D, S * I), 5), stack((S * I, D), 6))

    def combine(y, w):
        coef = jnp.concatenate([w, jnp.ones((w.shape[0], S), w.dtype)], 1)
        return jnp.einsum("tjd,tj->td", y, coef)

    def sorted_layer(x, routing, g, u, d, sg, su, sd):  # the routed experts on the sorted path, plus the shared
        return dropless_experts(x, routing, g, u, d) + (jax.nn.silu(x @ sg) * (x @ su)) @ sd

    def sorted_path(x, experts, w, ws):
        def body(out, xs):
            layer_ws, e, wt = xs
            return out + sorted_layer(x, RouterOutput(wt, e, None), *layer_ws).astype(jnp.float32), None
        return jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (ws, experts, w))[0]

    def both(tiles):  # (block_k, block_n) for both kernels, their other settings as decode_tiles has them
        return {f"{k}_tiles": decode_tiles(k, T)._replace(block_k=tiles[0], block_n=tiles[1])
                for k in ("gate_up", "down")}

    def chosen_stacked(x, experts, w, ws, tiles):
        def body(out, xs):
            layer, e, wt = xs
            y = chosen_experts_mlp(x, e, *ws[:3], ws[3:], layer, **tiles)
            return out + combine(y, wt), None
        return jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (jnp.arange(L), experts, w))[0]

    def chosen_sliced(x, experts, w, ws, tiles):
        def body(out, xs):
            (g, u, d, sg, su, sd), e, wt = xs
            y = chosen_experts_mlp(x, e, g, u, d, (sg, su, sd), **tiles)
            return out + combine(y, wt), None
        return jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (ws, experts, w))[0]

    def shared_read(ws, layer, parts):  # XLA reads these shared-expert weights of the layer: a float32 sum
        return sum(jnp.sum(jax.lax.dynamic_index_in_dim(ws[3 + p], layer, 0, False).astype(jnp.float32))
                   for p in parts)

    def after_read(x, experts, w, ws, parts, kernels=True):  # each layer: the read, then (waiting on it) the kernels
        def body(out, xs):
            layer, e, wt = xs
            s = shared_read(ws, layer, parts)
            if not kernels:
                return out + s * 1e-30, None
            y = chosen_experts_mlp(x + (s * 0).astype(x.dtype), e, *ws[:3], ws[3:], layer)
            return out + combine(y, wt), None
        return jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (jnp.arange(L), experts, w))[0]

    def routed_stacked(x, partials, residual, ws, tiles):  # each layer: routing, experts and residual add in 2 kernels
        def body(carry, xs):
            residual, counts = carry
            layer, p = xs
            residual, counts, *_ = routed_experts_mlp(x, p, residual, counts, *ws[:3], ws[3:], layer,
                                                      routing=greedy_routing(c), **tiles)
            return (residual, counts), None
        carry = (residual, arrival_counts(*x.shape))
        return jax.lax.scan(body, carry, (jnp.arange(L), partials))[0][0].astype(jnp.float32)

    def routed_reference(x, partials, residual, ws):  # XLA's routing, the sorted path, XLA's residual add
        def body(residual, xs):
            layer_ws, p = xs
            return residual + sorted_layer(x, route(c, p.sum(axis=0)[:x.shape[0]]), *layer_ws).astype(
                residual.dtype), None
        return jax.lax.scan(body, residual, (ws, partials))[0].astype(jnp.float32)

    def repeated(f):  # the layers `args.repeats` times in one dispatch, so that host overhead is amortised
        def run(*a):
            return jax.lax.fori_loop(0, args.repeats, lambda r, out: out + f(*a), jnp.zeros((T, D), jnp.float32))
        return jax.jit(run)

    def per_layer_us(f, *a, n=args.dispatches):  # the fastest of n (slower ones: clock ramps, host delays)
        f(*a).block_until_ready()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f(*a).block_until_ready()
            times.append(time.perf_counter() - t)
        return min(times) / (L * args.repeats) * 1e6

    def sweep_rows(name, f):  # every SWEEP config of each kernel's tiles, the other kernel at its default
        return [(f"{name}, {kernel} tiles", tiles, jax.jit(lambda *a, t={f"{kernel}_tiles": tiles}: f(*a, t)))
                for kernel in ("gate_up", "down")
                for tiles in [DecodeTiles(**dict(zip(SWEEP, v)))
                              for v in itertools.product(*SWEEP.values())][:args.limit]]

    results = []

    def timed(T, rows, inputs, want):  # each row (name, tiles, jitted f of inputs): µs per layer, error against want
        for name, tiles, f in rows:
            try:
                got = f(*inputs)
            except Exception as e:  # a tile config the kernel cannot take (shared memory, registers)
                results.append(dict(tokens=T, path=name, tiles=tiles, error=str(e).splitlines()[0][:200]))
            else:
                err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
                results.append(dict(tokens=T, path=name, tiles=tiles, us_per_layer=round(per_layer_us(
                    repeated(f), *inputs), 2), rel_err_vs_sorted=round(err, 5)))
            print(json.dumps(results[-1]), flush=True)

    for T in args.tokens:
        rng = np.random.default_rng(T)
        x = jnp.asarray(rng.normal(size=(T, D)), bf)
        experts = jnp.asarray([[rng.choice(E, K, replace=False) for _ in range(T)] for _ in range(L)], jnp.int32)
        w = jnp.asarray(rng.uniform(size=(L, T, K)) / K, jnp.float32)
        if args.routed:
            partials = jnp.asarray(rng.normal(size=(L, D // ONE_ROW_ROUTER_ROWS, T, E)) * 0.5, jnp.float32)
            inputs = (x, partials, jnp.zeros((T, D), bf), weights)  # the residual: the layers' sum, nothing else
            reference = jax.jit(routed_reference)
            want = reference(*inputs)
            rows = [("routed, XLA", None, reference)]
            if args.sweep:
                rows = sweep_rows("routed", routed_stacked)
            else:
                rows.append(("routed, kernels (default tiles)", None, jax.jit(lambda *a: routed_stacked(*a, {}))))
            timed(T, rows, inputs, want)
            continue
        if args.prefetch:
            kernels_alone = repeated(jax.jit(lambda *a: chosen_stacked(*a, {})))
            alone = [per_layer_us(kernels_alone, x, experts, w, weights)]
            for name, parts in (("shared gate/up", (0, 1)), ("shared gate/up/down", (0, 1, 2))):
                reads = per_layer_us(repeated(jax.jit(lambda *a, p=parts: after_read(*a, p, kernels=False))),
                                     x, experts, w, weights)
                both_us = per_layer_us(repeated(jax.jit(lambda *a, p=parts: after_read(*a, p))), x, experts, w, weights)
                alone.append(per_layer_us(kernels_alone, x, experts, w, weights))
                print(json.dumps(dict(tokens=T, read=name, read_us=round(reads, 2), read_then_kernels_us=round(
                    both_us, 2), kernels_after_read_us=round(both_us - reads, 2), kernels_alone_us=[
                    round(a, 2) for a in alone])), flush=True)
            continue
        reference = jax.jit(sorted_path)
        want = reference(x, experts, w, weights)
        rows = []
        if args.sweep:
            rows = sweep_rows("chosen", chosen_stacked)
        else:
            rows.append(("sorted", None, reference))
            for tiles in TILES:
                rows.append(("chosen, stacks", tiles, jax.jit(lambda *a, t=both(tiles): chosen_stacked(*a, t))))
            rows.append(("chosen, scan slices", TILES[0], jax.jit(lambda *a: chosen_sliced(*a, both(TILES[0])))))
        timed(T, rows, (x, experts, w, weights), want)
    return results


if __name__ == "__main__":
    main()
