"""Training metrics: metrics.jsonl, TensorBoard event files, and PNG plots of loss curves and expert load.

`python -m dsv2_jax.metrics WORKDIR` renders WORKDIR/loss.png and WORKDIR/expert_load.png from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and scalars to TensorBoard (WORKDIR/tb)."""

    def __init__(self, workdir: str, enabled: bool = True, after_step: int | None = None):
        """after_step: the step a resumed run starts after; records of later steps (logged by a run that went on
        past its last checkpoint) are dropped, so each step is in the file once."""
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled and after_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= after_step]
            if len(kept) != len(lines):
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # TensorBoard files are optional
                self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {workdir!r}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(workdir: str, out_dir: str | None = None) -> list[str]:
    """Loss curves (train, eval, balance losses) and a heat map of the last logged per-layer expert load."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    out_dir = out_dir or workdir
    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    train = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    for key in ("expert_balance", "device_balance", "comm_balance"):
        points = [r for r in train if r.get(key)]
        if points:
            ax.plot([r["step"] for r in points], [r[key] for r in points], label=key, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    loads = [r for r in records if r.get("expert_load")]
    if loads:
        last = loads[-1]
        load = np.asarray(last["expert_load"])
        fig, ax = plt.subplots(figsize=(max(6, load.shape[1] * 0.12 + 3), max(3, load.shape[0] * 0.25 + 1.5)))
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_yticks(range(load.shape[0]))
        if load.shape[1] <= 64:
            ax.set_xticks(range(0, load.shape[1], max(1, load.shape[1] // 16)))
        ax.set_xlabel("routed expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"share of routed token copies per expert, step {last['step']} "
                     f"(uniform = {1 / load.shape[1]:.3f})")
        fig.colorbar(im, ax=ax)
        path = os.path.join(out_dir, "expert_load.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render loss curves and the expert-load heat map of a training "
                                                 "run to PNG files.")
    parser.add_argument("workdir", help="a train.py workdir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="folder for the PNG files (default: the workdir)")
    args = parser.parse_args(argv)
    for path in plot(args.workdir, args.out):
        print(path)


if __name__ == "__main__":
    main()
