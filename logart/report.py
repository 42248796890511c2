"""Result records: every run appends one row to results.csv and writes report.json next to its output.

A row carries the full recipe, the versions and the measurements, so any number can be reproduced from it.
"""

from __future__ import annotations

import csv
import json
import platform
import resource
from datetime import datetime, timezone
from pathlib import Path

import torch

from logart.atomic import write_file


def versions() -> dict:
    import transformers

    from logart.version import __version__
    return {"logart": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def results_csv(results=None, output=None) -> Path:
    """Where a run's results row goes: `results` when given, else results.csv beside the output folder (or
    in the working folder when the run saves nothing)."""
    if results:
        return Path(results)
    return (Path(output).parent if output else Path(".")) / "results.csv"


def append_csv(path, row: dict) -> None:
    """Append `row` (nested dicts flattened) to a CSV; a header with new columns rewrites the file atomically."""
    path = Path(path)
    row = _flatten(row)
    rows, header = [], []
    if path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    new_cols = [k for k in row if k not in header]
    if path.is_file() and not new_cols:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=header).writerow(row)
        return
    header += new_cols

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            for r in rows + [row]:
                w.writerow(r)

    write_file(path, write)


def write_json(path, payload: dict) -> None:
    write_file(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, default=str)))
