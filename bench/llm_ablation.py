"""The LogART ablation on SmolLM2-135M under PROTOCOL.md, with the baselines, in one table.

    python bench/llm_ablation.py --list                 # the rows
    python bench/llm_ablation.py --rows fp32 base D DS   # run some rows (each in its own process)
    python bench/llm_ablation.py --table                # merge every measured row into the table

Every row runs `logart quantize` in a fresh process (so its peak RSS is its own) and appends to
bench/results/llm_ablation.csv; --table writes bench/results/llm_ablation.json and prints a Markdown table.
The 16 ablation rows are W3 per channel, DBS/SFS/ABS/LLR on or off (spec §9.1); LLR rows are long, so the
script runs any subset and the table merges the latest measurement of each row.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV = HERE / "results" / "llm_ablation.csv"
JSON = HERE / "results" / "llm_ablation.json"


def ablation_rows() -> dict:
    rows = {}
    for dbs, sfs, abs_, llr in itertools.product([False, True], repeat=4):
        tag = "".join(n for n, on in (("D", dbs), ("S", sfs), ("A", abs_), ("L", llr)) if on) or "base"
        # --fp-target 0: the paper's components only (the `logart` preset now adds full-precision targets)
        rows[tag] = ["--recipe", "logart" if llr else "logart-fast", "--bits", "3", "--fp-target", "0",
                     "--dbs" if dbs else "--no-dbs", "--sfs" if sfs else "--no-sfs", "--abs" if abs_ else "--no-abs"]
    return rows


def baseline_rows() -> dict:
    rows = {"fp32": None}
    for bits, g in itertools.product([3, 4], [-1, 128]):
        tag = f"w{bits}_{'pc' if g == -1 else 'g128'}"
        for recipe in ("rtn", "gptq"):
            rows[f"{recipe}-{tag}"] = ["--recipe", recipe, "--bits", str(bits), "--group-size", str(g)]
        if (bits, g) != (3, -1):
            rows[f"logart-{tag}"] = ["--recipe", "logart", "--bits", str(bits), "--group-size", str(g),
                                     "--fp-target", "0"]  # as measured before full-precision targets were the default
    rows["logart-fast-w4_pc"] = ["--recipe", "logart-fast", "--bits", "4"]
    for bits, g in itertools.product([3, 4], [-1, 128]):  # the full recipe plus full-precision targets (alpha 0.25)
        tag = f"w{bits}_{'pc' if g == -1 else 'g128'}"
        rows[f"logart-{tag}-fp-target"] = ["--recipe", "logart", "--bits", str(bits), "--group-size", str(g),
                                            "--fp-target", "0.25"]
    rows["logart-w3_pc-attention"] = ["--recipe", "logart", "--bits", "3", "--attention-aware"]  # DSAL + spec §4.4
    # the two best W3 options together: attention-aware rounding and the target strength of the screen (RESULTS)
    rows["logart-w3_pc-attention-a0.5"] = ["--recipe", "logart", "--bits", "3", "--attention-aware",
                                           "--fp-target", "0.5"]
    # block reconstruction (BRECQ) after logart-fast's search and rounding, 100 iterations of one window per block
    rows["logart-fast-w3_pc-reconstruct"] = ["--recipe", "logart-fast", "--bits", "3", "--reconstruct", "block",
                                             "--recon-iters", "100"]
    rows["log2-rtn-w3_pc-reference"] = ["--recipe", "log2-rtn", "--bits", "3", "--mode", "reference"]
    rows["logart-fast-w3_pc-reference"] = ["--recipe", "logart-fast", "--bits", "3", "--mode", "reference",
                                           "--search", "exhaustive"]
    rows["logart-fast-w3_pc-reference-fast"] = ["--recipe", "logart-fast", "--bits", "3", "--mode", "reference"]
    return rows


ROWS = {**ablation_rows(), **baseline_rows()}


def run_row(name: str, extra: list[str]) -> int:
    if ROWS[name] is None:  # fp32: evaluate the model without quantizing
        cmd = [sys.executable, str(HERE / "fp32_ppl.py"), "--results", str(CSV), "--tag", name]
    else:
        cmd = [sys.executable, "-m", "logart.cli", "quantize", "--model", "smollm2-135m", *ROWS[name],
               "--results", str(CSV), "--tag", name, "--threads", "2", "--quiet", *extra]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def table() -> list[dict]:
    if not CSV.is_file():
        return []
    latest = {}
    for r in csv.DictReader(CSV.open()):
        latest[r.get("tag")] = r
    out = []
    for name in ROWS:
        r = latest.get(name)
        if r:
            out.append({"row": name, "ppl": float(r["ppl"]), "quant_seconds": float(r.get("quant_seconds") or 0),
                        "peak_rss_gb": float(r.get("peak_rss_gb") or 0), "date": r.get("date"),
                        "command": f"python bench/llm_ablation.py --rows {name}"})
    return out


def trend(rows: list[dict]) -> dict:
    """The paper's ablation trend: for every ablation row lacking one of D, S, A, L, adding it should lower
    perplexity. 32 pairs when all 16 rows are measured; pairs with a missing row are listed as unmeasured."""
    ppl = {r["row"]: r["ppl"] for r in rows}
    pairs, better, worse, missing = 0, [], [], []
    flags = "DSAL"
    for tag in ablation_rows():
        have = set("" if tag == "base" else tag)
        for f in flags:
            if f in have:
                continue
            more = "".join(x for x in flags if x in have | {f})
            pairs += 1
            if tag not in ppl or more not in ppl:
                missing.append(f"{tag} + {f}")
            elif ppl[more] < ppl[tag]:
                better.append(f"{tag} + {f}: {ppl[tag]:.2f} -> {ppl[more]:.2f}")
            else:
                worse.append(f"{tag} + {f}: {ppl[tag]:.2f} -> {ppl[more]:.2f}")
    return {"pairs": pairs, "lower": len(better), "not_lower": worse, "unmeasured": missing, "lowered": better}


# Issue #5's quality lines for the `logart` recipe (perplexity at most), and the goal below them.
FLOORS = {"w3_pc": 42.0, "w4_pc": 29.0, "w3_g128": 35.0, "w4_g128": 25.0}
GOALS = {"w3_pc": 35.0, "w4_pc": 24.0}


def targets(rows: list[dict]) -> list[dict]:
    """Each setting's `logart` rows (without full-precision targets, and with them: the preset's default) against
    its floor and goal. W3 per channel's row without targets is the ablation's DSAL."""
    ppl = {r["row"]: r["ppl"] for r in rows}
    out = []
    for setting, floor in FLOORS.items():
        plain = "DSAL" if setting == "w3_pc" else f"logart-{setting}"
        for variant, row in (("logart --fp-target 0", plain), ("logart (default)", f"logart-{setting}-fp-target")):
            if row in ppl:
                out.append({"setting": setting, "variant": variant, "row": row, "ppl": ppl[row], "floor": floor,
                            "meets_floor": ppl[row] <= floor, "goal": GOALS.get(setting),
                            "meets_goal": setting in GOALS and ppl[row] < GOALS[setting]})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=[])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra arguments for logart quantize")
    args = ap.parse_args()
    if args.list:
        for k, v in ROWS.items():
            print(f"{k:28s} {' '.join(v) if v else '(full precision)'}")
        return
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; see --list")
    for name in args.rows:
        if run_row(name, args.extra) != 0:
            print(f"row {name} failed", file=sys.stderr)
    if args.table or args.rows:
        rows = table()
        JSON.parent.mkdir(parents=True, exist_ok=True)
        t = trend(rows)
        q = targets(rows)
        JSON.write_text(json.dumps({"protocol": "shared/PROTOCOL.md", "rows": rows, "trend": t, "targets": q},
                                   indent=2))
        print("| row | ppl | quant s | peak RSS GB |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['row']} | {r['ppl']:.2f} | {r['quant_seconds']:.0f} | {r['peak_rss_gb']:.2f} |")
        print(f"\nablation trend: adding a component lowers perplexity in {t['lower']} of {t['pairs']} pairs "
              f"({len(t['unmeasured'])} not measured yet)")
        for line in t["not_lower"]:
            print(f"  not lower: {line}")
        print("\nquality lines (perplexity at most):")
        for r in q:
            goal = f", goal < {r['goal']:g}: {'met' if r['meets_goal'] else 'not met'}" if r["goal"] else ""
            print(f"  {r['setting']:8s} {r['variant']:24s} {r['ppl']:7.2f}  floor {r['floor']:g}: "
                  f"{'met' if r['meets_floor'] else 'NOT met'}{goal}")


if __name__ == "__main__":
    main()
