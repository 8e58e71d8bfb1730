"""What the benchmark scripts share: their result rows, printed and appended to a file as JSON lines, and the GPU's
clocks and power while a timed region runs."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess

import numpy as np

# nvidia-smi's clocks_throttle_reasons.active (clocks_event_reasons on newer drivers) bits: the driver's power cap,
# and the slowdowns for heat or by the hardware (HW slowdown, SW thermal, HW thermal, HW power brake)
SW_POWER_CAP = 0x4
SLOWDOWNS = 0x8 | 0x20 | 0x40 | 0x80
GPU_QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def emit(row: dict, out: str | None = None) -> None:
    """Prints a result row as one JSON line and, with `out`, appends the same line to that file."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


def gpu_summary(text: str) -> dict:
    """nvidia-smi's samples of GPU_QUERY (`--format=csv,noheader,nounits` lines: MHz, W, reasons in hex) -> the median
    SM clock and power draw, the share of samples in which the driver held the clocks at its power cap, and the
    share slowed down for heat or by the hardware. Lines that do not parse ("[N/A]" fields) are skipped; {} if none
    does. Read the cap's share with the clock: the driver also sets that reason when it trims the clock only a little
    (an H200 just after a loaded stretch: the reason in every sample at 1,965 of 1,980 MHz)."""
    rows = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        try:
            rows.append((float(fields[0]), float(fields[1]), int(fields[2], 16)))
        except (ValueError, IndexError):
            continue
    if not rows:
        return {}
    clocks, power, reasons = (np.array(column) for column in zip(*rows))
    return {"sm_clock_mhz": float(np.median(clocks)), "power_w": float(np.median(power)),
            "power_capped": float(np.mean(reasons & SW_POWER_CAP > 0)),
            "slowed_down": float(np.mean(reasons & SLOWDOWNS > 0)), "gpu_samples": len(rows)}


@contextlib.contextmanager
def gpu_clocks(interval_ms: int = 100):
    """Samples every GPU's SM clock, power draw and clock-limiting reasons with nvidia-smi while the block runs.
    Yields a dict that afterwards holds `gpu_summary`'s figures; it stays empty where nvidia-smi is not installed or
    printed nothing (a block shorter than one sample)."""
    found: dict = {}
    exe = shutil.which("nvidia-smi")
    proc = None if exe is None else subprocess.Popen(
        [exe, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits", "-lms", str(interval_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield found
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # its loop's own stop (Ctrl-C): what it printed is flushed
            try:
                out = proc.communicate(timeout=10)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                out = proc.communicate()[0]
            found.update(gpu_summary(out))


def gpu_text(row: dict) -> str:
    """The row's GPU figures for a printed summary line ("" without them)."""
    if "sm_clock_mhz" not in row:
        return ""
    return (f"  SM {row['sm_clock_mhz']:.0f} MHz  {row['power_w']:.0f} W  power-capped "
            f"{100 * row['power_capped']:.0f}% of samples")
