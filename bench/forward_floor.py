"""How fast can calibration be on this machine? A lower bound for any recipe that follows PROTOCOL.md.

    python bench/forward_floor.py [--threads 2]

The block-sequential driver runs every calibration window through every decoder block twice: once to gather
the statistics (unquantized block), once to recompute the outputs with the quantized weights (the next block's
inputs; the original LogART code does the same, spec §4.3). On SmolLM2-135M under PROTOCOL.md that is
32 windows x 2048 tokens x 30 blocks, twice. This script measures, on this machine:

- the fp32 matrix-multiply rate at the shapes of a block's linears (and bf16, which has no fast path on CPUs
  without AVX-512 BF16 or AMX), and
- the wall time of one real block forward on one 2048-token window,

and derives the time of the two passes: a floor under the quantization time of every calibrated recipe
(`logart-fast` included), before any search or rounding. Writes bench/results/forward_floor.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import median_time, now, versions, write_json  # noqa: E402

from logart.models import load_causal_lm  # noqa: E402
from logart.models.decoder import capture_block_inputs, decoder_layers, linear_layers, run_block  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "forward_floor.json"
WINDOWS, SEQLEN, PASSES = 32, 2048, 2


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of (m x k) @ (k x n) in `dtype`."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return 2 * m * k * n / median_time(lambda: torch.mm(a, b), repeats)[0] / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_causal_lm("smollm2-135m")
    blocks = decoder_layers(model)
    linears = linear_layers(blocks[0])
    shapes = [(SEQLEN, lin.in_features, lin.out_features) for lin in linears.values()]
    flops = sum(2 * m * k * n for m, k, n in shapes)  # one window through one block's linears
    fp32 = statistics.median(gemm_rate(*s, torch.float32) for s in shapes)
    bf16 = gemm_rate(*shapes[0], torch.bfloat16, repeats=1)
    captured = capture_block_inputs(model, torch.randint(0, model.config.vocab_size, (1, SEQLEN),
                                                         generator=torch.Generator().manual_seed(0)))
    block_s, _ = median_time(lambda: run_block(blocks[len(blocks) // 2], captured.hidden, captured.kwargs),
                             args.repeats)
    n = WINDOWS * len(blocks) * PASSES
    result = {
        "date": now(), "threads": args.threads, "versions": versions(),
        "protocol": {"windows": WINDOWS, "seqlen": SEQLEN, "blocks": len(blocks), "passes": PASSES},
        "linear_gflop_per_block_window": round(flops / 1e9, 3),
        "fp32_gemm_gflops": round(fp32, 1), "bf16_gemm_gflops": round(bf16, 2),
        "block_forward_seconds": round(block_s, 4),
        "floor_linears_only_seconds": round(n * flops / (fp32 * 1e9), 1),
        "floor_two_passes_seconds": round(n * block_s, 1),
    }
    write_json(OUT, result)
    for k, v in result.items():
        if k != "versions":
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
