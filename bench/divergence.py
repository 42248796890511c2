"""Where two runs of the same recipe part ways: compare the per-layer records of two report.json files.

    python bench/divergence.py RUN_A/report.json RUN_B/report.json [--out F.json]

Prints the first layer whose choices (k histogram, s range) or losses differ, the relative loss difference at
the first and at the last layer, and how many layers differ at all. Used to locate the spread between runs that
differ only in thread count or BLAS path (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(a: dict, b: dict) -> dict:
    la, lb = a["layers"], b["layers"]
    rows, first = [], None
    for ra, rb in zip(la, lb):
        same_choice = ra["k_hist"] == rb["k_hist"] and ra["s_range"] == rb["s_range"]
        rel_before = abs(ra["loss_before"] - rb["loss_before"]) / max(abs(ra["loss_before"]), 1e-30)
        rel_after = abs(ra["loss_after"] - rb["loss_after"]) / max(abs(ra["loss_after"]), 1e-30)
        row = {"name": ra["name"], "same_choice": same_choice, "rel_loss_before": rel_before,
               "rel_loss_after": rel_after}
        rows.append(row)
        if first is None and (not same_choice or rel_after > 0 or rel_before > 0):
            first = row
    return {"ppl": [a.get("ppl"), b.get("ppl")], "threads": [a.get("versions", {}).get("threads"),
                                                             b.get("versions", {}).get("threads")],
            "layers": len(rows), "layers_with_other_choices": sum(not r["same_choice"] for r in rows),
            "layers_with_other_losses": sum(r["rel_loss_after"] > 0 for r in rows),
            "first_difference": first, "last": rows[-1] if rows else None,
            "median_rel_loss_after": sorted(r["rel_loss_after"] for r in rows)[len(rows) // 2] if rows else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    print(json.dumps(result, indent=1))
    if args.out:
        from logart.report import write_json
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
