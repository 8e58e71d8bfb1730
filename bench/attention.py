"""Attention kernels for training: one layer's attention, forward and forward + backward, per kernel.

B × S tokens, H heads, d_qk / d_v (V2-Lite: 16 heads, 192 / 128), bf16, each row packed with --docs documents of
equal length, masked as the model masks them (causal within each document). Kernels (--impls):
  tokamax  tokamax.dot_product_attention with the mask and the causal hint; and with the documents as key ranges
           (each query's first key: what the model runs on GPU, dsv2_jax.attention.tokamax_attention)
  cudnn    cuDNN through jax's fused-attention module (private), the mask as a bias, causal mask type
  xla      the einsum and masked softmax of dsv2_jax.attention (what the model runs without tokamax)
each also causal only, without a mask array (the kernel's own causal masking: a lower bound, right only for one
document per row). Every output and the gradients with respect to q, k and v are checked against a float32 einsum
reference with the same mask (relative error at the norm), on the first --check-rows rows (rows are independent);
times are medians of --reps calls.

    python bench/attention.py [--batch 2] [--seq 4096] [--docs 3] [--impls tokamax cudnn xla] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grouped_matmul import median_ms  # noqa: E402
from bench.report import emit  # noqa: E402


def kernels(scale: float):
    """name -> attention(q, k, v, mask) -> [B, S, H, d_v], each imported only when asked for. mask: bool [B, S, S]
    with the causal part included, a DocumentMask (tokamax only), or None for causal attention without a mask
    array."""
    import jax.numpy as jnp

    def tokamax_(q, k, v, mask):
        import tokamax
        from dsv2_jax.attention import DocumentMask, tokamax_attention
        if isinstance(mask, DocumentMask):
            return tokamax_attention(q, k, v, mask, True, scale)
        mask = None if mask is None else mask[:, None]
        return tokamax.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale)

    def cudnn(q, k, v, mask):
        from jax._src.cudnn import fused_attention_stablehlo as fa
        mask = None if mask is None else mask[:, None]
        return fa.dot_product_attention(q, k, v, mask=mask, scale=scale, mask_type=fa.MaskType.CAUSAL)

    def xla(q, k, v, mask):
        from dsv2_jax.attention import causal_mask, masked_softmax
        if mask is None:
            mask = causal_mask(jnp.zeros(q.shape[:2], jnp.int32))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        return jnp.einsum("bhqk,bkhv->bqhv", masked_softmax(scores, mask, scale, q.dtype), v)

    return {"tokamax": tokamax_, "cudnn": cudnn, "xla": xla}


def reference(q, k, v, mask, scale: float):
    import jax
    import jax.numpy as jnp
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    scores = jnp.einsum("bqhd,bkhd->bhqk", f32[0], f32[1], precision="highest") * scale
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhv->bqhv", probs, f32[2], precision="highest")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--qk-dim", type=int, default=192)
    parser.add_argument("--v-dim", type=int, default=128)
    parser.add_argument("--docs", type=int, default=3, help="documents packed into each row (equal lengths)")
    parser.add_argument("--impls", nargs="+", default=["tokamax", "cudnn", "xla"], choices=["tokamax", "cudnn", "xla"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--check-rows", type=int, default=2, help="rows checked against the float32 reference")
    parser.add_argument("--out", default=None, help="append a JSON line per result here")
    args = parser.parse_args(argv)
    if not 1 <= args.docs <= args.seq:
        parser.error(f"--docs must be between 1 and --seq ({args.seq}), got {args.docs}")
    if args.check_rows < 1:
        parser.error(f"--check-rows must be at least 1, got {args.check_rows}")

    import jax
    import jax.numpy as jnp
    from dsv2_jax.attention import DocumentMask, causal_mask

    B, S, H = args.batch, args.seq, args.heads
    scale = args.qk_dim ** -0.5
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, S, H, args.qk_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, S, H, args.qk_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, S, H, args.v_dim), jnp.bfloat16)
    cotangent = jax.random.normal(keys[3], (B, S, H, args.v_dim), jnp.float32)
    segments = jnp.broadcast_to(jnp.arange(S) * args.docs // S, (B, S))
    ranges = DocumentMask.of(segments)
    masks = {"documents": ranges.as_array(),
             **({"document ranges": ranges} if "tokamax" in args.impls else {}),  # key ranges: tokamax only
             "causal only": None}  # None: the kernels' own causal masking
    flops = B * H * S * S * (args.qk_dim + args.v_dim)  # causal: half of the S² scores, 2 FLOPs per product
    n = min(args.check_rows, B)
    refs = {}  # the float32 reference of the first n rows, by the mask it applies: the documents, or causal only

    def checked(mask):
        kind = "causal" if mask is None else "documents"
        if kind not in refs:
            full = causal_mask(jnp.zeros((n, S), jnp.int32)) if mask is None else masks["documents"][:n]
            qn, kn, vn, ct = q[:n], k[:n], v[:n], cotangent[:n]
            ref_loss = lambda q, k, v: jnp.sum(reference(q, k, v, full, scale) * ct)  # noqa: E731
            refs[kind] = (jax.jit(reference, static_argnums=4)(qn, kn, vn, full, scale),
                          jax.jit(jax.grad(ref_loss, (0, 1, 2)))(qn, kn, vn))
        return refs[kind]

    rows = []
    for mask_name, mask in masks.items():
        ref, ref_grads = checked(mask)
        for name in args.impls:
            if isinstance(mask, DocumentMask) and name != "tokamax":
                continue
            f = kernels(scale)[name]
            row = {"impl": name, "mask": mask_name, "batch": B, "seq": S, "heads": H,
                   "qk_dim": args.qk_dim, "v_dim": args.v_dim, "docs": args.docs}
            try:
                forward = jax.jit(f)
                grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, mask).astype(jnp.float32) * cotangent),
                                        (0, 1, 2)))
                out, grads = forward(q, k, v, mask), grad(q, k, v)
                rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
                row["error_out"] = rel(out[:n], ref)
                row["error_grads"] = [rel(a[:n], b) for a, b in zip(grads, ref_grads)]
                row["fwd_ms"] = median_ms(forward, q, k, v, mask, reps=args.reps)
                row["fwd_bwd_ms"] = median_ms(grad, q, k, v, reps=args.reps)
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9  # backward = 2.5 forwards
            except Exception as e:  # e.g. cuDNN off a GPU, tokamax not installed
                row["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            emit(row, args.out)
    print(f"\nB={B} S={S} H={H} d_qk={args.qk_dim} d_v={args.v_dim}, {args.docs} documents per row; "
          f"forward {flops / 1e12:.3f} TFLOP (causal)")
    for r in rows:
        name = f"{r['impl']}, {r['mask']}"
        if "failed" in r:
            print(f"{name:24s} failed: {r['failed'][:120]}")
            continue
        print(f"{name:24s} fwd {r['fwd_ms']:8.3f} ms ({r['fwd_tflops']:5.0f} TFLOP/s)  "
              f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms ({r['fwd_bwd_tflops']:5.0f})  error {r['error_out']:.1e}, grads "
              + " ".join(f"{e:.1e}" for e in r["error_grads"]))
    return rows


if __name__ == "__main__":
    main()
