"""Block reconstruction on a slice of MobileNetV2: which AdaRound variant generalises from the calibration photos
to held-out ones (issue #15). The slice's blocks are quantized on their full-precision inputs from the 128
packaged calibration photos, and the slice's relative output error, Σ(y_q - y)² / Σ y², is measured on those
photos ("train") and on 505 views of the 101 held-out photos ("heldout"):

    python bench/cnn_recon_forward.py                       # blocks 14-16, W4, writes results/cnn_recon_forward.json
    python bench/cnn_recon_forward.py --blocks 1:3 --configs fast soft-position-2000
    python bench/cnn_recon_forward.py --configs soft-position-2000+qdrop0.5 --calib-views 4

    fast                    the search alone (round to nearest)
    hard|soft-sample|position-ITERS
                            block reconstruction with the straight-through (hard) or the annealed soft forward,
                            the loss summed over a sample's outputs or per position (BRECQ's), ITERS iterations;
                            +qdropP: QDrop input mixing with probability P
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_json  # noqa: E402

import logart  # noqa: E402
from logart.allocator import keep_freed_memory  # noqa: E402
from logart.data.images import load_images, views  # noqa: E402
from logart.models.cnn import CNN, fold_batchnorm  # noqa: E402
from logart.models.vision import load_vision_model  # noqa: E402
from logart.vision_pipeline import vision_recipe  # noqa: E402

CONFIGS = ["fast", "hard-sample-100", "hard-sample-2000", "hard-position-2000", "soft-sample-2000",
           "soft-position-2000", "soft-position-100"]


def recipe_of(config: str, bits: int):
    """`fast`, or FORWARD-REDUCE-ITERS with optional +qdropP (QDrop input mixing with probability P)."""
    if config == "fast":
        return vision_recipe("logart-fast", bits=bits)
    base, *extras = config.split("+")
    forward, reduce, iters = base.split("-")
    options = {"qdrop": float(e[len("qdrop"):]) for e in extras if e.startswith("qdrop")}
    return vision_recipe("logart", bits=bits, recon_iters=int(iters), recon_forward=forward, recon_reduce=reduce,
                         **options)


def relative_error(model, x, y) -> float:
    with torch.no_grad():
        out = model(x.contiguous(memory_format=torch.channels_last))
    return float((out - y).pow(2).sum() / y.pow(2).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="14:17", help="the slice of MobileNetV2's `features`, LO:HI")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--calib-views", type=int, default=1, help="views of each calibration photo (1: centre only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cnn_recon_forward.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_freed_memory()
    lo, hi = (int(v) for v in args.blocks.split(":"))
    vm = load_vision_model("mobilenetv2", log=None)
    fold_batchnorm(vm.model, torch.zeros(1, 3, 224, 224))
    calib = load_images("photos", vm.preprocess, limit=128) if args.calib_views == 1 else \
        views("photos", vm.preprocess, per_image=args.calib_views, seed=1, limit=128)
    held_out = views("photos-eval", vm.preprocess, per_image=5, seed=0)
    part = torch.nn.Sequential(*vm.model.features[lo:hi]).eval()
    with torch.no_grad():
        xc, xh = vm.model.features[:lo](calib), vm.model.features[:lo](held_out)
        yc, yh = part(xc), part(xh)
    rows = []
    for config in args.configs:
        model, t0 = copy.deepcopy(part), time.perf_counter()
        recipe = recipe_of(config, args.bits)
        logart.quantize(model, recipe, xc, progress=False, log=None, adapter=CNN(example=xc[:2]))
        rows.append({"config": config, "blocks": args.blocks, "bits": args.bits, "calib_inputs": xc.shape[0],
                     "train": relative_error(model, xc, yc), "heldout": relative_error(model, xh, yh),
                     "seconds": round(time.perf_counter() - t0, 1), "recipe": recipe.to_dict()})
        print(f"{config:20s} train {rows[-1]['train']:.5f}  held-out {rows[-1]['heldout']:.5f}  "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
        write_json(Path(args.out), {"environment": environment(), "command": " ".join(sys.argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
