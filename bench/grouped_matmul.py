"""Grouped-matmul kernels on the GPU: times tokamax's Hopper ragged-dot kernels over a list of tile configs and
dsv2_jax's Pallas kernels (dsv2_jax.grouped_matmul) for the expert matmuls of a training step (forward, and both
backward products), and for the weight gradient jax's Mosaic GPU kernel as grouped_matmul calls it ("mosaic"); checks
each against a float32 product, next to a dense matmul of the same FLOPs, and prints the best of each.

    python bench/grouped_matmul.py [--tokens 8192] [--preset deepseek-v2-lite] [--quick] [--pallas-sweep]

Shapes: T tokens × top-k rows routed to E experts (multinomial, uniform), hidden D, expert width I.
  fwd      [T·k, D] × [E, D, I] -> [T·k, I]     (gate, up)      and [T·k, I] × [E, I, D] (down)
  dlhs     [T·k, I] × [E, D, I]ᵀ -> [T·k, D]    (the input gradient: rhs contracted on its last axis)
  drhs     [T·k, D]ᵀ × [T·k, I] -> [E, D, I]    (the weight gradient: contraction over the ragged rows)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_ms(f, *args, reps: int = 20) -> float:
    import jax
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def reference(lhs, rhs, kind: str, sizes: np.ndarray):
    """The product in float32 (highest precision), each group's rows zero-padded to the largest group and multiplied
    as one batched einsum: no grouped kernel involved. kind: fwd ([M, K] × [G, K, N]), dlhs ([M, N] × [G, K, N]ᵀ)
    or drhs ([M, K]ᵀ × [M, N] per group -> [G, K, N])."""
    import jax
    import jax.numpy as jnp
    M = lhs.shape[0]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = starts[:, None] + np.arange(max(int(sizes.max()), 1))[None]  # [G, P]
    valid = rows < (starts + sizes)[:, None]

    def padded(a):
        return jnp.where(valid[..., None], a.astype(jnp.float32)[np.minimum(rows, M - 1)], 0.0)

    @jax.jit
    def run(lhs, rhs):
        if kind == "drhs":
            return jnp.einsum("gpk,gpn->gkn", padded(lhs), padded(rhs), precision="highest")
        spec = "gpk,gkn->gpn" if kind == "fwd" else "gpn,gkn->gpk"
        out = jnp.einsum(spec, padded(lhs), rhs.astype(jnp.float32), precision="highest")
        return out[valid]  # back to [M, ·] in row order

    return run(lhs, rhs)


def pallas_product(kind: str, tiles: dict | None = None):
    """dsv2_jax's Pallas kernel for one product, with `tiles` (default: those grouped_matmul uses at training sizes)."""
    import jax

    from dsv2_jax import grouped_matmul as gm
    if kind == "drhs":
        tiles = tiles or gm.WEIGHT_GRADIENT_TILES
        return jax.jit(lambda a, b, g: gm.weight_gradient(a, b, g, **tiles))
    tiles = tiles or gm.FORWARD_TILES
    return jax.jit(lambda a, b, g: gm.ragged_matmul(a, b, g, transpose_rhs=kind == "dlhs", **tiles))


# --pallas-sweep: tiles of the Pallas kernels tried beside grouped_matmul's own (a width that does not divide the
# product's is skipped). Row-ragged products: (block_m, block_n, block_k, num_warps, num_stages); weight gradient:
# (block_k, block_n, block_rows, num_warps, num_stages).
RAGGED_SWEEP = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 128, 128, 8, 3),
                (256, 128, 64, 8, 3), (256, 128, 32, 8, 4), (128, 256, 64, 8, 3), (128, 256, 32, 8, 4),
                (64, 256, 64, 4, 4), (64, 128, 64, 4, 4)]
WEIGHT_GRADIENT_SWEEP = [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 16, 4, 5),
                         (256, 128, 32, 8, 3), (256, 128, 64, 8, 3), (128, 256, 32, 8, 3), (128, 256, 64, 8, 3),
                         (64, 128, 32, 4, 4), (64, 256, 32, 4, 4)]


def pallas_sweep(kind: str) -> list[dict]:
    if kind == "drhs":
        return [dict(block_k=k, block_n=n, block_rows=r, num_warps=w, num_stages=s)
                for k, n, r, w, s in WEIGHT_GRADIENT_SWEEP]
    return [dict(block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=s) for m, n, k, w, s in RAGGED_SWEEP]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--quick", action="store_true", help="only the heuristic and the config dsv2_jax uses")
    parser.add_argument("--pallas-sweep", action="store_true", help="also the Pallas kernels' tiles in *_SWEEP")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from tokamax._src.ops.ragged_dot import base
    from tokamax._src.ops.ragged_dot.pallas_mosaic_gpu import PallasMosaicGpuRaggedDot
    from tokamax._src.ops.ragged_dot.pallas_mosaic_gpu_common import Config, MatmulDimension

    from dsv2_jax import ModelConfig
    c = ModelConfig.from_preset(args.preset)
    E, K, D, I = c.n_routed_experts, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size
    M = args.tokens * K
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(rng.multinomial(M, np.full(E, 1 / E)), jnp.int32)
    key = iter(jax.random.split(jax.random.key(0), 8))
    rand = lambda *s: jax.random.normal(next(key), s, jnp.bfloat16)  # noqa: E731
    x, h = rand(M, D), rand(M, I)
    w_in, w_out = rand(E, D, I), rand(E, I, D)

    cases = {  # name: (lhs, rhs, dimension numbers, flops)
        "fwd gate/up": (x, w_in, base.DEFAULT_RAGGED_DOT_DIM_NUMS, 2 * M * D * I),
        "fwd down": (h, w_out, base.DEFAULT_RAGGED_DOT_DIM_NUMS, 2 * M * D * I),
        "dlhs gate/up": (h, w_in, base.TRANS_RHS_RAGGED_DOT_DIM_NUMS, 2 * M * D * I),
        "dlhs down": (x, w_out, base.TRANS_RHS_RAGGED_DOT_DIM_NUMS, 2 * M * D * I),
        "drhs gate/up": (x, h, base.RAGGED_CONTRACTING_DOT_DIM_NUMS, 2 * M * D * I),
        "drhs down": (h, x, base.RAGGED_CONTRACTING_DOT_DIM_NUMS, 2 * M * D * I),
    }
    dense = jax.jit(lambda a, b: a @ b)
    dense_ms = median_ms(dense, x, w_in[0])
    print(f"dense bf16 [{M},{D}]x[{D},{I}]: {dense_ms:.3f} ms = {2 * M * D * I / dense_ms / 1e9:.0f} TFLOP/s",
          flush=True)

    configs = [None]  # tokamax's own heuristic
    grids = [(True, MatmulDimension.M, 1), (True, MatmulDimension.N, 8), (False, MatmulDimension.M, 1),
             (False, MatmulDimension.N, 1)]
    for bm, bn, bk, stages, (persistent, minor, width) in itertools.product(
            [64, 128], [64, 128, 256], [64, 128], [2, 3, 4], grids):
        if stages * (bm + bn) * bk * 2 > 200 * 1024 or (stages == 2 and bk == 64):  # shared memory; few stages
            continue
        configs.append(Config(block_m=bm, block_n=bn, block_k=bk, num_stages=stages, split_k=1,
                              persistent=persistent, grid_minor_dim=minor, grid_tile_width=width))
    if args.quick:  # the heuristic and dsv2_jax's two configs (grouped_matmul._tokamax_ragged_dots)
        configs = [None] + [Config(block_m=bm, block_n=bn, block_k=bk, num_stages=st, split_k=1, persistent=p,
                                   grid_minor_dim=MatmulDimension.M, grid_tile_width=1)
                            for bm, bn, bk, st, p in ((128, 128, 64, 4, True), (64, 128, 128, 3, False))]
    configs.append("pallas")  # dsv2_jax's Pallas kernels with the tiles grouped_matmul uses
    configs.append("mosaic")  # the weight gradient on jax's Mosaic GPU kernel (tokamax's backend: from 2,048 rows)
    print(f"{len(configs)} configs", flush=True)
    best = {}
    for name, (lhs, rhs, dims, flops) in cases.items():
        kind = name.split()[0]
        want = reference(lhs, rhs, kind, np.asarray(sizes))
        results, heuristic = [], "failed"
        sweep = [("pallas", tiles) for tiles in pallas_sweep(kind)] if args.pallas_sweep else []
        for cfg in configs + sweep:
            if cfg == "mosaic":
                if kind != "drhs":
                    continue
                from dsv2_jax import grouped_matmul as gm
                f = jax.jit(gm._mosaic_weight_gradient)
            elif cfg == "pallas":
                f = pallas_product(kind)
            elif isinstance(cfg, tuple):
                f = pallas_product(kind, cfg[1])
            else:
                op = PallasMosaicGpuRaggedDot(config=cfg)
                f = jax.jit(lambda a, b, g, op=op, dims=dims: op(a, b, group_sizes=g,
                                                                   ragged_dot_dimension_numbers=dims,
                                                                   preferred_element_type=jnp.bfloat16))
            try:
                got = f(lhs, rhs, sizes).astype(jnp.float32)
                ms = median_ms(f, lhs, rhs, sizes, reps=10)
            except Exception as e:  # a config the kernel rejects for this shape
                print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                continue
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            if cfg is None:
                heuristic = f"{ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s){'' if err < 1e-2 else ', WRONG'}"
            if not err < 1e-2:  # bf16 output: ~2e-3
                print(f"  {name} WRONG (relative error {err:.3g}): {cfg}", flush=True)
                continue
            results.append((ms, cfg))
        results.sort(key=lambda r: r[0])
        print(f"\n{name}: heuristic {heuristic}", flush=True)
        if not results:
            continue
        best[name] = results[0]
        for ms, cfg in results if args.pallas_sweep else results[:5]:
            print(f"  {ms:.3f} ms {flops / ms / 1e9:4.0f} TFLOP/s  {cfg}", flush=True)
    print("\nbest per case:")
    for name, (ms, cfg) in best.items():
        print(f"{name:14s} {ms:.3f} ms  {cfg}")


if __name__ == "__main__":
    main()
