"""Small helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    """Progress to stderr, so stdout keeps only the result table."""
    print(msg, file=sys.stderr, flush=True)


def finish(out: dict[str, Any], path: str | Path, scratch: str | Path | None = None) -> int:
    """Write a benchmark's result JSON (with its Markdown `table`), print the table, remove the
    scratch folder; returns the exit status 0."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(out["table"])
    log(f"wrote {path}")
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
