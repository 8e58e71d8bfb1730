"""Peak host memory of convert_weights.py on a random checkpoint of several GB (V2-Lite widths, a few layers).

  python bench/convert_memory.py --workdir /tmp/convert_bench [--layers 6] [--keep]

Writes a random bf16 HF folder (V2-Lite shapes, `--layers` layers: 1 dense + the rest MoE, 2 GB shards),
then runs, each in a fresh process whose peak RSS (ru_maxrss from wait4) is reported:
  import   python -c "import dsv2_jax.convert"              (the fixed cost of the libraries)
  to-ckpt  convert_weights.py --hf HF --out CKPT
  to-hf    convert_weights.py --ckpt CKPT --out-hf HF2 --max-shard-size 2GB
and checks that HF2 holds the same tensors as HF, byte for byte. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dsv2_jax import ModelConfig, convert  # noqa: E402
from dsv2_jax.weights import hf_tensors  # noqa: E402

GB = 1e9


def random_blocks(shape, dtype, rng, block_bytes=64 << 20):
    """Random finite bf16 values (|x| < 2) in row blocks, never the whole tensor at once."""
    rows = shape[0]
    row = int(np.prod(shape[1:]))
    step = max(1, block_bytes // (2 * row))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        bits = rng.integers(0, 1 << 16, size=(n,) + tuple(shape[1:]), dtype=np.uint16) & 0xBFFF
        yield bits.view(dtype)


def write_random_hf(folder: str, config: ModelConfig, shard_bytes: int) -> int:
    bf16 = convert.DTYPES["bfloat16"]
    tensors = hf_tensors(config, convert._abstract_shapes(config))
    entries = [(t.name, t.shape, bf16) for t in tensors]
    shards = convert.plan_shards(entries, shard_bytes)
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for file, idx in zip(files, shards):
        convert.write_safetensors(os.path.join(folder, file), [entries[i] for i in idx],
                                  (random_blocks(entries[i][1], bf16, rng) for i in idx))
    total = sum(int(np.prod(s)) * 2 for _, s, _ in entries)
    import json

    with open(os.path.join(folder, convert.INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {entries[i][0]: file for file, idx in zip(files, shards) for i in idx}}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(convert.hf_config_dict(config, bf16), f, indent=2)
    return total


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a child process."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return usage.ru_maxrss * 1024, time.time() - start


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="scratch folder (needs ~3x the checkpoint size on disk)")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (1 dense + MoE), default 6")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()
    config = ModelConfig.from_preset("deepseek-v2-lite").replace(num_hidden_layers=args.layers)
    hf, ckpt, hf2 = (os.path.join(args.workdir, n) for n in ("hf", "ckpt", "hf_export"))
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir)
    try:
        t = time.time()
        size = write_random_hf(hf, config, 2 * 10**9)
        print(f"random checkpoint: {size / GB:.2f} GB of bf16 tensors in {time.time() - t:.0f} s", flush=True)
        cli = [sys.executable, os.path.join(ROOT, "convert_weights.py"), "--no-progress"]
        rows = [("import dsv2_jax.convert", *run_measured([sys.executable, "-c", "import dsv2_jax.convert"]))]
        rows.append(("HF -> checkpoint", *run_measured(cli + ["--hf", hf, "--out", ckpt])))
        rows.append(("checkpoint -> HF", *run_measured(cli + ["--ckpt", ckpt, "--out-hf", hf2,
                                                               "--max-shard-size", "2GB"])))
        want, got = convert.open_hf_weights(hf), convert.open_hf_weights(hf2)
        assert want.names() == got.names(), "tensor names differ"
        for name in sorted(want.names()):
            a, b = want.read(name), got.read(name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"{name} differs"
        print(f"round trip bit-exact: {len(want.names())} tensors\n")
        print(f"checkpoint: {size / GB:.2f} GB (bf16, {args.layers} layers of V2-Lite widths); on disk: HF "
              f"{folder_bytes(hf) / GB:.2f} GB, orbax {folder_bytes(ckpt) / GB:.2f} GB")
        print(f"target: peak RSS < 25% of the checkpoint + 1 GB = {(0.25 * size + GB) / GB:.2f} GB\n")
        print("| step | peak RSS | % of checkpoint | time |\n|---|---|---|---|")
        for name, rss, secs in rows:
            print(f"| {name} | {rss / GB:.2f} GB | {100 * rss / size:.1f}% | {secs:.0f} s |")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
