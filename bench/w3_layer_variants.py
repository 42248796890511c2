"""Layer-level W3 screens on real SmolLM2 layers: how much a table or grid variant lowers the H-weighted error
after round-to-nearest and after GPTQ (act-order), before spending a full-protocol run on it.

    python bench/w3_layer_variants.py abs log2          # asymmetric vs symmetric vs per-row choice (S vs SA)
    python bench/w3_layer_variants.py abs log_dynamic   # the same for DBS
    python bench/w3_layer_variants.py scale log_dynamic # SFS grid s <= 1 vs s up to 1.41
    python bench/w3_layer_variants.py dbs log_dynamic   # DBS at s = 1, symmetric (the L + D pair) vs pure log2

H from 4 calibration windows (news, seed 0) of the full-precision model; blocks 0/5/15/25/29 (inputs propagated
through the full-precision blocks). Prints one line per layer and writes the totals to
bench/results/w3_layer_variants-<variant>-<method>.json. One thread; a few minutes on a quiet machine.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from logart.calib.stats import block_hessians, propagate
from logart.data.sets import calibration_set
from logart.models import load_causal_lm
from logart.models.hf_causal import HFCausalLM
from logart.quant import QuantSpec, make_codebook
from logart.rounding import gptq, hessian_loss, rtn
from logart.search import HessianScore, default_k_values, default_s_values, search
from logart.search.per_row import per_row_best

BLOCKS = (0, 5, 15, 25, 29)


def candidates(variant: str, method: str, W, H):
    """{name: (codebook, params)} of the variants compared on one layer; the first is the baseline."""
    dbs = method == "log_dynamic"
    asym = make_codebook(QuantSpec(method=method, bits=3))
    score = HessianScore(H)
    ks = default_k_values(asym, dbs)
    base = search(asym, asym.rows(W), score, ks, default_s_values(asym, True))
    if variant == "dbs":  # the ablation's L + D pair: s = 1, symmetric, k per row by the search score or k = L
        sym = make_codebook(QuantSpec(method="log_dynamic", bits=3, symmetric=True))
        one, rows = torch.tensor([1.0]), sym.rows(W)
        return {"log2": (sym, search(sym, rows, score, [sym.L], one).params),
                "dbs": (sym, search(sym, rows, score, default_k_values(sym, True), one).params)}
    if variant == "abs":
        sym = make_codebook(replace(asym.spec, symmetric=True))
        other = search(sym, sym.rows(W), score, ks, default_s_values(sym, True))
        mixed, _ = per_row_best([base, other])
        return {"asym": (asym, base.params), "sym": (asym, other.params), "per_row": (asym, mixed.params)}
    wide = torch.cat([torch.arange(1.41, 1.0, -0.01), default_s_values(asym, True)])
    return {"s<=1": (asym, base.params), "s<=1.41": (asym, search(asym, asym.rows(W), score, ks, wide).params)}


def main():
    variant, method = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    model, tok = load_causal_lm("smollm2-135m")
    adapter = HFCausalLM()
    plan = adapter.plan(model)
    captured = adapter.capture(model, plan[0], calibration_set(tok, "news", nsamples=4, seqlen=2048, seed=0))
    x, totals = captured.hidden, {}
    for b, block in enumerate(plan):
        if b > max(BLOCKS):
            break
        run = lambda inputs, block=block: adapter.run(block, inputs, captured.kwargs)  # noqa: E731
        sites = {s.name[len(block.name) + 1:]: s for s in block.sites}
        if b in BLOCKS:
            hessians = block_hessians(run, sites, x)
            for name, site in sites.items():
                H, dead = hessians[name].finalize()
                W = site.matrix()
                W[:, dead] = 0
                line = []
                for tag, (cb, p) in candidates(variant, method, W, H).items():
                    for how, w_hat in (("rtn", rtn(W, cb, p).weight), ("gptq", gptq(W, H, cb, p, act_order=True).weight)):
                        loss = hessian_loss(w_hat - W, H)
                        totals[f"{tag} {how}"] = totals.get(f"{tag} {how}", 0.0) + loss
                        line.append(f"{tag} {how} {loss:.4g}")
                print(f"block {b} {name:18s} " + "  ".join(line), flush=True)
        x = propagate(run, x)
    first = next(iter(totals)).split()[0]
    ratios = {k: v / totals[f"{first} {k.split()[1]}"] for k, v in totals.items()}
    print("totals", totals, "\nrelative to", first, ratios)
    out = Path(__file__).parent / "results" / f"w3_layer_variants-{variant}-{method}.json"
    out.write_text(json.dumps({"variant": variant, "method": method, "blocks": BLOCKS, "totals": totals,
                               "relative": ratios}, indent=2))


if __name__ == "__main__":
    main()
