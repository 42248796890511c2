"""Searching a quantizer with two parameters (a uniform quantizer's clipping range, AdaLog's scale and base) on a
fine grid of `na` x `nb` candidate indices, by one of three strategies (AdaLog §3.4, Table 5):

    brute        every pair: na·nb scores (the exact optimum of the grid)
    alternating  fix b, search every a; fix a, search every b; three rounds (PTQ4ViT's calibration): about
                 3 (na + nb) scores, and it stops in the first local minimum it walks into
    fpcs         Fast Progressive Combining Search: about `budget` pairs spread over the whole grid, keep the
                 `keep` best, expand each to the 5 x 5 points of its neighbourhood at half the spacing, and
                 repeat for `rounds` rounds in all (or until the spacing is one grid step): linear in the grid
                 size, and fine where it matters

`score(a, b)` takes int64 index tensors [n] and returns float [n], lower is better. Every strategy scores each
pair at most once and returns (a index, b index, its score, number of pairs scored).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

STRATEGIES = ("fpcs", "brute", "alternating")
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Memo:
    """Scores each (a, b) once, however often the strategy proposes it."""

    def __init__(self, score: Score, nb: int):
        self.score, self.nb, self.seen = score, nb, {}

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        keys = (a * self.nb + b).tolist()
        fresh = sorted({k for k in keys if k not in self.seen})
        if fresh:
            fa = torch.tensor([k // self.nb for k in fresh])
            fb = torch.tensor([k % self.nb for k in fresh])
            for k, v in zip(fresh, self.score(fa, fb).tolist()):
                self.seen[k] = v
        return torch.tensor([self.seen[k] for k in keys], dtype=torch.float64)

    def best(self) -> tuple[int, int, float]:
        k = min(self.seen, key=self.seen.get)
        return k // self.nb, k % self.nb, self.seen[k]


def _axis(n: int, count: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, max(1, min(n, count))).round().long().unique()


def brute(score: Score, na: int, nb: int) -> tuple[int, int, float, int]:
    memo = _Memo(score, nb)
    a, b = torch.meshgrid(torch.arange(na), torch.arange(nb), indexing="ij")
    memo(a.reshape(-1), b.reshape(-1))
    return (*memo.best(), len(memo.seen))


def alternating(score: Score, na: int, nb: int, rounds: int = 3, start: tuple[int, int] | None = None
                ) -> tuple[int, int, float, int]:
    memo = _Memo(score, nb)
    a, b = start if start is not None else (na - 1, nb - 1)
    for _ in range(rounds):
        every_a = torch.arange(na)
        a = int(every_a[memo(every_a, torch.full((na,), b)).argmin()])
        every_b = torch.arange(nb)
        b = int(every_b[memo(torch.full((nb,), a), every_b).argmin()])
    return (*memo.best(), len(memo.seen))


def fpcs(score: Score, na: int, nb: int, budget: int = 128, keep: int = 4, rounds: int = 4
         ) -> tuple[int, int, float, int]:
    memo = _Memo(score, nb)
    # the first round: a coarse grid of about `budget` pairs, its two sides in the ratio of the grid's
    ca = max(1, round(math.sqrt(budget * na / nb)))
    cb = max(1, budget // ca)
    ga, gb = _axis(na, ca), _axis(nb, cb)
    a, b = (t.reshape(-1) for t in torch.meshgrid(ga, gb, indexing="ij"))
    values = memo(a, b)
    ha, hb = (na - 1) / max(1, len(ga) - 1), (nb - 1) / max(1, len(gb) - 1)   # the coarse spacing
    offsets = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    for _ in range(rounds - 1):
        if ha <= 1 and hb <= 1:     # the grid's own resolution is reached
            break
        top = values.argsort()[:keep]
        # each survivor's neighbourhood: +-one current spacing in steps of half of it; then the spacing halves
        oa, ob = torch.meshgrid(offsets * ha, offsets * hb, indexing="ij")
        a = (a[top, None].double() + oa.reshape(1, -1)).round().long().clamp(0, na - 1).reshape(-1)
        b = (b[top, None].double() + ob.reshape(1, -1)).round().long().clamp(0, nb - 1).reshape(-1)
        values = memo(a, b)
        ha, hb = ha / 2, hb / 2
    return (*memo.best(), len(memo.seen))


def search(strategy: str, score: Score, na: int, nb: int) -> tuple[int, int, float, int]:
    if strategy == "fpcs":
        return fpcs(score, na, nb)
    if strategy == "brute":
        return brute(score, na, nb)
    if strategy == "alternating":
        return alternating(score, na, nb)
    raise ValueError(f"unknown search strategy {strategy!r}")
