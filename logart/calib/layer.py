"""One weight site: statistics -> codebook parameters (search) -> codes (rounding) -> weights written back."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from logart.calib.record import LayerRecord
from logart.quant import UnionCodebook, make_codebook
from logart.quant.union import merge
from logart.quant.rows import padded_width
from logart.rounding import LLRConfig, QuadraticLoss, gptq, hessian_loss, learned_rounding, rtn
from logart.errors import LogartError
from logart.search import HessianScore, LayerOutputScore, WeightSSE, default_k_values, default_s_values, search
from logart.search.per_row import per_row_best


def _k_hist(result) -> dict:
    return {int(k): int(n) for k, n in result.k_hist.items()} if result.k_hist else {}


def _whole_groups(W: torch.Tensor, H, group_size: int):
    """Zero-pad the columns of W (and H) up to whole groups when the group size does not divide the input size
    (SmolLM2's 576 inputs in groups of 128). The padding columns are decoupled in H (identity block), stay at
    zero through every rounding, and are dropped again when the weight is written back (quant/rows.py pads the
    same way, so the packed layer sees the same groups)."""
    width = padded_width(W.shape[1], group_size)
    pad = width - W.shape[1]
    if not pad:
        return W, H
    W = torch.nn.functional.pad(W, (0, pad))
    if H is not None:
        H = torch.nn.functional.pad(H, (0, pad, 0, pad))
        H[-pad:, -pad:] = torch.eye(pad, dtype=H.dtype)
    return W, H


def _asymmetry_per_row(cb, W, score, recipe, found):
    """With `recipe.search.abs_per_row` (strict log codebooks with ABS): search the symmetric table too, and let every row
    keep whichever of the two its score prefers. In strict mode the derived asymmetric window gives the smaller
    sign's levels up for finer low ones, which measured worse than the symmetric table on many SmolLM2 rows.
    Returns (search result, number of rows that took the symmetric table or None)."""
    spec = cb.spec
    if not (recipe.search.abs_per_row and spec.is_log and not spec.symmetric and spec.mode == "strict"):
        return found, None
    sym = make_codebook(replace(spec, symmetric=True))
    found_sym = search(sym, sym.rows(W), score, default_k_values(sym, recipe.search.dbs),
                       default_s_values(sym, recipe.search.sfs), strategy=recipe.search.strategy)
    merged, pick = per_row_best([found, found_sym])
    return merged, int(pick.sum())


def _search(cb, W, score, recipe):
    """(search result, rows that took the symmetric log table or None, rows that took the uniform grid or None).
    A `log_or_uniform` codebook searches its two parts on the same score and keeps the better per row."""
    parts = (cb.log, cb.grid) if isinstance(cb, UnionCodebook) else (cb,)
    found = [search(part, part.rows(W), score, default_k_values(part, recipe.search.dbs),
                    default_s_values(part, recipe.search.sfs), strategy=recipe.search.strategy) for part in parts]
    found[0], symmetric_rows = _asymmetry_per_row(parts[0], W, score, recipe, found[0])
    if len(parts) == 1:
        return found[0], symmetric_rows, None
    merged = merge(*found)
    return merged, symmetric_rows, int(merged.params.uniform.sum())


def layer_forward(site, x: torch.Tensor):
    """W_hat [O, C] -> the site's layer run on `x` with that weight, then its activation (site.act)."""
    def forward(W_hat: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(site.module, {"weight": W_hat.reshape(site.weight.shape)}, (x,))
        return site.act(y) if site.act is not None else y
    return forward


def search_score(site, cb, W, H, recipe, outputs=None):
    """The search's score for this site: its layer-output error on `outputs` = (search inputs, full-precision
    target) for score "output", Δw H Δwᵀ for "hessian" when there are statistics, the weight SSE otherwise."""
    hessian = HessianScore(H) if H is not None else None
    if recipe.search.score != "output" or H is None:   # a site without input statistics is scored data-free
        return hessian if (hessian is not None and recipe.search.score == "hessian") else WeightSSE()
    if outputs is None:
        raise LogartError(f"{site.name}: the layer-output search score needs the layer's search inputs and its "
                          "full-precision output, and none were given.",
                          "quantize through the block driver (logart.quantize), or use --score hessian.")
    if cb.spec.group_size != -1:
        raise LogartError(f"{site.name}: the layer-output search score scores whole output channels, and this "
                          f"recipe quantizes by group size {cb.spec.group_size}.",
                          "use per-channel quantization (group size -1) with --score output.")
    x, target = outputs
    channel_dim = -1 if isinstance(site.module, torch.nn.Linear) else 1
    return LayerOutputScore(layer_forward(site, x), W, target, channel_dim, fallback=hessian)


def quantize_site(site, cb, recipe, hessian=None, G=None, outputs=None):
    """Quantize the weight of `site` (a WeightSite, models/sites.py) in place. `hessian`: the HessianAccumulator
    of its input rows (None: data-free). `G`: per-head attention factors [heads, head_dim, head_dim] for a q/k
    projection; with `recipe.rounding.attention_aware` LLR minimises Σ_h tr(G_h ΔW_h H ΔW_hᵀ) instead of tr(ΔW H ΔWᵀ)
    (spec §4.4). `outputs`: (search inputs, full-precision output) of the layer for the layer-output score.
    Returns (LayerRecord, params)."""
    t0 = time.perf_counter()
    rounding = recipe.rounding
    G = G if rounding.attention_aware and rounding.method.learns else None
    W = site.matrix()
    H, dead = None, None
    if hessian is not None:
        H, dead = hessian.finalize(damp=recipe.calibration.damp)
        W[:, dead] = 0  # inputs that never fired: their weights cannot matter, and H is only damped there
        if recipe.calibration.fp_target:  # move toward the full-precision model's output (calib/hessian.py)
            W = hessian.target(W, H, recipe.calibration.fp_target)
    W, H = _whole_groups(W, H, cb.spec.group_size)
    score = search_score(site, cb, W, H, recipe, outputs)
    found, symmetric_rows, uniform_rows = _search(cb, W, score, recipe)
    params = found.params
    if rounding.method.uses_gptq:
        rounded = gptq(W, H, cb, params, act_order=rounding.act_order)
    else:
        rounded = rtn(W, cb, params)
    kept = None
    if rounding.method.learns:
        lam = rounding.llr_lambda_qkv if site.role in ("query", "key", "value", "qkv") else rounding.llr_lambda
        config = LLRConfig(iters=rounding.llr_iters, lr=rounding.llr_lr, reg_weight=lam)
        learned = learned_rounding(W, H, cb, params, source=rounded.source, G=G, config=config)
        # LLR chooses between the two neighbours of its source; after GPTQ it can end above GPTQ's own error
        # (measured on SmolLM2 layers), so the better of the two hard roundings (by LLR's own objective) is kept.
        objective = QuadraticLoss(H, *W.shape, W.device, G) if rounding.method.uses_gptq else None
        if objective is None or objective.value(learned.weight - W) <= objective.value(rounded.weight - W):
            rounded, kept = learned, "llr"
        else:
            kept = "gptq"
    W_hat = rounded.weight.reshape(W.shape)
    site.write(W_hat)
    if H is not None:
        after = hessian_loss(W_hat - W, H)
        before = found.baseline_loss if recipe.search.score == "hessian" else float("nan")
    else:
        after = float((W_hat - W).pow(2).sum())
        before = found.baseline_loss
    s = found.s.float()
    record = LayerRecord(name=site.name, shape=tuple(site.shape), k_hist=_k_hist(found),  # not the padded W
                         s_range=(float(s.min()), float(s.max())), loss_before=before, loss_after=after,
                         seconds=time.perf_counter() - t0, dead_inputs=int(dead.sum()) if dead is not None else 0,
                         extra={"search_loss": found.loss, "search_strategy": found.strategy, "kept": kept,
                                "attention_aware": G is not None,
                                "symmetric_rows": symmetric_rows, "uniform_rows": uniform_rows,
                                **{k: v for k, v in rounded.info.items() if isinstance(v, (int, float, str))}})
    return record, params
