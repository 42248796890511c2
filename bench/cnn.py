"""CNN benchmark (issue #15): LogART against uniform RTN and uniform BRECQ, in one run, same data, same iterations.

    python bench/cnn.py                       # Fashion-MNIST: fashion-resnet and fashion-mobilenet, W4/W3/W2
    python bench/cnn.py --models mobilenetv2 --nsamples 128 --iters 200   # ImageNet weights, fidelity on photos

Fashion-MNIST rows carry top-1 on the 10 k test images and the drop from fp32; ImageNet rows carry top-1
agreement with fp32 and KL(fp32 ‖ quantized) over the views of the held-out photos. The targets of issue #15 are
checked and written beside the rows (bench/results/cnn.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_json  # noqa: E402

from logart.vision_pipeline import CACHE_DTYPES, VisionOptions, run_vision, vision_recipe  # noqa: E402

# (model, bits) -> the largest accepted top-1 drop of logart, in points (issue #15)
DROP_TARGETS = {("fashion-resnet", 4): 0.3, ("fashion-resnet", 3): 1.0, ("fashion-resnet", 2): 3.0,
                ("fashion-mobilenet", 4): 0.5, ("fashion-mobilenet", 3): 2.0}


def checks(rows: list[dict]) -> list[dict]:
    """The acceptance lines of issue #15 that these rows can decide."""
    out = []
    for r in rows:
        if r.get("act_bits") == 4 and r["bits"] == 4 and r["recipe_name"] == "logart" and "top1" in r:
            drop = round(r["top1_fp32"] - r["top1"], 3)
            out.append({"check": f"{r['model']} W4A4 logart drop <= 2.0", "value": drop, "pass": drop <= 2.0})
    by = {(r["model"], r["bits"], r["recipe_name"]): r for r in rows if not r.get("act_bits")}
    for (model, bits), limit in DROP_TARGETS.items():
        r = by.get((model, bits, "logart"))
        if r is not None and "top1" in r:
            drop = round(r["top1_fp32"] - r["top1"], 3)
            out.append({"check": f"{model} W{bits} logart drop <= {limit}", "value": drop, "pass": drop <= limit})
    for (model, bits, name), r in by.items():
        if name != "logart" or bits > 3:
            continue
        for base in ("rtn", "brecq"):
            b = by.get((model, bits, base))
            if b is None:
                continue
            key = "top1" if "top1" in r else "agreement"
            out.append({"check": f"{model} W{bits} logart {key} > {base}", "value": [r[key], b[key]],
                        "pass": r[key] > b[key]})
    for (model, bits, name), r in by.items():
        if name == "logart" and bits == 4 and "top1" not in r:
            out.append({"check": f"{model} W4 logart agreement >= 95 % over >= 500 views",
                        "value": [r["agreement"], r["eval_inputs"]],
                        "pass": r["agreement"] >= 95 and r["eval_inputs"] >= 500})
    return out


def _option(kv: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as a number where it is one, true / false as a bool."""
    key, _, value = kv.partition("=")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fashion-resnet", "fashion-mobilenet"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--recipes", nargs="+", default=["rtn", "brecq", "logart"])
    ap.add_argument("--iters", type=int, default=2000, help="reconstruction iterations per block (brecq, logart)")
    ap.add_argument("--nsamples", type=int, default=1024, help="calibration images")
    ap.add_argument("--eval-views", type=int, default=5)
    ap.add_argument("--calib-views", type=int, default=1, help="views of each calibration photo")
    ap.add_argument("--first-last-bits", type=int, help="keep the first conv and the last linear at these bits "
                    "(BRECQ: 8); default: quantized like the rest (the original)")
    ap.add_argument("--cache-dtype", choices=list(CACHE_DTYPES), default="float32",
                    help="precision of the cached block inputs (float16: half the memory)")
    ap.add_argument("--act-bits", type=int, nargs="*", default=[],
                    help="also run every recipe with activations at these bits (e.g. 4: W4A4)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe options for every recipe of the run, e.g. score=output or recon_forward=hard")
    ap.add_argument("--seed", type=int, default=0, help="calibration sample and reconstruction seed (the "
                    "evaluation views stay the same)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cnn.json"))
    args = ap.parse_args()
    extra = dict(_option(kv) for kv in args.set)
    rows, t0 = [], time.perf_counter()
    for model in args.models:
        for bits, act_bits in [(b, None) for b in args.bits] + [(b, a) for b in args.bits for a in args.act_bits]:
            for name in args.recipes:
                options = {**({"recon_iters": args.iters} if name in ("brecq", "logart") else {}), "seed": args.seed,
                           **extra}
                recipe = vision_recipe(name, bits=bits, act_bits=act_bits, **options)
                opts = VisionOptions(model=model, calib="photos", eval="photos-eval", nsamples=args.nsamples,
                                     eval_views=args.eval_views, calib_views=args.calib_views,
                                     cache_dtype=args.cache_dtype, first_last_bits=args.first_last_bits,
                                     threads=args.threads, seed=args.seed, progress=False,
                                     results=str(Path(args.out).with_suffix(".csv")), tag="bench-cnn")
                row = run_vision(recipe, opts)
                rows.append({"model": model, "bits": bits, "act_bits": act_bits, "recipe_name": name,
                             "command": " ".join(sys.argv),
                             **{k: row[k] for k in ("top1", "top1_fp32", "agreement", "kl", "eval_inputs",
                                                    "nsamples", "quant_seconds", "block_seconds", "peak_rss_gb",
                                                    "uniform_row_share")
                                if k in row}, "recipe": row["recipe"]})
                write_json(Path(args.out), {"environment": environment(), "rows": rows, "checks": checks(rows),
                                            "seconds": round(time.perf_counter() - t0, 1)})
    for c in checks(rows):
        print(("PASS " if c["pass"] else "FAIL ") + c["check"] + f": {c['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
