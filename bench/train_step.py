"""Training-step benchmark: DeepSeek-V2-Lite widths, 4 layers (1 dense + 3 MoE), sequence 4096, bf16 compute.

Runs transformers' DeepseekV2ForCausalLM training step and then this library's jitted train step (bf16, fused AdamW,
its fastest experts implementation and SDPA attention) on the same config and batch, in one process, and prints
tokens/s, TFLOP/s and MFU for each. FLOPs per token: 6 × activated non-embedding parameters (lm_head included)
+ causal attention 3 × L × H × (d_qk + d_v) × S (see dsv2_jax.training.flops_per_token).

    python bench/train_step.py --batch 2 --steps 10 [--param-dtype float32] [--skip-torch] [--out FILE]
    python bench/train_step.py --batch 12 --remat save_dots --no-scan --loss-chunk 4096   # the loss in one chunk
    python bench/train_step.py --batch 12 --remat save_dots --no-scan --logits-dtype bfloat16   # transformers' logits
    python bench/train_step.py --batch 2 --mesh expert=8 --skip-torch     # N GPUs: --batch rows per batch shard
    python bench/train_step.py --batch 12 --remat save_dots --no-scan --xla-defaults off   # XLA_FLAGS as given
    python bench/train_step.py --batch 2 --remat save_dots --no-scan --back-to-back   # + steps not waited for one by one
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import emit, gpu_clocks, gpu_text  # noqa: E402

PEAK = 989e12  # H100 SXM dense bf16


def bench_config(layers: int, preset: str = "deepseek-v2-lite"):
    from dsv2_jax import ModelConfig
    return ModelConfig.from_preset(preset).replace(num_hidden_layers=layers, first_k_dense_replace=1)


def median_step_seconds(run, steps: int, sync, back_to_back: bool = False) -> tuple[float, dict]:
    """The median of `steps` timed steps after two untimed ones, and the GPU's clocks and power over the timed steps
    (report.gpu_clocks: on an H200 a large training step runs at its power cap, with the SM clock well below
    its maximum). back_to_back: then also the mean of `steps` steps dispatched one after another with one wait at
    the end, as a training loop runs them (the host may work ahead), in the dict as back_to_back_step_s."""
    run()
    run()
    sync()
    times = []
    with gpu_clocks() as gpu:
        for _ in range(steps):
            t = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t)
    if back_to_back:
        t = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        gpu = {**gpu, "back_to_back_step_s": (time.perf_counter() - t) / steps}
    return float(np.median(times)), gpu


def bench_jax(config, batch: int, seq: int, steps: int, param_dtype: str, remat: str, mesh_sizes: dict,
              capacity_factor: float | None, autotune: bool = False, profile_dir: str | None = None,
              scan_layers: bool = True, loss_chunk: int | None = None, logits_dtype: str = "float32",
              compiler_options: dict | None = None, back_to_back: bool = False):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv2_jax.sharding import batch_axes, init_model, make_mesh
    from dsv2_jax.training import OptimizerConfig, StepSettings, jit_steps, make_optimizer, on_mesh, to_global

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[param_dtype]
    mesh = make_mesh(**mesh_sizes) if mesh_sizes else None
    shards = int(np.prod([mesh.shape[a] for a in batch_axes()])) if mesh is not None else 1
    graphdef, state = nnx.split(init_model(config, mesh=mesh, dtype=jnp.bfloat16, param_dtype=dt, seed=0))
    params = state.to_pure_dict()
    # a constant learning rate, as on torch's side
    optimizer = make_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 1000, scan_layers)
    opt_state = on_mesh(jax.jit(optimizer.init)(params), mesh)
    groups = mesh.shape["expert"] if mesh is not None and mesh.shape["expert"] > 1 else 1
    chunk = {} if loss_chunk is None else {"loss_chunk": loss_chunk}  # else StepSettings' default
    settings = StepSettings(remat, capacity_factor, (0.001, 0.0, 0.0), groups, 1, scan_layers=scan_layers,
                            logits_dtype=logits_dtype, **chunk)
    step, _ = jit_steps(graphdef, optimizer, settings, mesh, params, opt_state, compiler_options)
    rng = np.random.default_rng(0)
    rows = batch * shards
    data = to_global({"tokens": rng.integers(0, config.vocab_size, (1, rows, seq)).astype(np.int32),
                      "segment_ids": np.ones((1, rows, seq), np.int32),
                      "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, rows, seq)).copy()}, mesh)
    box = {"p": params, "o": opt_state, "m": None}
    tuned = contextlib.nullcontext()
    if autotune:  # tokamax: search kernel configs for every tokamax op of the step, then use them
        import tokamax
        tuned = tokamax.autotune(step.lower(params, opt_state, data), timeout=60.0, progress_bar=False)
        step, _ = jit_steps(graphdef, optimizer, settings, mesh, params, opt_state, compiler_options)

    def run():
        box["p"], box["o"], box["m"] = step(box["p"], box["o"], data)

    with tuned:
        seconds, gpu = median_step_seconds(run, steps, lambda: jax.block_until_ready(box["m"]["loss"]), back_to_back)
        loss = float(box["m"]["loss"])  # after the same number of steps as the transformers side
        peak = jax.devices()[0].memory_stats() or {}
        peak = peak.get("peak_bytes_in_use", 0) / 2**30
        if profile_dir:
            from bench.trace_summary import profile
            profile(lambda: run() or box["m"]["loss"], profile_dir, sync=jax.block_until_ready, steps=2)
    return seconds, loss, rows, peak, gpu


def bench_torch(config, batch: int, seq: int, steps: int, experts_impl: str, back_to_back: bool = False):
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hf = config.to_hf_dict(rope_style="rope_parameters")
    hf.pop("model_type", None)
    cfg = DeepseekV2Config(**{k: v for k, v in hf.items() if k not in ("extra",)})
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = experts_impl
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")

    box = {}

    def run():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        box["loss"] = out.loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, gpu = median_step_seconds(run, steps, torch.cuda.synchronize, back_to_back)
    loss = float(box.pop("loss"))
    peak = torch.cuda.max_memory_allocated() / 2**30
    model = opt = None  # give the memory back before JAX takes its share
    torch.cuda.empty_cache()
    return seconds, loss, peak, gpu


def release_torch_memory():
    import gc
    import torch
    gc.collect()
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--preset", default="deepseek-v2-lite", help="model widths (tiny: a CPU smoke run)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    parser.add_argument("--no-scan", action="store_true", help="dsv2_jax: layers unrolled (recipe scan_layers: false)")
    parser.add_argument("--loss-chunk", type=int, default=None, help="dsv2_jax: sequence positions per chunk of the "
                        "cross-entropy (recipe loss_chunk; default the library's): rows x chunk x vocab float32 "
                        "logits at a time")
    parser.add_argument("--logits-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dsv2_jax: the head's product as the cross-entropy stores it (recipe logits_dtype; "
                        "bfloat16 is transformers' policy: bf16 logits, the loss in float32)")
    parser.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation")
    parser.add_argument("--mesh", default=None, help="e.g. expert=8 or expert=4,tensor=2 (all devices); --batch is "
                        "then per batch shard (weak scaling)")
    parser.add_argument("--capacity-factor", type=float, default=None, help="device-level dropping (default dropless)")
    parser.add_argument("--autotune", action="store_true", help="tokamax: autotune the kernels first (GPU)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="trace two steps here and print where the "
                        "device time goes (bench/trace_summary.py)")
    parser.add_argument("--xla-defaults", default="on", choices=["on", "off"], help="dsv2_jax: compile the step "
                        "with the training's XLA options (training.training_compiler_options), as train.py does; "
                        "off: with XLA_FLAGS alone")
    parser.add_argument("--back-to-back", action="store_true", help="also time --steps steps dispatched one after "
                        "another with one wait at the end (back_to_back_step_s), beside the synced median")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-jax", action="store_true")
    parser.add_argument("--out", default=None, help="append a JSON line per result here")
    args = parser.parse_args()

    from dsv2_jax.training import flops_per_token, training_compiler_options
    compiler_options = training_compiler_options() if args.xla_defaults == "on" else {}
    config = bench_config(args.layers, args.preset)
    fpt = flops_per_token(config, args.seq)
    from dsv2_jax.sharding import parse_mesh
    mesh_sizes = parse_mesh(args.mesh) if args.mesh else {}
    import jax
    devices = jax.device_count() if mesh_sizes else 1
    results = []

    def report(name, seconds, rows, extra=None):
        tps = rows * args.seq / seconds
        row = {"impl": name, "batch": rows, "seq": args.seq, "layers": args.layers, "step_s": seconds,
               "devices": devices, "tokens_per_s": tps, "tokens_per_s_per_device": tps / devices,
               "tflops": tps * fpt / 1e12, "mfu": tps * fpt / (PEAK * devices), **(extra or {})}
        results.append(row)
        emit(row, args.out)

    if not args.skip_torch:
        try:
            seconds, loss, peak, gpu = bench_torch(config, args.batch, args.seq, args.steps, args.experts_impl,
                                                    args.back_to_back)
            report(f"transformers experts={args.experts_impl}", seconds, args.batch,
                   {"loss": loss, "peak_gib": peak, **gpu})
        except Exception as e:  # e.g. out of memory at this batch
            print(f"transformers failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        release_torch_memory()  # a failed step's traceback held the model: free it before JAX takes its share
    if not args.skip_jax:
        from dsv2_jax.layers import kernel_backends
        seconds, loss, rows, peak, gpu = bench_jax(config, args.batch, args.seq, args.steps, args.param_dtype,
                                                   args.remat, mesh_sizes, args.capacity_factor, args.autotune,
                                                   args.profile, not args.no_scan, args.loss_chunk,
                                                   args.logits_dtype, compiler_options, args.back_to_back)
        report(f"dsv2_jax params={args.param_dtype} remat={args.remat}" + (" autotuned" if args.autotune else "")
               + (" unrolled" if args.no_scan else "")
               + (f" loss_chunk={args.loss_chunk}" if args.loss_chunk else "")
               + (f" logits={args.logits_dtype}" if args.logits_dtype != "float32" else "")
               + (f" mesh={args.mesh} cf={args.capacity_factor}" if mesh_sizes else "")
               + (" xla_defaults=off" if args.xla_defaults == "off" else ""), seconds, rows,
               {"loss": loss, "peak_gib": peak, **gpu, **kernel_backends(),  # which kernels ran
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "compiler_options": compiler_options})
    print(f"\nFLOPs/token {fpt:.4g}")
    for r in results:
        print(f"{r['impl']:45s} {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:10.0f} tok/s  "
              f"{r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  last loss {r['loss']:.3f}  "
              f"peak {r['peak_gib']:.1f} GiB" + gpu_text(r)
              + (f"  back to back {r['back_to_back_step_s'] * 1e3:.1f} ms" if "back_to_back_step_s" in r else ""))


if __name__ == "__main__":
    main()
