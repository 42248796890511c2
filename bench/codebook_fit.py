"""How well each codebook fits a vision model's weights, before any data is used (issue #15): every conv and linear
layer (BatchNorm folded, per output channel) is fitted by the codebook's own parameter search with the weight
error as its score (uniform: the clipping scale; log codebooks: DBS x SFS, with ABS), and the relative squared
weight error Σ (W_q - W)² / Σ W² is summed over the network.

    python bench/codebook_fit.py                                   # MobileNetV2 and EfficientNet-Lite0, W4/W3/W2
    python bench/codebook_fit.py --models fashion-resnet --bits 3

Besides the totals, each row says on how many output channels LogART's mixed-base codebook (`log_dynamic`) fits
better than the asymmetric uniform grid. The weight error is not the layer-output error that the recipes search
on, nor what reconstruction ends with; it shows what each codebook can represent. Results:
bench/results/codebook_fit.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_json  # noqa: E402

from logart.models.vision import load_vision_model, vision_adapter  # noqa: E402
from logart.quant import QuantSpec, make_codebook  # noqa: E402
from logart.search.grid import search  # noqa: E402
from logart.vision_pipeline import VisionOptions, evaluation_images  # noqa: E402

METHODS = ("uniform", "log2", "log_sqrt2", "log_dynamic")


@torch.no_grad()
def layer_rows(name: str) -> list[torch.Tensor]:
    """The weight of every conv / linear of the BN-folded model as rows [out channels, fan-in]."""
    vm = load_vision_model(name, log=lambda *_: None)
    x, _ = evaluation_images(vm, VisionOptions(model=name, eval_views=1, eval_limit=2))
    vision_adapter(name, x[:2]).prepare(vm.model.eval())
    return [m.weight.detach().float().reshape(m.weight.shape[0], -1) for m in vm.model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


@torch.no_grad()
def fit_errors(layers, method: str, bits: int) -> torch.Tensor:
    """Per output channel of every layer (concatenated), the searched codebook's squared weight error."""
    cb = make_codebook(QuantSpec(method, bits, -1, symmetric=False))
    return torch.cat([search(cb, cb.rows(w)).score for w in layers])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenetv2", "efficientnet-lite0"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "codebook_fit.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for model in args.models:
        layers = layer_rows(model)
        energy = float(sum(float(w.pow(2).sum()) for w in layers))
        for bits in args.bits:
            errors = {m: fit_errors(layers, m, bits) for m in METHODS}
            row = {"model": model, "bits": bits, "layers": len(layers), "channels": int(errors["uniform"].numel()),
                   "relative_error": {m: float(e.sum()) / energy for m, e in errors.items()},
                   "log_dynamic_better_channels": float((errors["log_dynamic"] < errors["uniform"]).float().mean())}
            rows.append(row)
            fits = ", ".join(f"{m} {v:.5f}" for m, v in row["relative_error"].items())
            print(f"{model} W{bits}: relative weight error {fits}; log_dynamic fits better than uniform on "
                  f"{100 * row['log_dynamic_better_channels']:.1f} % of {row['channels']} channels", flush=True)
    write_json(args.out, {"environment": environment(),
                          "command": " ".join(["bench/codebook_fit.py", *sys.argv[1:]]),
                          "rows": rows, "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
