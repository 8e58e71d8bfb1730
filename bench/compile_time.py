"""Compile time of the training step with the layers scanned and unrolled (recipe `scan_layers`).

Abstract shapes only: nothing is allocated, so the full-width models compile on any machine, e.g.
    python bench/compile_time.py --preset deepseek-v2-lite --layers 27
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv2_jax import ModelConfig
from dsv2_jax.model import REMAT_POLICIES, abstract_model
from dsv2_jax.training import StepSettings, train_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--layers", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--remat", default="save_dots", choices=REMAT_POLICIES)
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)  # real compilations, whatever JAX_COMPILATION_CACHE_DIR

    config = ModelConfig.from_preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    graphdef, state = nnx.split(abstract_model(config, jnp.bfloat16, jnp.bfloat16))
    params = state.to_pure_dict()
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, params)
    batch = {k: jax.ShapeDtypeStruct((1, 1, args.seq), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    for scan in (True, False):
        settings = StepSettings(args.remat, None, (0.001, 0.0, 0.0), 1, 1, scan_layers=scan)
        step = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, settings=settings))
        t0 = time.perf_counter()
        lowered = step.lower(params, opt_state, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        print(json.dumps({"preset": args.preset, "layers": config.num_hidden_layers, "scan_layers": scan,
                          "backend": jax.default_backend(), "lower_s": round(t1 - t0, 2),
                          "compile_s": round(t2 - t1, 2)}), flush=True)


if __name__ == "__main__":
    main()
