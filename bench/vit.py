"""ViT benchmark (issue #16), on the Fashion-MNIST ViT logart trains (`fashion-vit`), in one run per part:

    python bench/vit.py                  # every part below, one JSON each under bench/results/
    python bench/vit.py --parts main     # W4, W3 weight-only; W4A4, W3A3 (AdaLog on post-softmax / post-GELU)
    python bench/vit.py --parts softmax  # AdaLog Table A: all else W4A4, post-softmax at 4 / 3 / 2 bits with
                                         #   log2, log√2 and AdaLog
    python bench/vit.py --parts search   # AdaLog Table 5: W3A3 with FPCS, brute force and alternating search;
                                         #   the time is that of the activation quantizers' searches
    python bench/vit.py --parts objective  # the three searches on their own objective, site by site (W3A3)
    python bench/vit.py --parts deit     # DeiT-Tiny architecture (random weights, 224 x 224): W4A4 with 32
                                         #   calibration photos, wall time and peak memory

Top-1 is on the 10 k Fashion-MNIST test images; the drop is from the fp32 model of the same run. The checks of
issue #16 are written beside the rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_json  # noqa: E402

from logart.vision_pipeline import VisionOptions, run_vision, vision_recipe  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DROP_TARGETS = {(4, 4): 2.0, (3, 3): 6.0, (4, None): 0.5, (3, None): 1.5}   # (W, A) -> largest drop, points


def _run(args, model: str, recipe_name: str, bits: int, act_bits, tag: str, nsamples: int, **options) -> dict:
    if recipe_name == "logart" and args.iters is not None:
        options["recon_iters"] = args.iters
    recipe = vision_recipe(recipe_name, bits=bits, family="vit", act_bits=act_bits, **options)
    opts = VisionOptions(model=model, calib="photos", eval="photos-eval", nsamples=nsamples, seed=args.seed,
                         threads=args.threads, progress=False, tag=tag,
                         results=str(RESULTS / f"vit_{tag}.csv"))
    row = run_vision(recipe, opts)
    acts = row.get("activations", {})
    return {"model": model, "recipe_name": recipe_name, "bits": bits, "act_bits": act_bits,
            **{k: v for k, v in options.items()},
            **{k: row[k] for k in ("top1", "top1_fp32", "agreement", "kl", "eval_inputs", "nsamples",
                                   "quant_seconds", "peak_rss_gb") if k in row},
            "drop": round(row["top1_fp32"] - row["top1"], 3) if "top1" in row else None,
            "act_search_seconds": round(sum(r.get("seconds", 0) for r in acts.values()), 2),
            "pairs_scored": sum(r.get("scored", 0) for r in acts.values()),
            "command": " ".join(sys.argv), "recipe": row["recipe"]}


def main_part(args) -> tuple[list, list]:
    rows = [_run(args, "fashion-vit", name, w, a, "main", args.nsamples)
            for name in args.recipes for w, a in DROP_TARGETS]
    checks = [{"check": f"{r['recipe_name']} W{r['bits']}{'A' + str(r['act_bits']) if r['act_bits'] else ''} drop "
                        f"<= {DROP_TARGETS[(r['bits'], r['act_bits'])]}", "value": r["drop"],
               "pass": r["drop"] <= DROP_TARGETS[(r["bits"], r["act_bits"])]} for r in rows]
    return rows, checks


def softmax_part(args) -> tuple[list, list]:
    rows = [_run(args, "fashion-vit", "logart-fast", 4, 4, "softmax", args.nsamples, act_softmax=kind,
                 act_softmax_bits=bits) for bits in (4, 3, 2) for kind in ("log2", "logsqrt2", "adalog")]
    checks = []
    for bits in (3, 2):
        by = {r["act_softmax"]: r["top1"] for r in rows if r["act_softmax_bits"] == bits}
        checks.append({"check": f"post-softmax {bits} bits: adalog best", "value": by,
                       "pass": by["adalog"] > max(by["log2"], by["logsqrt2"])})
    return rows, checks


def search_part(args) -> tuple[list, list]:
    rows = [_run(args, "fashion-vit", "logart-fast", 3, 3, "search", args.nsamples, act_search=s)
            for s in args.strategies]
    by = {r["act_search"]: r for r in rows}
    f, b, a = by.get("fpcs"), by.get("brute"), by.get("alternating")
    checks = []
    if f and b:
        checks += [{"check": "W3A3 fpcs within 0.5 points of brute force", "value": [f["top1"], b["top1"]],
                    "pass": f["top1"] >= b["top1"] - 0.5},
                   {"check": "fpcs search time <= 1/5 of brute force", "value": [f["act_search_seconds"],
                                                                                 b["act_search_seconds"]],
                    "pass": f["act_search_seconds"] * 5 <= b["act_search_seconds"]}]
    if f and a:
        checks.append({"check": "W3A3 fpcs better than alternating", "value": [f["top1"], a["top1"]],
                       "pass": f["top1"] > a["top1"]})
    return rows, checks


def deit_part(args) -> tuple[list, list]:
    t0 = time.perf_counter()
    row = _run(args, "deit-tiny", args.deit_recipe, 4, 4, "deit", 32)
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return [row], [{"check": "deit-tiny W4A4, 32 images, <= 10 minutes", "value": row["quant_seconds"],
                    "pass": row["quant_seconds"] <= 600}]


def objective_part(args) -> tuple[list, list]:
    """The searches compared on what they optimise: every activation site of the fp32 network's 4 blocks (W3A3
    quantizers, the fp32 flow), each searched by all three strategies; relative layer-output error per site."""
    import torch

    from logart.calib.act_quantizers import GELU_SHIFT, AsymActQuantizer, LogActQuantizer
    from logart.calib.activations import _capture, _objective
    from logart.models.vision import load_vision_model
    from logart.models.vit import TimmViT
    from logart.vision_pipeline import calibration_images

    torch.set_num_threads(args.threads)
    vm = load_vision_model("fashion-vit", log=None)
    x = calibration_images(vm, VisionOptions(model="fashion-vit", nsamples=args.nsamples))
    adapter = TimmViT()
    adapter.prepare(vm.model)
    rows = []
    with torch.no_grad():
        h = vm.model._pos_embed(vm.model.patch_embed(x))
    for block in adapter.plan(vm.model)[1:-1]:
        seen = _capture(block.module, block.act_sites, h)
        for site in block.act_sites:
            sample, error = _objective(site, seen)
            base = error(torch.zeros_like(sample))
            row = {"site": site.name, "kind": site.kind, "command": " ".join(sys.argv)}
            for strategy in ("fpcs", "alternating", "brute"):
                q = (LogActQuantizer("adalog", 3, GELU_SHIFT if site.kind == "post-gelu" else 0.0)
                     if site.kind in ("post-softmax", "post-gelu") else AsymActQuantizer(3))
                t0 = time.perf_counter()
                fit = q.fit(sample, error, strategy)
                row[strategy] = {"relative_error": fit["score"] / base, "scored": fit["scored"],
                                 "seconds": round(time.perf_counter() - t0, 3)}
            rows.append(row)
        with torch.no_grad():
            h = block.module(h)
    total = {s: sum(r[s]["relative_error"] for r in rows) for s in ("fpcs", "alternating", "brute")}
    at_or_below = sum(r["fpcs"]["relative_error"] <= r["alternating"]["relative_error"] for r in rows)
    checks = [{"check": "fpcs objective at or below alternating's", "value": [at_or_below, len(rows), total],
               "pass": total["fpcs"] <= total["alternating"]}]
    return rows, checks


PARTS = {"main": main_part, "softmax": softmax_part, "search": search_part, "deit": deit_part, "objective": objective_part}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--recipes", nargs="+", default=["logart-fast", "logart"],
                    help="main part: recipes (logart-fast: AdaLog's search-only setting; logart: with block "
                         "reconstruction)")
    ap.add_argument("--iters", type=int, help="reconstruction iterations of the logart recipe (default: its 2000)")
    ap.add_argument("--nsamples", type=int, default=128, help="Fashion-MNIST calibration images")
    ap.add_argument("--deit-recipe", default="logart-fast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the calibration sample's seed")
    ap.add_argument("--strategies", nargs="+", default=["fpcs", "brute", "alternating"],
                    help="search part: the activation searches to compare")
    args = ap.parse_args()
    for part in args.parts:
        t0 = time.perf_counter()
        rows, checks = PARTS[part](args)
        name = f"vit_{part}" + (f"_seed{args.seed}" if args.seed else "")
        write_json(RESULTS / f"{name}.json", {"environment": environment(), "rows": rows, "checks": checks,
                                                  "seconds": round(time.perf_counter() - t0, 1)})
        for c in checks:
            print(("PASS " if c["pass"] else "FAIL ") + c["check"] + f": {c['value']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
