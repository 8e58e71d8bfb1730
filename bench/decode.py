"""Decoding benchmark: the full DeepSeek-V2-Lite (27 layers, random bf16 weights, ~31 GB), prompt 512, 128 new tokens.

For each batch size: prefill tokens/s, decode tokens/s, and the achieved HBM bandwidth = bytes that must be read per
decode step (the weights the step's tokens activate, or all of them when every expert is hit, plus the cache) ÷ step
time, against a device-to-device copy measured in the same run. Run each implementation in its own process (JAX
preallocates GPU memory):

    python bench/decode.py --impl jax   --batches 1 16 64
    python bench/decode.py --impl torch --batches 1 16 64
    python bench/decode.py --impl jax   --batches 1 16 64 --mesh expert=8   # experts split over 8 GPUs
    python bench/decode.py --impl jax   --batches 1 4 8 --decode-kernels sorted:xla chosen:xla chosen:auto
                                                    # decoding paths: DSV2_DECODE_EXPERTS:DSV2_DECODE_PROJECTIONS
    python bench/decode.py --impl jax   --batches 1 --profile /tmp/decode_prof   # + the decode loop's kernels
    python bench/decode.py --impl jax   --batches 1 --compiles 6   # compile and time each batch 6 times, one row each
    python bench/decode.py --impl jax   --batches 1 --compiles 2 --layers-per-iteration 1 2 13
                                                    # the decoding loop's layers per iteration, side by side
    python bench/decode.py --impl jax   --batches 1 16 --compiles 2 --moe-two-kernel-tokens 2 0
                                                    # a MoE layer's routing, experts and residual add in 2 kernels or 4
    python bench/decode.py --impl jax   --batches 16 64 --latent-row-tiles on off
                                                    # the latent kernels: 16 rows a program, or one row
    python bench/decode.py --impl jax   --batches 32 64 --matvec-64-row-tiles on off
                                                    # stacked_matvec's tiles of 33-64 tokens, or of 2-32

The batch-1 step on an H200 differs by up to ~6% between compilations of the same program, in one process as
between processes (bench/RESULTS.md §9): compare changes over several compilations (`--compiles`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import emit, gpu_clocks  # noqa: E402


def weight_bytes_read(config, batch: int, itemsize: int = 2) -> float:
    """Bytes of weights one decode step reads: everything but the embedding table, with routed experts counted
    only as far as `batch` tokens × top-k choices can hit them (all of them once batch × k ≥ experts, the expectation
    for uniform routing otherwise)."""
    from dsv2_jax import count_params
    total, _ = count_params(config)
    E, K = config.num_experts, config.num_experts_per_tok
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    routed = config.num_moe_layers * E * expert
    hit = E * (1 - (1 - K / E) ** batch)  # expected distinct experts per layer
    dense_part = total - config.vocab_size * config.hidden_size - routed
    return itemsize * (dense_part + config.num_moe_layers * hit * expert)


COPY_LOOP = 20  # copies per timed call of copy_bandwidth_jax, one jitted loop (no host round trip between them)


def copy_bandwidth_jax(elements: int = 1 << 30, repeats: int = 10) -> dict:
    """Device-to-device copy bandwidth (read + write, bytes/s) of `a + 1` over `elements` float32 (4 GiB), timed as
    `repeats` calls of a jitted loop of COPY_LOOP copies each: the median call and the slowest and fastest.

    Copies timed one call each from the host spread 3,000-3,950 GB/s within one process on an H200, and their median
    of five moved 14% between processes; a call of 20 copies in one loop came out within 2% (bench/RESULTS.md §24).
    """
    import jax
    import jax.numpy as jnp
    x = jnp.ones((elements,), jnp.float32)
    f = jax.jit(lambda a: jax.lax.fori_loop(0, COPY_LOOP, lambda _, b: b + 1, a))
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    rates = 2 * x.nbytes * COPY_LOOP / np.array(times)
    return {"copy_gb_s": float(np.median(rates)) / 1e9, "copy_gb_s_min": float(rates.min()) / 1e9,
            "copy_gb_s_max": float(rates.max()) / 1e9}


PROFILE_TOKENS = 32  # --profile: the tokens of the traced generate call


def run_jax(config, batches, prompt_len, new_tokens, mesh_text=None, decode_kernels=("auto:auto",),
            profile_dir=None, compiles: int = 1, layers_per_iteration=(None,), moe_two_kernel_tokens=(None,),
            latent_row_tiles=(None,), matvec_64_row_tiles=(None,)):
    import jax
    import jax.numpy as jnp

    import dsv2_jax
    from dsv2_jax import attention, grouped_matmul
    gen = importlib.import_module("dsv2_jax.generate")  # the module (dsv2_jax.generate is the function)
    from dsv2_jax.sharding import init_model, make_mesh, parse_mesh

    mesh = None
    if mesh_text:
        mesh = make_mesh(**parse_mesh(mesh_text))
    model = init_model(config, mesh=mesh, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, seed=0)
    from jax.experimental.compilation_cache.compilation_cache import reset_cache

    cache = jax.config.jax_enable_compilation_cache
    # Each of several compilations a real one, not a hit in a persistent cache (JAX_COMPILATION_CACHE_DIR). jax
    # reads the setting once, at its first compilation: reset_cache() has it read again.
    jax.config.update("jax_enable_compilation_cache", cache and compiles == 1)
    reset_cache()
    default_per, default_two = gen.DECODE_LAYERS_PER_ITERATION, gen.DECODE_MOE_TWO_KERNEL_TOKENS
    default_tiles = attention.MANY_ROW_TILES, attention.LATENT_SPAN_PROGRAMS
    default_64 = grouped_matmul.MATVEC_64_ROW_TILES
    try:  # the settings side by side, on one model
        for setting, per, two, tiles, tiles_64 in itertools.product(decode_kernels, layers_per_iteration,
                                                                    moe_two_kernel_tokens, latent_row_tiles,
                                                                    matvec_64_row_tiles):
            gen.DECODE_LAYERS_PER_ITERATION = default_per if per is None else per
            gen.DECODE_MOE_TWO_KERNEL_TOKENS = default_two if two is None else two
            # off: a program per row in absorbed_query and latent_output, and 16 spans of the cache (the most)
            off = ({}, 1 << 30)
            attention.MANY_ROW_TILES, attention.LATENT_SPAN_PROGRAMS = off if tiles == "off" else default_tiles
            tiles = "off" if tiles == "off" else "on"
            # off: steps of 33-64 tokens take the tiles of 2-32
            grouped_matmul.MATVEC_64_ROW_TILES = {} if tiles_64 == "off" else default_64
            tiles_64 = "off" if tiles_64 == "off" else "on"
            experts, projections = setting.split(":")
            os.environ["DSV2_DECODE_EXPERTS"], os.environ["DSV2_DECODE_PROJECTIONS"] = experts, projections
            grouped_matmul.reread_decode_choices()
            rng = np.random.default_rng(0)
            for b in batches:
                prompts = [list(rng.integers(0, config.vocab_size, prompt_len)) for _ in range(b)]
                for compile_index in range(compiles):
                    if compile_index:
                        jax.clear_caches()  # compile prefill and the decode loop again
                    t0 = time.perf_counter()
                    dsv2_jax.generate(model, prompts, new_tokens, mesh=mesh)  # compile
                    first_call_s = time.perf_counter() - t0
                    runs = []
                    with gpu_clocks() as gpu:
                        for _ in range(3):  # the first timed call after compiling still pays one-off costs: best of 3
                            t = {}
                            dsv2_jax.generate(model, prompts, new_tokens, mesh=mesh, timings=t)
                            runs.append(t)
                    setting = dict(decode_experts=experts, decode_projections=projections,
                                   layers_per_iteration=gen.DECODE_LAYERS_PER_ITERATION,
                                   moe_two_kernel_tokens=gen.DECODE_MOE_TWO_KERNEL_TOKENS, latent_row_tiles=tiles,
                                   matvec_64_row_tiles=tiles_64,
                                   compile=compile_index,
                                   first_call_s=first_call_s, **gpu)
                    yield (setting, b, min(t["prefill_s"] for t in runs), min(t["decode_s"] for t in runs),
                           runs[0]["steps"])
                if profile_dir:  # the decode loop's kernels per step, by name
                    from bench.trace_summary import summarize
                    trace_dir = os.path.join(profile_dir,
                                             f"{experts}_{projections}_l{gen.DECODE_LAYERS_PER_ITERATION}"
                                             f"_m{gen.DECODE_MOE_TWO_KERNEL_TOKENS}_t{tiles}_r{tiles_64}_b{b}")
                    dsv2_jax.generate(model, prompts, PROFILE_TOKENS, mesh=mesh)  # compile this length's buckets
                    with jax.profiler.trace(trace_dir):
                        dsv2_jax.generate(model, prompts, PROFILE_TOKENS, mesh=mesh)
                    print(f"\n{experts}:{projections}, {gen.DECODE_LAYERS_PER_ITERATION} layers an iteration, "
                          f"MoE in two kernels up to {gen.DECODE_MOE_TWO_KERNEL_TOKENS} tokens, latent row tiles "
                          f"{tiles}, 64-row tiles {tiles_64}, batch {b}, "
                          "decode loop:")
                    summarize(trace_dir, top=40, steps=PROFILE_TOKENS, module="decode_loop")
    finally:
        gen.DECODE_LAYERS_PER_ITERATION, gen.DECODE_MOE_TWO_KERNEL_TOKENS = default_per, default_two
        attention.MANY_ROW_TILES, attention.LATENT_SPAN_PROGRAMS = default_tiles
        grouped_matmul.MATVEC_64_ROW_TILES = default_64
        jax.config.update("jax_enable_compilation_cache", cache)
        reset_cache()
    del model, jax


def run_torch(config, batches, prompt_len, new_tokens):
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hf = config.to_hf_dict(rope_style="rope_parameters")
    hf.pop("model_type", None)
    cfg = DeepseekV2Config(**hf)
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = DeepseekV2ForCausalLM(cfg).to(torch.bfloat16).eval()
    for b in batches:
        ids = torch.randint(0, config.vocab_size, (b, prompt_len), device="cuda")
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        with gpu_clocks() as gpu:
            t0 = time.perf_counter()
            with torch.no_grad():
                model(ids)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        yield gpu, b, t1 - t0, (t2 - t1) - (t1 - t0), new_tokens


def _decode_setting(text: str) -> str:
    from dsv2_jax.grouped_matmul import DECODE_BACKENDS, MATVEC_BACKENDS
    experts, _, projections = text.partition(":")
    if experts not in DECODE_BACKENDS or projections not in MATVEC_BACKENDS:
        raise argparse.ArgumentTypeError(f"{text!r}: want EXPERTS:PROJECTIONS, EXPERTS one of {DECODE_BACKENDS}, "
                                         f"PROJECTIONS one of {MATVEC_BACKENDS}")
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["jax", "torch"], required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--mesh", default=None, help="jax only: e.g. expert=8 (all devices)")
    parser.add_argument("--decode-kernels", nargs="+", default=["auto:auto"], type=_decode_setting,
                        help="jax only: DSV2_DECODE_EXPERTS:DSV2_DECODE_PROJECTIONS settings (e.g. sorted:xla "
                             "chosen:auto) to run one after another on the same model")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help=f"jax only: after each timing, trace a {PROFILE_TOKENS}-token generate here and print "
                             "the decode loop's kernels per step by name")
    parser.add_argument("--compiles", type=int, default=1,
                        help="jax only: compile and time each batch this many times in this process (a row each)")
    parser.add_argument("--layers-per-iteration", type=int, nargs="+", default=[None], metavar="N",
                        help="jax only: the decoding loop's layers per iteration (generate.DECODE_LAYERS_PER_ITERATION)"
                             " to run one after another on the same model (default: the module's)")
    parser.add_argument("--moe-two-kernel-tokens", type=int, nargs="+", default=[None], metavar="N",
                        help="jax only: decoding steps of at most N tokens run a MoE layer's routing, experts and "
                             "residual add in two kernels, not four (generate.DECODE_MOE_TWO_KERNEL_TOKENS; 0: none), "
                             "one setting after another on the same model (default: the module's)")
    parser.add_argument("--latent-row-tiles", nargs="+", default=[None], choices=["on", "off"],
                        help="jax only: steps of several rows with absorbed_query and latent_output taking 16 rows a "
                             "program and latent_attention's spans sized by its programs (on, the default: "
                             "attention.MANY_ROW_TILES) or a program per row and 16 spans (off), one after another")
    parser.add_argument("--matvec-64-row-tiles", nargs="+", default=[None], choices=["on", "off"],
                        help="jax only: steps of 33-64 tokens with stacked_matvec's tiles for 64 rows (on, the "
                             "default: grouped_matmul.MATVEC_64_ROW_TILES) or those of 2-32 tokens (off), one after "
                             "another")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.compiles < 1:
        parser.error(f"--compiles {args.compiles}: at least 1")
    if any(n is not None and n < 1 for n in args.layers_per_iteration):
        parser.error(f"--layers-per-iteration {args.layers_per_iteration}: each at least 1")
    if any(n is not None and n < 0 for n in args.moe_two_kernel_tokens):
        parser.error(f"--moe-two-kernel-tokens {args.moe_two_kernel_tokens}: each at least 0")

    from dsv2_jax import ModelConfig
    config = ModelConfig.from_preset("deepseek-v2-lite")
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    copy = copy_bandwidth_jax() if args.impl == "jax" else {}
    kernels = {}
    if args.impl == "jax":  # which kernels ran (a tokamax that fails to import falls back, with a warning)
        from dsv2_jax.layers import kernel_backends
        kernels = kernel_backends()
    runner = run_torch
    if args.impl == "jax":
        runner = functools.partial(run_jax, mesh_text=args.mesh, decode_kernels=args.decode_kernels,
                                   profile_dir=args.profile, compiles=args.compiles,
                                   layers_per_iteration=args.layers_per_iteration,
                                   moe_two_kernel_tokens=args.moe_two_kernel_tokens,
                                   latent_row_tiles=args.latent_row_tiles,
                                   matvec_64_row_tiles=args.matvec_64_row_tiles)
    cache_per_token = 2 * config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    for setting, b, prefill_s, decode_s, steps in runner(config, args.batches, args.prompt, args.new_tokens):
        step_s = decode_s / max(steps, 1)
        bytes_step = weight_bytes_read(config, b) + b * (args.prompt + steps / 2) * cache_per_token
        row = {"impl": args.impl, "mesh": args.mesh, **kernels, **setting, "batch": b,
               "prefill_tokens_per_s": b * args.prompt / prefill_s,
               "decode_tokens_per_s": b * steps / decode_s, "step_ms": 1e3 * step_s,
               "bytes_per_step_gb": bytes_step / 1e9, "achieved_gb_s": bytes_step / step_s / 1e9, **copy}
        if copy:
            row["achieved_of_copy"] = row["achieved_gb_s"] / copy["copy_gb_s"]
        emit(row, args.out)


if __name__ == "__main__":
    main()
