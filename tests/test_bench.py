"""The benchmark scripts' own arithmetic (bench/ runs on GPUs; its helpers are plain Python)."""

import importlib
import importlib.util
import os
import time


def load(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_idle_between_kernels(capsys):
    idle_between = load("trace_summary").idle_between
    # two steps of kernels a then b, in trace order shuffled: idle a->b 2 and 1 µs, b->a 3 µs
    kernels = [dict(name="b", ts=12, dur=5), dict(name="a", ts=0, dur=10), dict(name="b", ts=31, dur=5),
               dict(name="a", ts=20, dur=10)]
    assert idle_between(kernels, steps=2) == {"a -> b": 3, "b -> a": 3}
    out = capsys.readouterr().out
    assert "span per step 0.018 ms: kernels 0.015 ms, idle between them 0.003 ms" in out
    assert "1.50      1.0      1.50  a -> b" in out  # per step, count per step, median
    assert idle_between(kernels[:1]) == {}


def test_summarize_groups_a_kernels_copies(tmp_path, capsys):
    """trace_summary.summarize: a kernel's copies (`name__N`, one per call site) count as one kernel; host events
    and other modules' kernels are left out of the kernel tables."""
    import gzip
    import json

    summarize = load("trace_summary").summarize
    device = dict(ph="M", pid=2, name="process_name", args=dict(name="/device:GPU:0"))
    k = lambda name, ts, dur, module="jit_loop": dict(ph="X", pid=2, name=name, ts=ts, dur=dur,  # noqa: E731
                                                    args=dict(hlo_module=module))
    events = [device, k("gate_up", 0, 4), k("gate_up__1", 5, 6), k("down__12", 12, 3), k("other", 16, 9, "jit_x"),
              dict(ph="X", pid=1, name="launch", ts=0, dur=2)]
    with gzip.open(tmp_path / "t.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = summarize(str(tmp_path), steps=1, module="loop")
    assert got["by_kernel"] == {"gate_up": 10, "down": 3}
    assert "gate_up  x2" in capsys.readouterr().out


def test_host_events_in_the_device_span(capsys):
    """trace_summary.host_events: the host threads' complete events inside the device's span, by name (per step,
    count per step, median); device events, events outside the span and other phases are left out."""
    host_events = load("trace_summary").host_events
    events = [dict(ph="X", pid=1, name="launch", ts=10, dur=4), dict(ph="X", pid=1, name="launch", ts=30, dur=2),
              dict(ph="X", pid=1, name="execute", ts=5, dur=40), dict(ph="X", pid=2, name="kernel", ts=10, dur=5),
              dict(ph="X", pid=1, name="before", ts=0, dur=3), dict(ph="X", pid=1, name="past", ts=48, dur=5),
              dict(ph="i", pid=1, name="instant", ts=20)]
    got = host_events({"traceEvents": events}, {2}, (5, 50), steps=2)
    assert got == {"launch": 6, "execute": 40}
    out = capsys.readouterr().out
    assert "20.00      0.5     40.00  execute" in out and "3.00      1.0      3.00  launch" in out
    assert host_events({"traceEvents": events}, {1, 2}, (5, 50)) == {}


def test_gpu_summary_reads_nvidia_smi_samples():
    """report.gpu_summary: medians of the SM clock and power, the share of samples at the driver's power cap (bit
    0x4) and the share slowed for heat or by the hardware; unreadable lines skipped."""
    gpu_summary = load("report").gpu_summary
    text = ("1980, 450.5, 0x0000000000000000\n1515, 690.0, 0x0000000000000004\n[N/A], [N/A], [N/A]\n"
            "1530, 695.0, 0x0000000000000024\n")  # 0x24: the power cap and the SW thermal slowdown
    assert gpu_summary(text) == {"sm_clock_mhz": 1530.0, "power_w": 690.0, "power_capped": 2 / 3,
                                 "slowed_down": 1 / 3, "gpu_samples": 3}
    assert gpu_summary("") == {}


def test_gpu_clocks_samples_beside_the_block(tmp_path, monkeypatch):
    """report.gpu_clocks runs nvidia-smi (here a stand-in on PATH that accepts only the expected query) while the
    block runs and summarises what it printed; without nvidia-smi the figures are left out."""
    report = load("report")
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\ncase "$*" in *"--query-gpu=' + report.GPU_QUERY + ' --format=csv,noheader,nounits '
                    '-lms 100"*) ;; *) exit 2 ;; esac\n'
                    'while true; do echo "1515, 690.0, 0x0000000000000004"; sleep 0.02; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with report.gpu_clocks() as gpu:
        time.sleep(0.3)
    assert gpu["sm_clock_mhz"] == 1515 and gpu["power_w"] == 690 and gpu["power_capped"] == 1
    assert gpu["slowed_down"] == 0 and gpu["gpu_samples"] >= 2
    assert "SM 1515 MHz  690 W  power-capped 100% of samples" in report.gpu_text(gpu)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with report.gpu_clocks() as gpu:
        pass
    assert gpu == {} and report.gpu_text(gpu) == ""


def test_train_step_times_back_to_back_steps_with_one_wait(monkeypatch):
    """train_step.median_step_seconds waits after each timed step; with back_to_back it then dispatches `steps`
    more and waits once, and reports their mean."""
    train_step = load("train_step")
    monkeypatch.setenv("PATH", "")  # no nvidia-smi: no clock figures
    calls = []
    assert train_step.median_step_seconds(lambda: calls.append("run"), 3, lambda: calls.append("wait"))[1] == {}
    assert calls == ["run", "run", "wait"] + ["run", "wait"] * 3
    calls.clear()
    seconds, extra = train_step.median_step_seconds(lambda: calls.append("run") or time.sleep(0.01), 3,
                                                    lambda: calls.append("wait"), back_to_back=True)
    assert calls == ["run", "run", "wait"] + ["run", "wait"] * 3 + ["run"] * 3 + ["wait"]
    assert seconds >= 0.01 and 0.01 <= extra["back_to_back_step_s"] < 1.0 and list(extra) == ["back_to_back_step_s"]


def test_copy_bandwidth_counts_a_loops_reads_and_writes(monkeypatch):
    """bench/decode.copy_bandwidth_jax: each timed call runs COPY_LOOP copies, each reading and writing the array;
    with a clock whose calls take 1, 2 and 4 s the rates are those bytes over each, median, slowest and fastest."""
    import types

    decode = load("decode")
    ticks = iter([0.0, 1.0, 10.0, 12.0, 20.0, 24.0])  # three calls: 1 s, 2 s, 4 s
    monkeypatch.setattr(decode, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    copy = decode.copy_bandwidth_jax(elements=1024, repeats=3)
    moved = 2 * 4 * 1024 * decode.COPY_LOOP / 1e9  # GB a call
    assert copy == {"copy_gb_s": moved / 2, "copy_gb_s_min": moved / 4, "copy_gb_s_max": moved / 1}


def test_decode_compiles_each_batch_again(decode_kernels):
    """bench/decode.py --compiles 2: each batch compiled and timed twice in the process, one row each, on the tiny
    model (CPU). Every compilation is a real one: jax's caches are cleared in between and the persistent cache the
    tests run with (conftest) is off meanwhile (no hits), then on again. --layers-per-iteration,
    --moe-two-kernel-tokens, --latent-row-tiles and --matvec-64-row-tiles: a row per setting."""
    import jax
    from dsv2_jax import ModelConfig

    decode_kernels("auto", "auto")  # run_jax sets both variables; the fixture restores them after
    config = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2)  # one dense layer, one MoE layer
    hits = []
    listener = lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
    jax.monitoring.register_event_listener(listener)
    try:
        rows = list(load("decode").run_jax(config, [2], 8, 3, compiles=2))
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert not hits and jax.config.jax_enable_compilation_cache
    assert [(setting["compile"], batch) for setting, batch, *_ in rows] == [(0, 2), (1, 2)]
    for setting, _, prefill_s, decode_s, steps in rows:
        assert setting["first_call_s"] > 0 and prefill_s > 0 and decode_s > 0 and steps == 3
    # --layers-per-iteration: one row each, the module's own setting back afterwards
    gen = importlib.import_module("dsv2_jax.generate")
    default = gen.DECODE_LAYERS_PER_ITERATION
    rows = list(load("decode").run_jax(config, [1], 8, 2, layers_per_iteration=(1, 2)))
    assert [setting["layers_per_iteration"] for setting, *_ in rows] == [1, 2]
    assert gen.DECODE_LAYERS_PER_ITERATION == default
    # --moe-two-kernel-tokens the same way
    default = gen.DECODE_MOE_TWO_KERNEL_TOKENS
    rows = list(load("decode").run_jax(config, [1], 8, 2, moe_two_kernel_tokens=(0, 1)))
    assert [setting["moe_two_kernel_tokens"] for setting, *_ in rows] == [0, 1]
    assert gen.DECODE_MOE_TWO_KERNEL_TOKENS == default
    # --latent-row-tiles the same way, the module's tiles back afterwards
    from dsv2_jax import attention
    default = attention.MANY_ROW_TILES, attention.LATENT_SPAN_PROGRAMS
    rows = list(load("decode").run_jax(config, [2], 8, 2, latent_row_tiles=("off", "on")))
    assert [setting["latent_row_tiles"] for setting, *_ in rows] == ["off", "on"]
    assert (attention.MANY_ROW_TILES, attention.LATENT_SPAN_PROGRAMS) == default
    # --matvec-64-row-tiles: while a setting's row is out, 64 rows get the tiles of 2-32 (off) or their own (on)
    from dsv2_jax import grouped_matmul
    default = grouped_matmul.MATVEC_64_ROW_TILES
    runs = load("decode").run_jax(config, [2], 8, 2, matvec_64_row_tiles=("off", "on"))
    for want in ("off", "on"):
        setting, *_ = next(runs)
        assert setting["matvec_64_row_tiles"] == want
        assert (grouped_matmul.matvec_tiles(64) == grouped_matmul.matvec_tiles(32)) == (want == "off")
    assert list(runs) == [] and grouped_matmul.MATVEC_64_ROW_TILES is default


def test_attention_bench_checks_kernels_against_the_reference():
    """bench/attention.py on CPU at tiny widths: the XLA kernel matches the float32 reference under each mask (bf16
    rounding; the reference over the first two of three rows), the document mask matters at these shapes, and kernels
    that cannot run here are reported, not raised."""
    import jax
    import jax.numpy as jnp
    from dsv2_jax.attention import causal_mask

    attention = load("attention")
    rows = attention.main(["--batch", "3", "--check-rows", "2", "--seq", "64", "--heads", "2", "--qk-dim", "24",
                           "--v-dim", "16", "--docs", "2", "--reps", "1", "--impls", "xla", "cudnn"])
    assert [(r["impl"], r["mask"]) for r in rows] == [("xla", "documents"), ("cudnn", "documents"),
                                                      ("xla", "causal only"), ("cudnn", "causal only")]
    for r in rows:
        if r["impl"] == "xla":
            assert r["error_out"] < 1e-2 and max(r["error_grads"]) < 1e-2, r
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        elif jax.default_backend() != "gpu":
            assert "failed" in r  # cuDNN off a GPU

    q, k, v = (jax.random.normal(key, (1, 64, 2, d), jnp.float32)
               for key, d in zip(jax.random.split(jax.random.key(1), 3), (24, 24, 16)))
    documents = causal_mask(jnp.arange(64)[None] * 2 // 64)
    xla = attention.kernels(24 ** -0.5)["xla"]
    with jax.default_matmul_precision("highest"):  # float32 products on GPUs too (no TF32)
        out, ref = xla(q, k, v, documents), attention.reference(q, k, v, documents, 24 ** -0.5)
        causal_out = xla(q, k, v, None)
        causal_ref = attention.reference(q, k, v, causal_mask(jnp.zeros((1, 64), jnp.int32)), 24 ** -0.5)
    assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
    assert float(jnp.max(jnp.abs(causal_out - causal_ref))) < 1e-5
    assert float(jnp.linalg.norm(causal_ref - ref) / jnp.linalg.norm(ref)) > 0.1


def test_step_parts_checks_each_form_against_the_code(capsys):
    """bench/step_parts.py on CPU with few tokens: the experts' row gathers and the combine's backward in their
    other forms (the barrier-free combine, the in-bounds gather) give the code's results."""
    import re

    load("step_parts").main(["--parts", "gather", "combine", "--tokens", "64"])
    out = capsys.readouterr().out
    diffs = [float(d) for d in re.findall(r"max \|difference\| (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out


def test_step_parts_checks_the_loss_kernel_against_xla(capsys):
    """bench/step_parts.py --parts loss on CPU (the kernel interpreted): the code's tiles and one more give XLA's
    log-sum-exp and bf16 d logits, for float32 and bf16 logits (within one bf16 step of values below 1)."""
    import re

    load("step_parts").main(["--parts", "loss", "--loss-rows", "8", "--vocab", "256", "--loss-tiles", "4,128,4,3"])
    out = capsys.readouterr().out
    diffs = [float(d) for d in re.findall(r"max \|difference\| (\S+)", out)]
    assert len(diffs) == 4 and max(diffs) <= 2 ** -8, out


def test_decode_projections_sweep_checks_each_config():
    """bench/decode_projections.py on the tiny model (CPU, the kernels in Pallas's interpreter): every product of the
    decoding step at its default tiles, then a sweep's first configs, each product equal to a float32 product of the
    same bf16 operands (float32 accumulation: ~1e-7)."""
    from dsv2_jax.grouped_matmul import PROJECTION_TILES, matvec_tiles

    bench = load("decode_projections")
    common = ["--preset", "tiny", "--layers", "2", "--repeats", "1", "--dispatches", "1"]
    rows = bench.main(common + ["--tokens", "1", "3"])
    names = ("input", "q_b", "o_proj", "shared_gate_up", "shared_down")
    assert [(r["product"], r["tokens"]) for r in rows] == [(p, t) for p in names for t in (1, 3)]
    # q_a (64) with kv_a (32 + 16), q_b (4 × 48), o_proj, the shared expert's gate with up (64 + 64) and down
    assert [r["N"] for r in rows[::2]] == [[64, 48], [192], [128], [64, 64], [128]]
    assert [r["K"] for r in rows[::2]] == [128, 64, 128, 128, 64]
    # the tiles the decoding step runs: PROJECTION_TILES' for one token's input and o_proj products, else the
    # default tiles of one token or of more
    for r in rows:
        want = {**matvec_tiles(r["tokens"]), **PROJECTION_TILES.get((r["product"], r["tokens"]), {})}
        assert all(r[k] == want[k] for k in ("block_k", "block_n", "num_warps", "num_stages", "programs")), r
    swept = bench.main(common + ["--tokens", "1", "3", "--products", "o_proj", "--sweep", "--limit", "2"])
    tiles = lambda r: [r[k] for k in ("block_k", "block_n", "num_warps", "num_stages", "programs")]  # noqa: E731
    assert [tiles(r) for r in swept[::2]] == [tiles(rows[4]), tiles(rows[5])]  # the defaults first
    # then the grid of one token, or of more (MANY_TOKEN_SWEEP's first config)
    assert tiles(swept[1]) == [v[0] for v in bench.SWEEP.values()]
    assert tiles(swept[3]) == [v[0] for v in bench.MANY_TOKEN_SWEEP.values()]
    for r in rows + swept:
        assert "failed" not in r, r
        assert r["rel_err"] < 1e-5 and r["us_per_layer"] > 0, r


def test_decode_head_checks_each_form():
    """bench/decode_head.py on the tiny model (CPU, the kernels in Pallas's interpreter): XLA's head at every row
    count, the kernel up to MATVEC_MAX_TOKENS rows, the kernel with the norm inside at one row, each against a
    float64 product of the same rounded operands."""
    from dsv2_jax.grouped_matmul import MATVEC_MAX_TOKENS

    rows = load("decode_head").main(["--preset", "tiny", "--tokens", "1", "3", str(MATVEC_MAX_TOKENS + 1),
                                     "--calls", "1", "--dispatches", "1"])
    assert [(r["tokens"], r["form"]) for r in rows] == [
        (1, "xla"), (1, "kernel"), (1, "kernel+norm"), (3, "xla"), (3, "kernel"), (MATVEC_MAX_TOKENS + 1, "xla")]
    for r in rows:
        assert (r["D"], r["V"]) == (128, 512) and r["us"] > 0, r
        # XLA's one-row bf16 product on CPU rounds more (1.3e-3 here; 4.4e-6 on an H200)
        assert r["rel_err"] < (5e-3 if (r["form"], r["tokens"]) == ("xla", 1) else 1e-5), r


def test_decode_experts_routed_checks_the_kernels():
    """bench/decode_experts.py --routed on the tiny model (CPU, the kernels in Pallas's interpreter; its routing
    made greedy, as V2-Lite's): routed_experts_mlp over two layers against XLA's routing, the sorted path and XLA's
    residual add, the default tiles and a sweep's first config of each kernel. The forms round differently (the
    kernels sum the experts in float32 and round once, XLA rounds the routed sum and then adds the shared expert):
    within 1e-2 relative, where a token losing its top expert moves the output by 32-37%."""
    bench = load("decode_experts")
    common = ["--preset", "tiny", "--layers", "2", "--repeats", "1", "--dispatches", "1", "--routed"]
    rows = bench.main(common + ["--tokens", "1", "2"])
    assert [(r["tokens"], r["path"]) for r in rows] == [
        (t, p) for t in (1, 2) for p in ("routed, XLA", "routed, kernels (default tiles)")]
    swept = bench.main(common + ["--tokens", "1", "--sweep", "--limit", "1"])
    assert [(r["path"], r["tiles"]) for r in swept] == [
        (f"routed, {k} tiles", tuple(v[0] for v in bench.SWEEP.values())) for k in ("gate_up", "down")]
    for r in rows + swept:
        assert "error" not in r and r["us_per_layer"] > 0, r
        assert r["rel_err_vs_sorted"] < 1e-2, r
    assert rows[0]["rel_err_vs_sorted"] == 0  # the reference against itself


def test_mosaic_kernels_medians_of_device_kernels(tmp_path):
    """bench/mosaic_kernels.kernel_medians: calls and median µs by kernel name, device kernels only."""
    import gzip
    import json

    kernel_medians = load("mosaic_kernels").kernel_medians
    events = [dict(ph="M", pid=2, name="process_name", args=dict(name="/device:GPU:0")),
              *(dict(ph="X", pid=2, name="gate_up", ts=t, dur=d) for t, d in ((0, 3), (5, 1), (9, 2))),
              dict(ph="X", pid=2, name="down", ts=12, dur=4), dict(ph="X", pid=1, name="launch", ts=0, dur=7)]
    with gzip.open(tmp_path / "t.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert kernel_medians(str(tmp_path)) == {"down": [1, 4], "gate_up": [3, 2]}


def test_mosaic_kernels_experts_pair_in_the_interpreter():
    """bench/mosaic_kernels.py experts --cpu: the Mosaic GPU chosen-experts pair (token as row 0 of a 64-row tile,
    wgmma, TMA pipelines) in Mosaic GPU's interpreter at small widths, against chosen_experts_mlp (Pallas,
    interpreted): the same roundings, so within 1e-6 relative on both layers (1.0e-7 measured)."""
    import pytest

    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")  # the interpreter's private module
    rows = load("mosaic_kernels").main(["experts", "--cpu"])
    assert [r["check"] for r in rows] == ["layer 0", "layer 1"]
    assert all(r["row_form_rel_err_vs_chosen_experts_mlp"] < 1e-6 for r in rows), rows


def test_export_chunks_compares_the_two_layouts(capsys):
    """bench/export_chunks.py at a small size: both checkpoints export the same bytes (checked inside), the
    storage_args one a layer and an expert a chunk, orbax's default every layer and expert in one."""
    load("export_chunks").main(["--layers", "3", "--experts", "4", "--width", "64", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "| storage_args | (1, 1, 64, 64) |" in out and "| orbax default | (2, 4, 64, 64) |" in out, out
