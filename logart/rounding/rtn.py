"""Round to nearest: every weight takes its row's nearest table level, by the codebook's own rule."""

from __future__ import annotations

import torch

from logart.rounding.tables import LayerTables, Rounded


@torch.no_grad()
def rtn(w: torch.Tensor, cb, params) -> Rounded:
    """Round-to-nearest of `w` [O, ...] with fixed codebook parameters (from `cb.fit` or a search)."""
    LayerTables(w, cb, params)  # checks that the parameters describe this weight
    codes, _ = cb.encode(w, params)
    return Rounded(weight=cb.decode(codes, params), codes=codes)
