"""Where device time goes: run a function under jax.profiler and total the GPU kernels of its trace.

    from bench.trace_summary import profile
    profile(lambda: step(...), "/tmp/prof", sync=jax.block_until_ready)   # prints the top kernels and ops

    python bench/trace_summary.py TRACE_DIR [--top 40]      # summarise a trace written earlier

Kernels are grouped by name (a kernel's copies, `name__N`, one per call site, as one: a loop iteration that runs
13 layers has 13 copies of each layer's kernels), and by the model code that issued them (the jax name stack, e.g.
`moe/experts`) where the trace carries it: kernels XLA runs inside CUDA graphs (command buffers, the default on GPU)
are only attributed to their module, so then the kernel names are the guide. A third table gives the time the device sat
idle between consecutive kernels, by transition (kernel -> next kernel): launch gaps, waits on the host; a fourth
what the host's threads did over the same span (their traced events by name: XLA's thunks, launches, copies), to
tell a step the host holds back from one the GPU does.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics


def _load(trace_dir: str) -> dict:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz or perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        return json.load(f)


def _device_pids(trace: dict) -> set:
    pids = set()
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "M" and e.get("name") == "process_name":
            name = str(e.get("args", {}).get("name", ""))
            if "/device:GPU" in name or "GPU:" in name or "Stream" in name:
                pids.add(e["pid"])
    return pids


_WRAPPER = re.compile(r"^(jvp|transpose|vmap|remat|checkpoint|pjit|jit|while|cond|body|closed_call)\((.*)\)$")


def _scope(args: dict) -> str:
    """The model-level place of a kernel: the last parts of the jax name stack, transforms unwrapped, and
    "bwd " in front when it came from a transpose (the backward pass)."""
    text = str(args.get("tf_op") or args.get("long_name") or args.get("name_stack") or "").split(":")[0]
    backward, parts = False, []
    for part in text.split("/"):
        while (m := _WRAPPER.match(part)):
            backward |= m.group(1) == "transpose"
            part = m.group(2)
        if part and part not in ("while", "body", "cond", "main", "train_step", "checkpoint", "remat",
                                 "rematted_computation"):
            parts.append(part)
    return ("bwd " if backward else "") + ("/".join(parts[-3:]) or "(unnamed)")


def kernel_family(name: str) -> str:
    """A kernel's name without the `__N` that numbers its copies at different call sites."""
    return re.sub(r"__\d+$", "", name)


def summarize(trace_dir: str, top: int = 30, steps: int = 1, module: str | None = None) -> dict:
    """Totals of device kernel time by kernel name and by model scope; prints two tables, returns them.
    module: only the kernels of XLA modules whose name contains it (e.g. "decode_loop")."""
    trace = _load(trace_dir)
    pids = _device_pids(trace)
    by_kernel, by_scope, count = collections.Counter(), collections.Counter(), collections.Counter()
    sample, kernels = None, []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("pid") not in pids or "dur" not in e:
            continue
        if module and module not in str(e.get("args", {}).get("hlo_module", "")):
            continue
        kernels.append(e)
        name = kernel_family(e.get("name", "?"))
        by_kernel[name] += e["dur"]
        count[name] += 1
        by_scope[_scope(e.get("args", {}))] += e["dur"]
        sample = sample or e.get("args")
    total = sum(by_kernel.values())
    if not total:
        print(f"no device kernels found in the trace under {trace_dir}")
        return {}
    print(f"\ndevice kernel time per step: {total / 1e3 / steps:.2f} ms, {sum(count.values()) // steps} kernels "
          f"(sample args: {json.dumps(sample)[:300]})")
    tables = [("kernel", by_kernel)] + ([("scope", by_scope)] if len(by_scope) > 1 else [])
    for title, table in tables:
        print(f"\n{'ms/step':>9} {'%':>6}  by {title}")
        for name, us in table.most_common(top):
            extra = f"  x{count[name] // steps}" if title == "kernel" else ""
            print(f"{us / 1e3 / steps:9.3f} {100 * us / total:6.1f}  {name[:110]}{extra}")
    idle = idle_between(kernels, steps, top)
    window = (min(e["ts"] for e in kernels), max(e["ts"] + e["dur"] for e in kernels))
    host = host_events(trace, pids, window, steps, top)
    return {"total_us": total, "by_kernel": dict(by_kernel), "by_scope": dict(by_scope), "idle_us": idle,
            "host_us": host}


def idle_between(kernels: list, steps: int = 1, top: int = 12) -> dict:
    """Where the device waits between consecutive kernels (one stream): the span from the first kernel's start to
    the last one's end against the kernels' own time, and the idle time by transition (kernel -> next kernel)
    with its median, so a few one-off waits (the trace's first step) stand out from gaps paid every time. Prints
    the table; returns {transition: idle µs in all}."""
    kernels = sorted(kernels, key=lambda e: e["ts"])
    if len(kernels) < 2:
        return {}
    busy = sum(e["dur"] for e in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    gaps = collections.defaultdict(list)
    for a, b in zip(kernels, kernels[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 0:
            gaps[f"{a.get('name', '?')[:50]} -> {b.get('name', '?')[:50]}"].append(gap)
    print(f"\nspan per step {span / 1e3 / steps:.3f} ms: kernels {busy / 1e3 / steps:.3f} ms, idle between them "
          f"{(span - busy) / 1e3 / steps:.3f} ms (less where kernels overlap)")
    print(f"\n{'idle µs/step':>12} {'per step':>8} {'median µs':>9}  between")
    totals = {k: sum(v) for k, v in gaps.items()}
    for k in sorted(totals, key=totals.get, reverse=True)[:top]:
        v = gaps[k]
        print(f"{totals[k] / steps:12.2f} {len(v) / steps:8.1f} {statistics.median(v):9.2f}  {k}")
    return totals


def host_events(trace: dict, device_pids: set, window: tuple, steps: int = 1, top: int = 12) -> dict:
    """What the host's threads did while the device ran: their complete events (not the device's) that lie inside
    window = (start, end) µs, totalled by name (nested events each count: an executable's run, its thunks, their
    launches), with the count per step and the median duration. Prints the table; returns {name: µs in all}."""
    start, end = window
    by_name = collections.defaultdict(list)
    for e in trace.get("traceEvents", []):
        if (e.get("ph") == "X" and e.get("pid") not in device_pids and "dur" in e
                and e["ts"] >= start and e["ts"] + e["dur"] <= end):
            by_name[str(e.get("name", "?"))].append(e["dur"])
    if not by_name:
        return {}
    totals = {k: sum(v) for k, v in by_name.items()}
    print(f"\nhost threads over the same span\n{'µs/step':>10} {'per step':>8} {'median µs':>9}  event")
    for k in sorted(totals, key=totals.get, reverse=True)[:top]:
        v = by_name[k]
        print(f"{totals[k] / steps:10.2f} {len(v) / steps:8.1f} {statistics.median(v):9.2f}  {k[:100]}")
    return totals


def profile(fn, trace_dir: str, *, sync, steps: int = 1, top: int = 30) -> dict:
    """Runs fn() `steps` times under the profiler (fn should be warm: compiled once already) and summarises."""
    import jax
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            out = fn()
        sync(out)
    return summarize(trace_dir, top, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (per-step figures)")
    parser.add_argument("--module", default=None, help="only kernels of XLA modules whose name contains this")
    args = parser.parse_args()
    summarize(args.trace_dir, args.top, args.steps, args.module)


if __name__ == "__main__":
    main()
