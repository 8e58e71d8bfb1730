"""Save, load and export times of a checkpoint written by `dsv2_jax.save`, by how its parameters are chunked.

  python bench/export_chunks.py [--layers 4] [--experts 64] [--width 256] [--rounds 2]

One random float32 model (--layers layers: 1 dense + the rest MoE, --experts routed experts of width --width,
hidden --width) is saved twice in one process: with `checkpoint.storage_args` (a layer, and an expert, a chunk:
what `dsv2_jax.save` and train.py write) and with orbax's default chunks (which split the widest axes, so each
chunk holds every layer and expert), then loaded (`dsv2_jax.load`) and exported to Hugging Face files
(`convert.checkpoint_to_hf`), the two layouts alternating, --rounds times; the two exports are checked to hold the
same tensors, byte for byte. Prints the chunk shape of one expert stack and the median times of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402

import dsv2_jax  # noqa: E402
from dsv2_jax import checkpoint, convert  # noqa: E402


def save_default_chunks(model, path: str) -> None:
    """dsv2_jax.save's files with orbax's default chunks (no storage_args)."""
    handler = ocp.CompositeCheckpointHandler(**{checkpoint.PARAMS: ocp.StandardCheckpointHandler(),
                                                checkpoint.MODEL_CONFIG: ocp.JsonCheckpointHandler()})
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(epath.Path(path), ocp.args.Composite(**{
            checkpoint.PARAMS: ocp.args.StandardSave(checkpoint._param_tree(model)),
            checkpoint.MODEL_CONFIG: ocp.args.JsonSave(model.config.to_hf_dict())}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    config = dsv2_jax.ModelConfig.from_preset("tiny").replace(
        num_hidden_layers=args.layers, first_k_dense_replace=1, n_routed_experts=args.experts,
        hidden_size=args.width, moe_intermediate_size=args.width, intermediate_size=2 * args.width, vocab_size=1024)
    model = dsv2_jax.init_model(config, dtype=jnp.float32, param_dtype=jnp.float32, seed=0)
    work = tempfile.mkdtemp(prefix="export_chunks_")
    try:
        saves = {"storage_args": dsv2_jax.save, "orbax default": save_default_chunks}
        times = {name: {"save": [], "load": [], "export": []} for name in saves}
        for r in range(args.rounds):
            for name, save in saves.items():
                ckpt, out = (os.path.join(work, f"{kind}-{r}-{name.replace(' ', '_')}") for kind in ("ckpt", "hf"))
                for step, run in (("save", lambda: save(model, ckpt)),
                                  ("load", lambda: jax.block_until_ready(
                                      jax.tree.leaves(nnx.state(dsv2_jax.load(ckpt, dtype=jnp.float32))))),
                                  ("export", lambda: convert.checkpoint_to_hf(ckpt, out))):
                    t0 = time.perf_counter()
                    run()
                    times[name][step].append(time.perf_counter() - t0)
        exports = [dict(convert.iter_hf_tensors(os.path.join(work, f"hf-0-{n.replace(' ', '_')}"))) for n in saves]
        assert sorted(exports[0]) == sorted(exports[1])
        assert all(exports[0][k].tobytes() == exports[1][k].tobytes() for k in exports[0]), "exports differ"
        path = ("moe_layers", "mlp", "up_proj")
        first = os.path.join(work, "ckpt-0-storage_args")
        print(f"{args.layers} layers, {args.experts} experts of width {args.width}, float32; up_proj stack "
              f"{tuple(checkpoint.stored_params(first)[path].shape)}; medians of {args.rounds} rounds")
        print("| chunks | chunk of the up_proj stack | save | load | export |\n|---|---|---|---|---|")
        for name in saves:
            stored = checkpoint.StoredParams(os.path.join(work, f"ckpt-0-{name.replace(' ', '_')}"))
            stored.read(path, (0, 0))
            chunk = tuple(stored._open[path].chunk_layout.read_chunk.shape)
            t = {step: f"{np.median(v):.2f} s" for step, v in times[name].items()}
            print(f"| {name} | {chunk} | {t['save']} | {t['load']} | {t['export']} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
