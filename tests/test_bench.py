"""The benchmark scripts' own arithmetic (bench/ runs on GPUs; its helpers are plain Python)."""

import importlib.util
import os


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


def test_decode_compiles_each_batch_again(decode_kernels):
    """bench/decode.py --compiles 2: each batch compiled and timed twice in the process (jax's caches cleared in
    between), one row each, on the tiny model (CPU)."""
    from dsv2_jax import ModelConfig

    decode_kernels("auto", "auto")  # run_jax sets both variables; the fixture restores them after
    config = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2)  # one dense layer, one MoE layer
    rows = list(load("decode").run_jax(config, [2], 8, 3, compiles=2))
    assert [(setting["compile"], batch) for setting, batch, *_ in rows] == [(0, 2), (1, 2)]
    for setting, _, prefill_s, decode_s, steps in rows:
        assert setting["first_call_s"] > 0 and prefill_s > 0 and decode_s > 0 and steps == 3
