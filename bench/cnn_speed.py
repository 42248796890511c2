"""CNN block-reconstruction speed (issue #15): seconds per reconstruction iteration over all of MobileNetV2's
blocks (batch 32, 2 threads), for the memory layout and allocator settings side by side, each variant in its own
process (the allocator setting cannot be undone inside one):

    python bench/cnn_speed.py                 # 3 variants x 20 iterations, writes bench/results/cnn_speed.json

    nchw, glibc defaults            the layout and allocator before the ninth session
    channels-last, glibc defaults
    channels-last, keep freed memory   what `logart quantize --model mobilenetv2` does now

The figure is the time spent in the reconstruction loops divided by the iterations per block; the search, the
input captures and the evaluation are left out. 2000 iterations (the original recipe) cost 2000 times it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_json  # noqa: E402

VARIANTS = {"nchw, glibc defaults": ("nchw", False), "channels-last, glibc defaults": ("channels_last", False),
            "channels-last, keep freed memory": ("channels_last", True)}


def measure(layout: str, keep: bool, iters: int, nsamples: int, threads: int) -> dict:
    """One variant, in this process."""
    import torch

    import logart
    import logart.calib.reconstruct as reconstruct
    from logart.allocator import keep_freed_memory
    from logart.models.cnn import CNN
    from logart.models.vision import load_vision_model
    from logart.vision_pipeline import VisionOptions, calibration_images, vision_recipe

    if keep:
        keep_freed_memory()
    torch.set_num_threads(threads)
    vm = load_vision_model("mobilenetv2", log=None)
    x = calibration_images(vm, VisionOptions(model="mobilenetv2", nsamples=nsamples))
    spent = []
    loop = reconstruct.BlockReconstruction._steps

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return loop(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    reconstruct.BlockReconstruction._steps = timed
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    logart.quantize(vm.model, vision_recipe("logart", bits=4, recon_iters=iters), x, progress=False, log=None,
                    adapter=CNN(example=x[:2], memory_format=fmt))
    return {"blocks": len(spent), "seconds_per_iteration": round(sum(spent) / iters, 4),
            "block_seconds": [round(s, 2) for s in spent]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("LAYOUT", "KEEP"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cnn_speed.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "1", args.iters, args.nsamples, args.threads)))
        return 0
    rows = []
    for name, (layout, keep) in VARIANTS.items():
        out = subprocess.run([sys.executable, __file__, "--one", layout, "1" if keep else "0", "--iters",
                              str(args.iters), "--nsamples", str(args.nsamples), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(f"{name}: {rows[-1]['seconds_per_iteration']} s per iteration over {rows[-1]['blocks']} blocks",
              flush=True)
    base = rows[0]["seconds_per_iteration"]
    for r in rows:
        r["speedup"] = round(base / r["seconds_per_iteration"], 2)
        r["full_recipe_reconstruction_minutes"] = round(2000 * r["seconds_per_iteration"] / 60, 1)
    write_json(Path(args.out), {"environment": environment(), "command": " ".join(sys.argv), "iters": args.iters,
                                "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
