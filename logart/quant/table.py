"""Row tables: the one representation every codebook reduces to.

Per row, a codebook is a sorted vector of representable values `levels [R, M]` and the decision thresholds
between neighbours `bounds [R, M-1]`. A weight's code is the number of bounds strictly below it, so encoding
is a batched `searchsorted`, decoding is a `gather`, and the runtime dequantizes by the same table lookup.
Keeping levels and bounds separate lets the `reference` log mode place thresholds where the original code
does (in the exponent domain, even when the hardware approximation moves a level) while `strict` mode uses
the plain nearest-level rule.
"""

from __future__ import annotations

import torch


def encode_rows(rows: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Code of every element: index into its row's table. rows [R, C], bounds [R, M-1] -> int64 [R, C]."""
    return torch.searchsorted(bounds.contiguous(), rows.contiguous())


def decode_rows(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Value of every code. codes [R, C] (any int dtype), levels [R, M] -> float32 [R, C]."""
    return torch.gather(levels, 1, codes.long())


def neighbour_codes(rows: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of the largest level <= w and the smallest level >= w (equal when w is on a level or outside
    the table's range). Learned rounding chooses between these two."""
    m = levels.shape[1]
    hi = torch.searchsorted(levels.contiguous(), rows.contiguous()).clamp_(max=m - 1)
    lo = torch.searchsorted(levels.contiguous(), rows.contiguous(), right=True).sub_(1).clamp_(min=0)
    return lo, hi


def midpoint_bounds(levels: torch.Tensor) -> torch.Tensor:
    """Nearest-level thresholds in the linear domain (uniform codebooks)."""
    return 0.5 * (levels[:, 1:] + levels[:, :-1])
