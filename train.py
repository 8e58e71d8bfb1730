"""Train a DeepSeek-V2 model from a YAML recipe; starting again in the same workdir resumes from its checkpoint."""

import argparse
import sys

RECIPE_KEYS = """recipe keys (override any with --set key=value; YAML values, dotted keys):
  model              preset name (tiny, deepseek-v2-lite, deepseek-v2), a config.json path/folder, or a dict
  model_overrides    dict of ModelConfig fields to change, e.g. --set model_overrides.num_hidden_layers=2
  dtype, param_dtype compute dtype and master-weight dtype: float32 | bfloat16 (default bfloat16 / float32)
  seed, steps        initialisation seed; total optimizer steps (the schedule is laid out over them)
  batch_size         global rows per step; grad_accum splits them into micro-batches
  remat              none | full | save_dots
  scan_layers        true: layers under lax.scan (default); false: unrolled (faster steps, longer compiles)
  capacity_factor    null (dropless) or the paper's device-level capacity factor, e.g. 1.0
  loss_chunk         sequence positions per chunk of the cross-entropy (default 1024)
  logits_dtype       float32 (default) | bfloat16: the head's product as stored before the log-softmax
  data.sources       list of files/globs (empty: the Python standard library's sources); data.format text|jsonl|tokens
  data.text_field    JSONL field; data.tokenizer: byte | tokenizer.json path; data.seq_len; data.eval_fraction; data.seed
  optimizer.*        lr, warmup_steps, schedule (step|cosine), decay_at, decay_factor, min_lr_ratio, b1, b2, eps,
                     weight_decay, clip_norm
  balance.*          alpha1 (expert), alpha2 (device), alpha3 (communication), device_groups, device_limit
  mesh               {data, fsdp, expert, tensor}; one size may be -1 (the rest of the devices)
  checkpoint_every, keep_checkpoints, log_every, eval_every, eval_batches, peak_tflops
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=RECIPE_KEYS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("--workdir", required=True, help="run folder: checkpoints/, metrics.jsonl, tb/")
    parser.add_argument("--steps", type=int, default=None, help="total steps (overrides the recipe's steps)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="leave after this many steps of this invocation (checkpoint saved; schedule unchanged)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from dsv2_jax import distributed
    distributed.initialize()  # several hosts: from JAX_COORDINATOR_ADDRESS etc. or cluster detection; else nothing
    from dsv2_jax.training import NonFiniteLoss, load_recipe, train

    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
    try:
        recipe = load_recipe(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        records = train(recipe, args.workdir, stop_after=args.stop_after, progress=not args.no_progress)
    except (NonFiniteLoss, ValueError, FileNotFoundError) as e:  # bad data, mesh or workdir: named in the message
        print(f"error: {e}", file=sys.stderr)
        return 1
    if records:
        first, last = records[0], records[-1]
        print(f"step {first['step']}: loss {first['loss']:.4f} -> step {last['step']}: loss {last['loss']:.4f}"
              + (f", held-out loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
