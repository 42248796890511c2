"""Uniform integer codebook: the baseline (RTN, GPTQ). Same conventions as the GPTQ reference code:
asymmetric rows use a zero point; symmetric rows centre the grid at code 2^(n-1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logart.quant.codebook import Codebook
from logart.quant.spec import QuantSpec
from logart.quant.table import midpoint_bounds


@dataclass
class UniformParams:
    scale: torch.Tensor  # float32 [R]
    zero: torch.Tensor   # float32 [R], an integer value

    def to(self, device) -> "UniformParams":
        return UniformParams(self.scale.to(device), self.zero.to(device))

    def select(self, index) -> "UniformParams":
        return UniformParams(self.scale[index], self.zero[index])

    @property
    def num_rows(self) -> int:
        return self.scale.shape[0]


class UniformCodebook(Codebook):
    params_type = UniformParams

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.maxq = 2 ** spec.bits - 1

    def s_candidates(self) -> torch.Tensor:
        """Clip ratios 1.00, 0.99, ..., 0.21: the 80 shrink steps of GPTQ's MSE clip search."""
        return super().s_candidates()[:80]

    def table_size(self) -> int:
        return self.maxq + 1

    def fit_rows(self, rows: torch.Tensor, s=1.0) -> UniformParams:
        """Range from the row's min/max shrunk by the clip ratio s (searched by `search/`)."""
        s = torch.as_tensor(s, dtype=torch.float32, device=rows.device)
        xmin = rows.amin(1).clamp(max=0) * s
        xmax = rows.amax(1).clamp(min=0) * s
        if self.spec.symmetric:
            xmax = torch.maximum(-xmin, xmax)
            xmin = -xmax
        dead = (xmin == 0) & (xmax == 0)          # all-zero rows: any scale maps them to zero
        xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
        xmax = torch.where(dead, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / self.maxq
        if self.spec.symmetric:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        return UniformParams(scale=scale, zero=zero)

    def tables(self, p: UniformParams):
        q = torch.arange(self.maxq + 1, device=p.scale.device, dtype=torch.float32)[None, :]
        levels = p.scale[:, None] * (q - p.zero[:, None])
        return levels, midpoint_bounds(levels)

    def factored_tables(self, p: UniformParams):
        """(row_scale [R], rel [R, M]) with levels == row_scale[:, None] * rel exactly."""
        q = torch.arange(self.maxq + 1, device=p.scale.device, dtype=torch.float32)[None, :]
        return p.scale, q - p.zero[:, None]

    # Arithmetic fast paths; identical to the table path except exactly on a midpoint (round half to even).
    def encode_rows(self, rows, p: UniformParams):
        return torch.clamp(torch.round(rows / p.scale[:, None]) + p.zero[:, None], 0, self.maxq).long()

    def fake_quant_rows(self, rows, p: UniformParams):
        return p.scale[:, None] * (self.encode_rows(rows, p).float() - p.zero[:, None])
