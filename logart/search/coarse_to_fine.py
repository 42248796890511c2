"""FPCS (AdaLog §3.4, Fast Progressive Combining Search) over the (k, s) candidate grid of a row.

Score C candidates spread uniformly, keep the best few, evaluate their neighbours on a finer sub-grid, repeat.
Here the grid is (k, s): k has only 1 to 5 values and is searched in full at the coarse level, then pruned
to the best few per row; the fine level runs along s for the kept k, over whole coarse cells by default
(see `fpcs` for why).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def fpcs(evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_rows: int, shape: tuple[int, int],
         stride: int = 4, keep_k: int = 3, cells: int = 30, beam: int = 0, expand: int = 4,
         device=None) -> torch.Tensor:
    """Coarse-to-fine search of a per-row 2-D grid (k index x s index), minimising `evaluate`.

    evaluate(ki, si): int64 [R, n] grid indices -> float [R, n] values (lower is better).

    1. Coarse: every k at every `stride`-th s (0, stride, 2 stride, ...).
    2. Per row, keep the `keep_k` k whose best coarse value is lowest.
    3. Fine level, along s for the kept k, one of:
       * `beam = 0` (default): cells. A cell is the run of s between two neighbouring coarse points, valued by
         the best of its two ends and their outer neighbours; the row's `cells` best cells of the kept k are
         evaluated at every s
         (`cells = 0`: all of them). LLM Hessian landscapes are needle-like in s (a handful of heavily
         weighted inputs flip their rounding at almost every 0.01 step), so the best s is rarely next to the
         best coarse point (AdaLog's neighbourhood refinement misses it), but it lies in a low cell: on
         SmolLM2 layers the best 30 of 75 cells hold the exhaustive optimum for 99.8% of rows.
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
    kept = table.amin(2).topk(keep, dim=1, largest=False).indices                      # [R, keep]
    drop = torch.full((R, nk, 1), math.inf, device=device).scatter_(1, kept[..., None], 0.0)

    def run(ki, si):
        table.view(R, -1).scatter_(1, ki * ns + si, evaluate(ki, si).nan_to_num(nan=math.inf))

    if beam <= 0:
        coarse = table[:, :, s0]                                                          # [R, nk, nc]
        # A cell's value: the best coarse point among its two ends and their outer neighbours (a needle is
        # often flanked by poor points; looking one coarse step further measured fewer misses).
        ends = torch.minimum(coarse, torch.cat([coarse[:, :, 1:], coarse[:, :, -1:]], 2))
        cell = torch.minimum(ends, torch.cat([ends[:, :, :1], ends[:, :, :-1]], 2))
        cell = torch.minimum(cell, torch.cat([ends[:, :, 1:], ends[:, :, -1:]], 2)) + drop
        nc = s0.numel()
        n = keep * nc if cells <= 0 else min(cells, keep * nc)
        top = cell.view(R, -1).topk(n, dim=1, largest=False).indices                      # [R, n] = k * nc + c
        inner = torch.arange(1, h, device=device)
        si = ((top % nc) * h)[..., None] + inner                                          # [R, n, h-1]
        run((top // nc)[..., None].expand_as(si).reshape(R, -1), si.clamp(max=ns - 1).reshape(R, -1))
        return table
    while h > 1:
        fine = max(1, h // max(2, expand))
        steps = torch.arange(fine, h, fine, device=device)
        offsets = torch.cat([-steps, steps])
        top = (table + drop).view(R, -1).topk(min(beam, keep * ns), dim=1, largest=False).indices
        tk, ts = top // ns, top % ns
        run(tk[:, :, None].expand(-1, -1, offsets.numel()).reshape(R, -1),
            (ts[:, :, None] + offsets).clamp(0, ns - 1).reshape(R, -1))
        h = fine
    return table
