"""Soft rounding on the log exponent: the one relaxation shared by layer-wise learned rounding (LLR,
rounding/learned.py) and block reconstruction (calib/reconstruct.py).

Every weight may end on one of two table levels around its source value w: the level just below and the level
just above. A continuous variable V per weight chooses between them through the rectified sigmoid
h(V) = clamp(sigmoid(V)(ζ - γ) + γ, 0, 1), and the soft weight moves between the two levels

    log codebooks:  |ŵ| = |down|^(1-h) |up|^h      (interpolation of the exponent: LogART's LLR)
    uniform:         ŵ  = down + h (up - down)       (plain AdaRound)

(`Bracket` below: the two levels and the path between them, including the segment between 0 and the smallest
level). `SoftRounding` evaluates it two ways: `h` / `soft` with the derivative factor a hand-written gradient
needs (LLR's quadratic loss: one matmul per iteration), and `forward()` as plain differentiable tensor
operations, for losses that autograd differentiates through a whole block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from logart.quant.table import encode_rows

TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class AnnealSchedule:
    """How a soft rounding is trained: Adam with a cosine learning rate from `lr` to `lr_min_ratio * lr`, and
    AdaRound's regulariser switched on after `warmup` (a fraction of `iters`), its β going linearly from
    `beta_start` to `beta_end`. Shared by layer-wise LLR (`LLRConfig`) and block reconstruction."""

    iters: int = 500
    lr: float = 0.05
    lr_min_ratio: float = 0.3
    reg_weight: float = 1.0
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def beta(self, i: int) -> float | None:
        """β at iteration i; None during the warm-up (regulariser off)."""
        start = self.warmup * self.iters
        if i < start:
            return None
        rel = (i - start) / max(self.iters - start, 1e-12)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - rel)

    def lr_at(self, i: int) -> float:
        lo = self.lr * self.lr_min_ratio
        return lo + (self.lr - lo) * (1 + math.cos(math.pi * i / self.iters)) / 2


class Bracket:
    """The two candidate levels of every weight and the soft path between them (all [O, I]):

        soft(h) = base * exp(h d) + slope * h

    A log pair has slope 0 and d = log(|up| / |down|); a linear pair (uniform codebooks, and in `linear`
    zero-segment mode the segment between 0 and the smallest level) has d = 0. `jump` marks log pairs whose
    down level is the virtual level below the smallest one: there h = 0 means 0."""

    def __init__(self, tables, src: torch.Tensor, log, zero_segment: str = "linear"):
        linear_rows = None
        if torch.is_tensor(log):  # a bool per codebook row (quant/union.py): False rows are uniform pairs
            linear = ~_row_mask(tables, log.to(src.device))
            log, linear_rows = not bool(linear.all()), (linear if bool(linear.any()) else None)
        self.log = log
        lo_c, hi_c = tables.neighbours(src)
        if not log:
            self.down_c, self.up_c = lo_c, hi_c
            self.base = tables.decode(lo_c)
            self.slope = tables.decode(hi_c) - self.base
            self.frac = _fraction(src - self.base, self.slope)
            return
        neg = src < 0
        sign = torch.sign(src)
        down_c, up_c = torch.where(neg, hi_c, lo_c), torch.where(neg, lo_c, hi_c)
        m_down, m_up = tables.decode(down_c).abs(), tables.decode(up_c).abs()
        valid = (sign != 0) & (m_up > 0)
        zb_pos, zb_neg = (tables.per_row(v) for v in _zero_bounds(tables))
        zb = torch.where(neg, zb_neg, zb_pos)
        zero = valid & (m_down == 0)
        frozen = zero & (zb <= TINY)          # this sign never rounds to 0: the smallest level is a floor
        down_c = torch.where(frozen, up_c, down_c)
        m_down = torch.where(frozen, m_up, m_down)
        zero &= ~frozen
        lin = zero if zero_segment == "linear" else torch.zeros_like(zero)
        self.jump = zero & ~lin
        # The virtual level below the smallest one: its geometric midpoint with it is the codebook's own zero
        # threshold (reference mode: exactly one ladder step down, as in the original).
        m_low = torch.where(self.jump, zb * zb / m_up.clamp(min=TINY), m_down)
        pair = valid & ~lin
        one = torch.ones_like(m_up)
        l_up = torch.log(torch.where(pair, m_up, one))
        l_down = torch.log(torch.where(pair, m_low, one))
        self.down_c, self.up_c = down_c, up_c
        self.d = l_up - l_down
        self.base = torch.where(pair, sign * m_low, torch.zeros_like(m_up))
        self.slope = torch.where(lin, sign * m_up, torch.zeros_like(m_up))
        self.has_jump, self.has_linear = bool(self.jump.any()), bool(lin.any())
        frac_log = _fraction(torch.log(src.abs()) - l_down, self.d)
        self.frac = torch.where(lin, _fraction(src.abs(), m_up), frac_log)
        if linear_rows is not None:  # uniform rows: soft = down + h (up - down), the same formula with d = 0
            down, up = tables.decode(lo_c), tables.decode(hi_c)
            self.down_c, self.up_c = torch.where(linear_rows, lo_c, down_c), torch.where(linear_rows, hi_c, up_c)
            self.d = torch.where(linear_rows, torch.zeros_like(self.d), self.d)
            self.base = torch.where(linear_rows, down, self.base)
            self.slope = torch.where(linear_rows, up - down, self.slope)
            self.jump = self.jump & ~linear_rows
            self.frac = torch.where(linear_rows, _fraction(src - down, up - down), self.frac)
            self.has_jump, self.has_linear = bool(self.jump.any()), True

    def align(self, tables, nearest: torch.Tensor) -> None:
        """Move the starting fractions just enough that h >= 0.5 picks the codebook's own nearest level
        `nearest` [O, I] wherever that is one of the two neighbours (exact ties, thresholds that are not the
        midpoint of the interpolation)."""
        down, up = tables.decode(self.down_c), tables.decode(self.up_c)
        to_down = (nearest == down) & (nearest != up) & (self.frac >= 0.5)
        to_up = (nearest == up) & (nearest != down) & (self.frac < 0.5)
        self.frac = torch.where(to_down, torch.full_like(self.frac, 0.5 - 1e-3), self.frac)
        self.frac = torch.where(to_up, torch.full_like(self.frac, 0.5), self.frac)

    def hard_codes(self, up: torch.Tensor) -> torch.Tensor:
        return torch.where(up, self.up_c, self.down_c)


def _row_mask(tables, per_row: torch.Tensor) -> torch.Tensor:
    """A bool per codebook row (output channel-major, as quant/rows.py orders them) in the weight layout [O, I]."""
    if per_row.numel() == 1:
        return per_row.reshape(1, 1).expand(tables.O, tables.I)
    return tables.per_row(per_row.reshape(tables.O, tables.G).transpose(0, 1).reshape(-1))


def _fraction(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den clamped to [0, 1]; 0 where den is 0 (both neighbours are the same level)."""
    ok = den > 0
    return torch.where(ok, (num / torch.where(ok, den, torch.ones_like(den))).clamp(0, 1), torch.zeros_like(num))


def _zero_bounds(tables) -> tuple[torch.Tensor, torch.Tensor]:
    """Per table row, the magnitude below which positive / negative weights round to zero (0 where the row
    has no zero code reachable from that sign, e.g. the pure-sqrt(2) `log_dynamic` book)."""
    lv, bd = tables.levels, tables.bounds
    R, M = lv.shape
    zc = encode_rows(torch.zeros(R, 1, device=lv.device), bd)
    is_zero = torch.gather(lv, 1, zc).squeeze(1) == 0
    zc = zc.squeeze(1)
    upper = torch.gather(bd, 1, zc.clamp(max=M - 2)[:, None]).squeeze(1)
    lower = torch.gather(bd, 1, (zc - 1).clamp(min=0)[:, None]).squeeze(1)
    pos = torch.where(is_zero & (zc < M - 1), upper.clamp(min=0), torch.zeros_like(upper))
    neg = torch.where(is_zero & (zc > 0), (-lower).clamp(min=0), torch.zeros_like(lower))
    return pos, neg


class SoftRounding(nn.Module):
    """The soft weights of one matrix [O, I] as a function of V (an `nn.Parameter`, initialised so that the soft
    weight starts at the source value): `forward()` for autograd, `h` / `soft` for hand-written gradients,
    `regulariser(beta)` AdaRound's Σ (1 - |2h - 1|^β), `hard_codes()` the codes of the final hard choice."""

    def __init__(self, tables, src: torch.Tensor, log: bool, zero_segment: str = "linear", gamma: float = -0.1,
                 zeta: float = 1.1):
        super().__init__()
        self.bracket = br = Bracket(tables, src, log, zero_segment)
        self.gamma, self.zeta, self.span = gamma, zeta, zeta - gamma
        c = 2.0 * self.span
        self.slope_c = br.slope * c
        self.d_c = br.d * c if br.log else None
        if br.log and br.has_jump:  # float masks: bool-masked ops are several times slower on CPU
            self.jump_f = br.jump.float()
            self.not_jump = 1 - self.jump_f
        self.V = nn.Parameter(torch.empty(0), requires_grad=False)

    def init_v(self) -> torch.Tensor:
        """V with h(V) equal to the fractional position: sigmoid(V) = (frac - γ) / (ζ - γ)."""
        return -torch.log(self.span / (self.bracket.frac - self.gamma) - 1)

    def start(self) -> "SoftRounding":
        """Make V the module's trainable parameter, at its initial value."""
        self.V = nn.Parameter(self.init_v())
        return self

    def h(self, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, sigmoid(V), h before the clamp)."""
        sig = torch.sigmoid(V)
        h_lin = sig.mul(self.span).add_(self.gamma)
        return F.hardtanh(h_lin, 0.0, 1.0), sig, h_lin

    def soft(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft weights, 2 (ζ - γ) d soft / d h); soft = base exp(h d) + slope h. In-place: no autograd."""
        br = self.bracket
        if not br.log:
            return torch.addcmul(br.base, br.slope, h), self.slope_c
        e = torch.mul(h, br.d).exp_().mul_(br.base)
        if br.has_jump:  # h = 0 on a virtual level means 0: multiply by 1 - jump + jump sign(h)
            e.mul_(torch.addcmul(self.not_jump, self.jump_f, torch.sign(h)))
        if not br.has_linear:
            return e, e * self.d_c
        coef = torch.addcmul(self.slope_c, e, self.d_c)
        return e.addcmul_(br.slope, h), coef

    def soft_h(self) -> torch.Tensor:
        """h(V) as a differentiable tensor."""
        return torch.clamp(torch.sigmoid(self.V) * self.span + self.gamma, 0.0, 1.0)

    def forward(self) -> torch.Tensor:
        """The soft weights [O, I], differentiable in V (the same formula as `soft`)."""
        br, h = self.bracket, self.soft_h()
        if not br.log:
            return br.base + br.slope * h
        e = br.base * torch.exp(h * br.d)
        if br.has_jump:
            e = e * (self.not_jump + self.jump_f * torch.sign(h))
        return e + br.slope * h if br.has_linear else e

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft_h() - 1).abs().pow(beta)).sum()

    def hard_codes(self) -> torch.Tensor:
        return self.bracket.hard_codes(self.V.detach() >= 0)
