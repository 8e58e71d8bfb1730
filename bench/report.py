"""What the benchmark scripts share: their result rows, printed and appended to a file as JSON lines."""

from __future__ import annotations

import json


def emit(row: dict, out: str | None = None) -> None:
    """Prints a result row as one JSON line and, with `out`, appends the same line to that file."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")
