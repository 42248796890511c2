"""Time fake_quant and encode of a 4096x4096 weight, per-channel log_dynamic 4-bit (issue: foundation).

    python bench/codebook_speed.py [--out bench/results/codebook_speed.json]

Reports the median of 5 runs for each (method, mode) with the base split fixed (k = 4, s = 0.9: one search
candidate) and with the data-free default (k chosen per row by weight error over all 5 splits)."""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import environment, median_time, write_json  # noqa: E402

from logart.quant import QuantSpec, make_codebook  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/codebook_speed.json")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size) * 0.02
    rows = []
    for method, mode in [("log_dynamic", "strict"), ("log_dynamic", "reference"), ("uniform", "strict")]:
        cb = make_codebook(QuantSpec(method, 4, mode=mode))
        choice = {"s": 0.9} if method == "uniform" else {"k": 4, "s": 0.9}
        p = cb.fit(w, **choice)
        for op, fn in [("fake_quant", lambda: cb.fake_quant(w, p)), ("encode", lambda: cb.encode(w, p)),
                       ("fit+fake_quant", lambda: cb.fake_quant(w, cb.fit(w, **choice)))]:
            med, times = median_time(fn)
            rows.append({"method": method, "mode": mode, "op": op, "choice": choice, "median_s": round(med, 4),
                         "times_s": [round(t, 4) for t in times]})
            print(f"{method:12s} {mode:9s} {op:16s} {med:7.3f} s")
        if method != "uniform":
            med, _ = median_time(lambda: cb.fake_quant(w), repeats=3)
            rows.append({"method": method, "mode": mode, "op": "fake_quant, data-free k (5 splits)",
                         "median_s": round(med, 4)})
            print(f"{method:12s} {mode:9s} {'data-free k':16s} {med:7.3f} s")
    write_json(args.out, {"benchmark": "codebook_speed", "shape": [args.size, args.size], "bits": 4,
                          "group_size": -1, "env": environment(), "rows": rows})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
