"""The larger-than-memory path on SmolLM2-135M: the same recipe quantized in memory and streamed block by block
under a weight budget below the fp32 model's size; the two checkpoints must be identical, tensor for tensor.

    python bench/streaming.py [--budget 256MB] [--recipe logart-fast] [--bits 4] [--work runs/streaming]
                              [--out bench/results/streaming.json]

Steps, each its own process so that each peak RSS (ru_maxrss, from report.json) belongs to one run only
(`peak_rss_quant_gb`: loading + quantizing; `peak_rss_gb`: the whole run, evaluation included):
  1. `logart convert smollm2-135m WORK/smollm2 --shard-size 50MB`  (once; loads the whole model)
  2. `logart quantize --model WORK/smollm2 ...`                       (in memory)
  3. `logart quantize --model WORK/smollm2 ... --max-memory BUDGET`   (streamed)
Calibration: `--nsamples` x 2048 news tokens, seed 0 (PROTOCOL.md: 32); evaluation: `--eval-windows` Wikipedia
windows (4 by default: the point here is memory and identity, not the headline perplexity).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402

LOGART = [sys.executable, "-m", "logart.cli"]


def run(cmd: list) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="256MB")
    ap.add_argument("--recipe", default="logart-fast")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (PROTOCOL.md: 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/streaming")
    ap.add_argument("--out", default="bench/results/streaming.json")
    args = ap.parse_args()
    work = Path(args.work)
    folder = work / "smollm2"
    if not (folder / "config.json").is_file():
        run([*LOGART, "convert", "smollm2-135m", folder, "--shard-size", "50MB"])
    fp32_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    common = ["--model", folder, "--recipe", args.recipe, "--bits", args.bits, "--eval-windows", args.eval_windows,
              "--nsamples", args.nsamples,
              "--threads", args.threads, "--quiet", "--results", work / "results.csv"]
    runs = {"in_memory": [], "streamed": ["--max-memory", args.budget]}
    reports = {}
    for name, extra in runs.items():
        out = work / name
        if not (out / "report.json").is_file():
            run([*LOGART, "quantize", *common, "--output", out, *extra])
        reports[name] = json.loads((out / "report.json").read_text())
    a = load_file(str(work / "in_memory" / "model.safetensors"))
    b = load_file(str(work / "streamed" / "model.safetensors"))
    differing = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    result = {
        "env": environment(), "recipe": args.recipe, "bits": args.bits, "budget": args.budget,
        "nsamples": args.nsamples, "eval_windows": args.eval_windows,
        "fp32_checkpoint_mib": round(fp32_bytes / 2**20, 1),
        "identical_checkpoints": not differing, "differing_tensors": differing[:10], "tensors": len(a),
        **{name: {k: r.get(k) for k in ("ppl", "quant_seconds", "peak_rss_quant_gb", "peak_rss_gb",
                                                    "checkpoint_mb", "streaming")}
           for name, r in reports.items()},
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
