"""The full-precision reference row of the LLM tables: SmolLM2-135M fp32 perplexity under PROTOCOL.md."""

from __future__ import annotations

import argparse

import torch

from logart.data import eval_set
from logart.eval.perplexity import perplexity
from logart.models import load_causal_lm
from logart.report import append_csv, now, peak_rss_gb, versions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="bench/results/llm_ablation.csv")
    ap.add_argument("--tag", default="fp32")
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_causal_lm("smollm2-135m")
    windows = eval_set(tok, "wikipedia", seqlen=2048, max_windows=args.eval_windows)
    ppl = perplexity(model, windows)
    print(f"fp32 perplexity: {ppl:.3f}")
    append_csv(args.results, {"tag": args.tag, "date": now(), "model": "smollm2-135m", "recipe": {"name": "fp32"},
                              "ppl": ppl, "quant_seconds": 0, "peak_rss_gb": round(peak_rss_gb(), 3),
                              "versions": versions()})


if __name__ == "__main__":
    main()
