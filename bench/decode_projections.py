"""The decoding step's projection products alone: `stacked_matvec` (the `stacked_partials` kernel reading one layer
of a [layers, K, N] stack, then the sum of its float32 partials) at the model's widths, every layer's weights so
that nothing stays in L2, for its tile configs. Each config is checked against a float32 product and timed: µs per
layer (the fastest of --dispatches dispatches, each running the layers --repeats times over) and the weight bytes
read per second. On a GPU:

    python bench/decode_projections.py --tokens 1 4            # the tiles the decoding step runs
    python bench/decode_projections.py --tokens 1 --sweep      # every config of SWEEP, per product
    python bench/decode_projections.py --tokens 64 --sweep     # every config of MANY_TOKEN_SWEEP, per product

Products, as a decoding step runs them: "input" (q_proj, or q_a_proj on the low-rank query path, with kv_a_proj:
one kernel over both), "q_b" (q_b_proj, low-rank path only), "o_proj", and the MoE layers' shared experts where the
step runs them on the stacks (more than one token a step): "shared_gate_up" (gate_proj with up_proj, one kernel) and
"shared_down".
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import emit  # noqa: E402

SWEEP = dict(block_k=(128, 256), block_n=(32, 64, 128), num_warps=(2, 4), num_stages=(2, 3, 4),
             programs=(512, 1024, 2048))
# more than one token: each program multiplies all rows (16-64) by its weight tiles, so wider tiles and more warps
MANY_TOKEN_SWEEP = dict(block_k=(64, 128), block_n=(64, 128), num_warps=(4, 8), num_stages=(2, 4),
                        programs=(128, 256, 512))


def products(config) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (contraction K, output widths N of the weights sharing it), as MLA's decoding step has them."""
    c = config
    width = c.num_attention_heads * c.qk_head_dim
    latent = c.kv_lora_rank + c.qk_rope_head_dim
    out = {"input": (c.hidden_size, (width if c.q_lora_rank is None else c.q_lora_rank, latent))}
    if c.q_lora_rank is not None:
        out["q_b"] = (c.q_lora_rank, (width,))
    out["o_proj"] = (c.num_attention_heads * c.v_head_dim, (c.hidden_size,))
    if c.n_shared_experts:
        shared = c.n_shared_experts * c.moe_intermediate_size
        out["shared_gate_up"] = (c.hidden_size, (shared, shared))
        out["shared_down"] = (shared, (c.hidden_size,))
    return out


def configs(sweep: bool, product: str, tokens: int) -> list[dict]:
    """The tile configs to run: the decoding step's own first (`matvec_tiles(tokens)`, then PROJECTION_TILES' for
    this product and tokens), then with sweep SWEEP's (one token) or MANY_TOKEN_SWEEP's."""
    from dsv2_jax.grouped_matmul import PROJECTION_TILES, matvec_tiles
    default = {**matvec_tiles(tokens), **PROJECTION_TILES.get((product, tokens), {})}
    grid = SWEEP if tokens == 1 else MANY_TOKEN_SWEEP
    rest = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if sweep else []
    return [default] + [c for c in rest if c != default]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v2-lite", help="model widths")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="tokens per step (decoding batch)")
    parser.add_argument("--layers", type=int, default=None, help="layers of weights (default: the model's)")
    parser.add_argument("--products", nargs="+", default=None,
                        help="a subset of: input q_b o_proj shared_gate_up shared_down")
    parser.add_argument("--repeats", type=int, default=10, help="passes over the layers per timed dispatch")
    parser.add_argument("--dispatches", type=int, default=10)
    parser.add_argument("--sweep", action="store_true",
                        help="every config in SWEEP (one token) or MANY_TOKEN_SWEEP after the default")
    parser.add_argument("--limit", type=int, default=None, help="at most this many configs per product")
    parser.add_argument("--out", default=None, help="append a JSON line per result here")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dsv2_jax import ModelConfig
    from dsv2_jax.grouped_matmul import stacked_matvec

    config = ModelConfig.from_preset(args.preset)
    L = args.layers or config.num_hidden_layers
    wanted = products(config)
    names = args.products or list(wanted)
    unknown = [n for n in names if n not in wanted]
    if unknown:
        parser.error(f"--products: {unknown} not among this model's products {list(wanted)}")
    bf = jnp.bfloat16
    rows = []
    for name in names:
        K, widths = wanted[name]
        keys = jax.random.split(jax.random.key(len(rows)), len(widths))
        ws = tuple((jax.random.normal(key, (L, K, n), jnp.float32) / np.sqrt(K)).astype(bf)
                   for key, n in zip(keys, widths))
        weight_bytes = sum(w[0].nbytes for w in ws)  # one layer's
        for T in args.tokens:
            x = jax.random.normal(jax.random.key(T), (T, K), bf)
            layer = min(1, L - 1)
            want = [jnp.einsum("tk,kn->tn", x.astype(jnp.float32), w[layer].astype(jnp.float32),
                               precision="highest") for w in ws]
            for tiles in configs(args.sweep, name, T)[:args.limit]:
                row = dict(product=name, tokens=T, K=K, N=list(widths), layers=L, **tiles)
                try:
                    one = jax.jit(lambda x, ws, layer, t=tiles: stacked_matvec(x, ws, layer, **t))
                    got = one(x, ws, jnp.int32(layer))
                    row["rel_err"] = max(float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
                                         for g, w in zip(got, want))

                    @jax.jit
                    def passes(x, ws, t=tiles):  # every layer, args.repeats times, in one dispatch
                        def body(i, acc):
                            ys = stacked_matvec(x, ws, i % L, **t)
                            return acc + sum(y.sum(axis=1, keepdims=True) for y in ys)  # all of it: read whole
                        return jax.lax.fori_loop(0, L * args.repeats, body, jnp.zeros((T, 1), jnp.float32))

                    passes(x, ws).block_until_ready()
                    times = []
                    for _ in range(args.dispatches):
                        t0 = time.perf_counter()
                        passes(x, ws).block_until_ready()
                        times.append(time.perf_counter() - t0)
                    row["us_per_layer"] = min(times) / (L * args.repeats) * 1e6
                    row["weight_gb_per_s"] = weight_bytes / row["us_per_layer"] / 1e3
                except Exception as e:  # a config the kernel cannot take (shared memory, registers)
                    row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                emit(row, args.out)
    timed = [r for r in rows if "us_per_layer" in r]
    for name, T in itertools.product(names, args.tokens):
        ranked = sorted((r for r in timed if r["product"] == name and r["tokens"] == T),
                        key=lambda r: r["us_per_layer"])
        if ranked:
            default = next(r for r in rows if r["product"] == name and r["tokens"] == T)
            print(f"{name}, {T} token(s): default {default.get('us_per_layer', float('nan')):.2f} µs; fastest "
                  + "; ".join(f"{r['us_per_layer']:.2f} µs ({r['weight_gb_per_s']:.0f} GB/s) block_k {r['block_k']} "
                              f"block_n {r['block_n']} warps {r['num_warps']} stages {r['num_stages']} "
                              f"programs {r['programs']}" for r in ranked[:3]))
    return rows


if __name__ == "__main__":
    main()
