"""Generate text with a DeepSeek-V2 model: latent KV cache, chunked prefill, absorbed decode, optional mesh."""

import argparse
import os
import sys
import time

EPILOG = """examples:
  python generate.py --ckpt runs/tiny --prompt "def main(" --max-new-tokens 64
  python generate.py --hf ./DeepSeek-V2-Lite --bos --prompt "The capital of France is" --mesh data=1,tensor=8
  python generate.py --hf DIR --prompts-file prompts.txt --temperature 0.8 --top-p 0.95 --seed 1

tokenizer (--tokenizer auto): the tokenizer.json in the model folder (for --ckpt also the step folder and
the folders between); else byte-level when the model's bos/eos ids are the byte tokenizer's (256/257, the tiny
preset); else text prompts are refused (token ids via --prompt-ids still work).
With one prompt the text is streamed as it is produced; with several, each completion is printed at the end.
Timings (prefill and decode tokens/s) go to stderr; they include compilation unless --warmup is given.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face folder (config.json + *.safetensors)")
    src.add_argument("--ckpt", metavar="DIR", help="orbax checkpoint: step folder, checkpoint folder or train workdir")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for a batch)")
    prompts.add_argument("--prompts-file", metavar="F", help="a text file, one prompt per non-empty line")
    prompts.add_argument("--prompt-ids", action="append", metavar="IDS",
                         help="a prompt as token ids separated by spaces or commas (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set of mass >= p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the config's eos_token_id")
    p.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS id to each text prompt")
    p.add_argument("--tokenizer", default="auto", metavar="auto|byte|PATH",
                   help="auto (default, see below), byte, or a tokenizer.json / folder holding one")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="shard over a device mesh, e.g. data=8 or data=2,tensor=4 (axes data, fsdp, expert, tensor)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="compute, parameter and cache dtype (default bfloat16)")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk length in tokens (default 256)")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache length (default: a power of two >= longest prompt + max new tokens)")
    p.add_argument("--no-stream", action="store_true", help="print the completion only when it is done")
    p.add_argument("--warmup", action="store_true", help="compile with one untimed run first")
    return p, p.parse_args(argv)


def find_tokenizer(choice: str, folder: str, config, is_ckpt: bool):
    """The tokenizer for --tokenizer `choice`, or None when auto finds none."""
    from dsv2_jax.tokenizer import ByteTokenizer, load_tokenizer

    if choice != "auto":
        return load_tokenizer(choice, config)
    candidates = [folder]
    if is_ckpt:
        from dsv2_jax.checkpoint import find_step_dir

        step = os.path.abspath(os.fspath(find_step_dir(folder)))
        root = os.path.abspath(folder)
        while step.startswith(root) and step != root:
            candidates.append(step)
            step = os.path.dirname(step)
    for d in candidates:
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return load_tokenizer(d, config)
    byte = ByteTokenizer()
    byte_ids = (config.bos_token_id, config.eos_token_id) == (byte.bos_id, byte.eos_id)
    if byte_ids and config.vocab_size >= byte.vocab_size:
        return byte
    return None


def read_prompts(args, tokenizer, folder):
    if args.prompt_ids:
        try:
            return [[int(t) for t in s.replace(",", " ").split()] for s in args.prompt_ids], False
        except ValueError:
            raise ValueError("--prompt-ids: expected integers separated by spaces or commas") from None
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"--prompts-file {args.prompts_file!r} does not exist")
        with open(args.prompts_file, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"--prompts-file {args.prompts_file!r} holds no prompt (no non-empty line)")
    else:
        texts = args.prompt
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer.json, so text prompts cannot be encoded; pass --tokenizer "
                         f"PATH (a tokenizer.json) or --tokenizer byte, or give token ids with --prompt-ids")
    bos = [tokenizer.bos_id] if args.bos and tokenizer.bos_id is not None else []
    return [bos + tokenizer.encode(t) for t in texts], True


class Streamer:
    """Prints the text of one row as its tokens arrive (holding back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, step_tokens):
        self.ids += step_tokens[0]
        self.show(final=False)

    def show(self, final: bool):
        text = self.tokenizer.decode(self.ids) if self.tokenizer else " ".join(map(str, self.ids))
        if not final and (text.endswith("\ufffd") or not text.startswith(self.printed)):
            return
        if not text.startswith(self.printed):  # the tokenizer rewrote earlier text: finish on a new line
            sys.stdout.write("\n")
            self.printed = ""
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def main(argv=None):
    parser, args = parse_args(argv)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        parser.error("--top-k / --top-p restrict sampling, and --temperature 0 (the default) is greedy: "
                     "give --temperature > 0")
    if args.bos and args.prompt_ids:
        parser.error("--bos prepends the BOS id to text prompts; with --prompt-ids put it in the ids")
    import jax.numpy as jnp

    import dsv2_jax
    from dsv2_jax.sharding import parse_mesh

    try:
        mesh = dsv2_jax.make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        folder = args.hf or args.ckpt
        if args.hf:
            model = dsv2_jax.from_hf(args.hf, dtype=dtype, mesh=mesh)
        else:
            model = dsv2_jax.load(args.ckpt, dtype=dtype, mesh=mesh)
        config = model.config
        tokenizer = find_tokenizer(args.tokenizer, folder, config, bool(args.ckpt))
        prompts, is_text = read_prompts(args, tokenizer, folder)
        eos = None if args.ignore_eos else config.eos_token_id
        kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  eos_token_id=eos, mesh=mesh, max_len=args.max_len, chunk_size=args.chunk_size)
        if args.warmup:
            dsv2_jax.generate(model, prompts, args.max_new_tokens, **kw)
        stream = len(prompts) == 1 and not args.no_stream
        streamer = Streamer(tokenizer if is_text else None) if stream else None
        timings = {}
        t0 = time.perf_counter()
        outputs = dsv2_jax.generate(model, prompts, args.max_new_tokens, on_tokens=streamer, timings=timings, **kw)
        total = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if stream:
        streamer.show(final=True)
        print()
    else:
        for i, out in enumerate(outputs):
            text = tokenizer.decode(out) if is_text else " ".join(map(str, out))
            print(f"=== {i} ===\n{text}")
    pre, dec = timings["prefill_s"], timings["decode_s"]
    print(f"prefill: {timings['prefill_tokens']} tokens in {pre:.3f} s ({timings['prefill_tokens'] / pre:.1f} "
          f"tokens/s); decode: {timings['decode_tokens']} tokens in {dec:.3f} s "
          f"({timings['decode_tokens'] / dec:.1f} tokens/s); total {total:.3f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
