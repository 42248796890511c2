"""Which layers of a vision model are sensitive to weight rounding (issue #15): each weight layer is rounded alone
(per output channel, round to nearest, BatchNorm folded first) and the model is measured against its fp32 self
on the held-out views; then every layer at once.

    python bench/cnn_sensitivity.py                               # MobileNetV2, uniform W8, 505 views
    python bench/cnn_sensitivity.py --method log_dynamic --bits 4 --top 10

The rows are sorted by KL(fp32 ‖ quantized), the worst first, and written to bench/results/cnn_sensitivity.json.
A layer that costs much at 8 bits bounds what any 4-bit recipe can reach on this measure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_json  # noqa: E402

from logart.eval.classify import logits, scores  # noqa: E402
from logart.models.vision import load_vision_model, vision_adapter  # noqa: E402
from logart.quant import QuantSpec, make_codebook  # noqa: E402
from logart.vision_pipeline import VisionOptions, evaluation_images  # noqa: E402


@torch.no_grad()
def rounded(weight: torch.Tensor, codebook) -> torch.Tensor:
    """The weight rounded to nearest per output channel, with the codebook's default (min/max) fit."""
    rows = weight.reshape(weight.shape[0], -1)
    return codebook.fake_quant_rows(rows, codebook.fit_rows(rows)).reshape(weight.shape)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--method", default="uniform", help="codebook: uniform, log2, log_sqrt2, log_dynamic")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--eval-views", type=int, default=5)
    ap.add_argument("--top", type=int, default=10, help="rows printed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cnn_sensitivity.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    vm = load_vision_model(args.model, log=print)
    x, _ = evaluation_images(vm, VisionOptions(model=args.model, eval_views=args.eval_views))
    model = vm.model.eval()
    reference = logits(model, x)
    vision_adapter(args.model, x[:2]).prepare(model)    # BatchNorm folded: the weights the recipes round
    codebook = make_codebook(QuantSpec(args.method, args.bits, -1))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    rows = []
    for name, module in tqdm(layers, desc="layers"):
        original = module.weight.detach().clone()
        module.weight.data.copy_(rounded(original, codebook))
        rows.append({"layer": name, "depthwise": getattr(module, "groups", 1) > 1,
                     "shape": list(original.shape), **scores(reference, logits(model, x))})
        module.weight.data.copy_(original)
    rows.sort(key=lambda r: -r["kl"])
    for _, module in layers:      # then every layer at once (the model is not needed unrounded any more)
        module.weight.data.copy_(rounded(module.weight, codebook))
    whole = scores(reference, logits(model, x))
    for r in rows[:args.top]:
        print(f"{r['layer']:<28} {'dw' if r['depthwise'] else '  '} agreement {r['agreement']:7.3f} KL {r['kl']:.5f}")
    print(f"every layer: agreement {whole['agreement']:.3f}, KL {whole['kl']:.5f}")
    write_json(args.out, {"environment": environment(), "command": " ".join(["bench/cnn_sensitivity.py", *sys.argv[1:]]),
                          "model": args.model, "method": args.method, "bits": args.bits,
                          "eval_inputs": int(x.shape[0]), "every_layer": whole, "layers": rows,
                          "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
