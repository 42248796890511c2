"""Per row, the better of several searches of the same rows (e.g. with the asymmetric and the symmetric table).

The search's score is a sum of independent per-row terms (Δw_r H Δw_rᵀ, or the weight error), so choosing each
row's candidate from whichever search scored it lower never raises the total, and the mixed parameters describe
one valid table per row as long as every search ran on a codebook whose tables read the same parameter fields
(the symmetric variant of a log codebook only fits A = 0: `LogCodebook.params_from_extremes`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from logart.search.grid import SearchResult


def per_row_best(results: list[SearchResult]) -> tuple[SearchResult, torch.Tensor]:
    """(the merged SearchResult, which result each row took [R]); ties keep the earlier result."""
    first = results[0]
    scores = torch.stack([r.score.nan_to_num(nan=float("inf")) for r in results])     # [n, R]
    pick = scores.argmin(0)
    rows = torch.arange(pick.shape[0], device=pick.device)

    def take(values):
        return torch.stack(values)[pick, rows]

    params = type(first.params)(**{f.name: take([getattr(r.params, f.name) for r in results])
                                   for f in dataclasses.fields(first.params)})
    k = take([r.k for r in results]) if first.k is not None else None
    merged = dataclasses.replace(first, params=params, score=take([r.score for r in results]), k=k,
                                 s=take([r.s for r in results]), index=take([r.index for r in results]),
                                 exact_evals=sum(r.exact_evals for r in results),
                                 proxy_evals=sum(r.proxy_evals for r in results),
                                 k_hist=dict(Counter(k.tolist())) if k is not None else {})
    return merged, pick
