"""Convert DeepSeek-V2 weights between Hugging Face folders and dsv2_jax (orbax) checkpoints, streaming.

  python convert_weights.py --hf HF_DIR --out CKPT_DIR [--dtype bfloat16|float32|float16] [--force]
  python convert_weights.py --ckpt CKPT_DIR --out-hf HF_DIR [--dtype ...] [--max-shard-size 5GB] [--force]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

EPILOG = """\
directions:
  --hf HF_DIR --out CKPT_DIR
      HF_DIR holds config.json and the weights: model.safetensors, or shards listed in
      model.safetensors.index.json, or PyTorch pytorch_model*.bin files (needs torch). CKPT_DIR becomes an
      orbax step directory (params/ in this library's layout: stacked layers and experts, kv_b split;
      model_config/ with the config) that dsv2_jax.load(CKPT_DIR) reads.
  --ckpt CKPT_DIR --out-hf HF_DIR
      CKPT_DIR is a step directory, a checkpoint manager directory (the latest step is exported) or a
      train workdir (its checkpoints/). HF_DIR gets safetensors shards of at most --max-shard-size named
      model-0000k-of-0000n.safetensors (one model.safetensors when everything fits), the index
      model.safetensors.index.json, and config.json in the released files' style (rope_scaling +
      rope_theta), with per-expert tensor names (model.layers.{i}.mlp.experts.{e}.gate_proj.weight ...).

memory: tensors are read and written one at a time; peak host memory does not grow with the model.
safety: every missing, unexpected or mis-shaped tensor is an error naming it and its expected shape; output
  is written to a hidden staging folder next to the output and renamed at the end, so a failed or
  interrupted run leaves no output. An existing output is only replaced with --force.

examples:
  python convert_weights.py --hf ~/DeepSeek-V2-Lite --out ckpt/v2-lite
  python convert_weights.py --ckpt workdir --out-hf export/v2-lite --dtype bfloat16 --max-shard-size 5GB
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py", description="Convert DeepSeek-V2 weights between Hugging Face folders and "
        "dsv2_jax orbax checkpoints, streaming (bounded host memory).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="HF_DIR", help="Hugging Face folder to convert into a checkpoint")
    source.add_argument("--ckpt", metavar="CKPT_DIR", help="checkpoint (step dir, manager dir or train workdir) "
                        "to export as a Hugging Face folder")
    parser.add_argument("--out", metavar="CKPT_DIR", help="with --hf: the checkpoint directory to write")
    parser.add_argument("--out-hf", metavar="HF_DIR", help="with --ckpt: the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                        help="dtype of the written weights (default: the source's; train.py checkpoints are "
                        "float32)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="with --out-hf: largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB; a "
                        "single bigger tensor gets a shard of its own)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.hf is not None and (args.out is None or args.out_hf is not None):
        parser.error("--hf needs --out CKPT_DIR (and no --out-hf)")
    if args.ckpt is not None and (args.out_hf is None or args.out is not None):
        parser.error("--ckpt needs --out-hf HF_DIR (and no --out)")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; leave accelerators alone
    from dsv2_jax import convert

    progress = not args.no_progress
    # A TERM signal (a job scheduler's stop) unwinds like Ctrl-C, so the staging folder is removed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.hf is not None:
            out = convert.hf_to_checkpoint(args.hf, args.out, args.dtype, args.force, progress)
        else:
            out = convert.checkpoint_to_hf(args.ckpt, args.out_hf, args.dtype, args.max_shard_size, args.force,
                                           progress)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, PermissionError) as e:
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert_weights.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
