"""The decoding step's head alone: the final norm and the product of T rows by the head [D, V] into float32 logits,
as XLA runs `model.head` and as `generate.decode_head` runs one token on the `stacked_partials` kernel with the norm
inside it ("kernel+norm"; "kernel" is the norm in XLA, then `stacked_matvec`). Each form is checked against a float64
product of the same rounded operands and timed: the median over --dispatches runs of --calls calls dispatched back
to back, µs a call, and the head's bytes read per second. XLA reads XLA_FLAGS once, at start, so compare its
settings in processes of their own (on a GPU):

    python bench/decode_head.py --tokens 1 4 16 64
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python bench/decode_head.py --tokens 1 4 16 64

With XLA's Triton GEMM fusions on (its default) XLA runs the product as one fusion; with them off (training's
flag) it converts the whole head to float32 first and multiplies on cuBLAS (bench/RESULTS.md §38).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import emit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v2-lite", help="model widths (hidden size, vocabulary)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64], help="rows (decoding batch)")
    parser.add_argument("--calls", type=int, default=200, help="calls dispatched back to back per timing")
    parser.add_argument("--dispatches", type=int, default=5, help="timings per form (the median is reported)")
    parser.add_argument("--out", default=None, help="append a JSON line per result here")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dsv2_jax import ModelConfig
    from dsv2_jax.grouped_matmul import MATVEC_MAX_TOKENS, stacked_matvec, stacked_partials
    from dsv2_jax.layers import rms_norm

    config = ModelConfig.from_preset(args.preset)
    D, V, eps, bf = config.hidden_size, config.vocab_size, config.rms_norm_eps, jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 3)
    head = (jax.random.normal(keys[0], (D, V), jnp.float32) / np.sqrt(D)).astype(bf)
    weight = (1 + 0.1 * jax.random.normal(keys[1], (D,), jnp.float32)).astype(bf)
    forms = {  # as model.head, and as decode_head's two kernel forms
        "xla": jax.jit(lambda x, w, g: jnp.einsum("td,dv->tv", rms_norm(x, g, eps, bf), w,
                                                  preferred_element_type=jnp.float32)),
        "kernel": jax.jit(lambda x, w, g: stacked_matvec(rms_norm(x, g, eps, bf), w)),
        "kernel+norm": jax.jit(lambda x, w, g: stacked_partials(x, w, None, g, eps=eps, dtype=bf).sum(axis=0)),
    }
    rows = []
    for T in args.tokens:
        x = jax.random.normal(jax.random.fold_in(keys[2], T), (T, D), jnp.float32).astype(bf)
        want = np.asarray(rms_norm(x, weight, eps, bf), np.float64) @ np.asarray(head, np.float64)
        for name, form in forms.items():
            if (name == "kernel+norm" and T != 1) or (name != "xla" and T > MATVEC_MAX_TOKENS):
                continue  # the norm in the kernel takes one row; the kernels at most MATVEC_MAX_TOKENS
            got = np.asarray(form(x, head, weight), np.float64)
            row = dict(tokens=T, form=name, D=D, V=V, xla_flags=os.environ.get("XLA_FLAGS", ""),
                       rel_err=float(np.abs(got - want).max() / np.abs(want).max()))
            times = []
            for _ in range(args.dispatches):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    out = form(x, head, weight)
                out.block_until_ready()
                times.append((time.perf_counter() - t0) / args.calls)
            row["us"] = 1e6 * float(np.median(times))
            row["head_tb_per_s"] = head.nbytes / row["us"] / 1e6
            rows.append(row)
            emit(row, args.out)
    return rows


if __name__ == "__main__":
    main()
