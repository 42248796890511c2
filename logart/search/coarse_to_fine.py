"""FPCS (AdaLog §3.4, Fast Progressive Combining Search) over the (k, s) candidate grid of a row.

Score C candidates spread uniformly, keep the best few, evaluate their neighbours on a finer sub-grid, repeat.
Here the grid is (k, s): k has only 1 to 5 values and is searched in full at the coarse level, then pruned
to the best few per row; the fine level runs along s for the kept k. See `fpcs` for why the fine level is
dense by default.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def fpcs(evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_rows: int, shape: tuple[int, int],
         stride: int = 4, keep_k: int = 3, window: int = 0, beam: int = 0, expand: int = 4,
         device=None) -> torch.Tensor:
    """Coarse-to-fine search of a per-row 2-D grid (k index x s index), minimising `evaluate`.

    evaluate(ki, si): int64 [R, n] grid indices -> float [R, n] values (lower is better).

    1. Coarse: every k at every `stride`-th s (0, stride, 2 stride, ...).
    2. Per row, keep the `keep_k` k whose best coarse value is lowest.
    3. Fine level, along s for the kept k, one of:
       * `beam = 0` (default): dense. Every s within +-`window` of the k's best coarse s (the whole axis when
         `window` is 0 or covers it). LLM Hessian landscapes are needle-like in s: a handful of heavily
         weighted inputs flip their rounding at almost every 0.01 step, so the best s is rarely next to a
         good coarse point, only somewhere in the same broad basin.
       * `beam > 0`: AdaLog's progressive expansion, for smooth landscapes. Each round divides the step h by
         `expand` (h' = h // expand, at least 1) and expands the row's `beam` best candidates of the kept k
         to the points at offsets +-h', +-2h', ..., +-(h - h'), until the step is 1.
    `stride=1` evaluates the whole grid. Returns the table [R, nk, ns]; +inf where not evaluated.
    """
    nk, ns = shape
    R = num_rows
    h = max(1, min(stride, ns))
    table = torch.full((R, nk, ns), math.inf, device=device)
    s0 = torch.arange(0, ns, h, device=device)
    ki = torch.arange(nk, device=device).repeat_interleave(s0.numel())
    si = s0.repeat(nk)
    table.view(R, -1)[:, ki * ns + si] = evaluate(ki.expand(R, -1), si.expand(R, -1)).nan_to_num(nan=math.inf)
    if h == 1:
        return table
    keep = min(max(1, keep_k), nk)
    best, center = table.min(2)                                                         # [R, nk]
    kept = best.topk(keep, dim=1, largest=False).indices.sort(1).values                  # [R, keep]

    def run(ki, si):
        table.view(R, -1).scatter_(1, ki * ns + si, evaluate(ki, si).nan_to_num(nan=math.inf))

    if beam <= 0:
        width = ns if window <= 0 else min(ns, 2 * window + 1)
        if width == ns:   # the whole axis: skip the coarse points already seen
            rest = torch.ones(ns, dtype=torch.bool, device=device)
            rest[s0] = False
            offs = rest.nonzero().squeeze(1)
            si = offs.repeat(keep).expand(R, -1)
        else:             # a window inside [0, ns), shifted inwards at the ends
            start = (center.gather(1, kept) - window).clamp(0, ns - width)               # [R, keep]
            si = (start[..., None] + torch.arange(width, device=device)).reshape(R, -1)
        run(kept.repeat_interleave(si.shape[1] // keep, 1), si)
        return table
    mask = torch.full((R, nk, 1), math.inf, device=device).scatter_(1, kept[..., None], 0.0)
    while h > 1:
        fine = max(1, h // max(2, expand))
        steps = torch.arange(fine, h, fine, device=device)
        offsets = torch.cat([-steps, steps])
        top = (table + mask).view(R, -1).topk(min(beam, keep * ns), dim=1, largest=False).indices
        tk, ts = top // ns, top % ns
        run(tk[:, :, None].expand(-1, -1, offsets.numel()).reshape(R, -1),
            (ts[:, :, None] + offsets).clamp(0, ns - 1).reshape(R, -1))
        h = fine
    return table
