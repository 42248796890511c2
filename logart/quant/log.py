"""Logarithmic codebooks: log2, log_sqrt2 and LogART's dynamic mixed base (DBS), with the asymmetric extension
(ABS) and the 1 + 1/2 hardware approximation. Spec: shared/spec/logart-reference.md §2.

Exponents are counted in *half units*: e stands for the magnitude 2^(e/2), so a base-2 step is 2 and a
sqrt(2) step is 1. A row's magnitudes form a **ladder** read from the top down: slot j = 0 is the largest
level. With k base-2 codes and k' = L - k sqrt(2) codes (L = 2^(n-1)), the ladder is

    e(j) = top - j                 for j < k'     (the large magnitudes, base sqrt 2)
    e(j) = 2*E2 - 2*(j - k')       for j >= k'    (the small magnitudes, base 2, continuing downwards)

where `top` is the rounded log of the row's largest |w| and 2^E2 the largest power of two below the sqrt(2)
part. Pure log2 is k = L, pure sqrt(2) is k = 0. A row is fully described by four numbers:
`s` (scale multiplier, SFS), `k` (base split, DBS), `top` and `asym` (the ABS shift, signed).

Two modes (see docs/CODEBOOKS.md):

* `reference` reproduces the original code exactly: both signs share the window of L slots plus ceil(A/2)
  extension slots below it; the zero code sits under the lowest level; thresholds are midpoints in the
  exponent domain, except the base-2/sqrt(2) switch, which compares the *unscaled* |w| with T (quirk Q7).
  Rows use up to 2^n + 2 distinct values, so codes need n + 1 bits.
* `strict` uses at most 2^n values per row, so every weight is one n-bit code: each sign gets its own window
  of L ladder slots (the sign with the smaller extreme starts A slots lower, A recomputed for every scale),
  and the zero code replaces the lowest slot of that smaller sign (the original's disabled "hazard" rule).
  Thresholds are the log-domain midpoints of the actual values (the scale applies to the switch point too),
  and zero is reached by linear distance, since the log distance to zero is infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logart.quant.codebook import Codebook
from logart.errors import LogartError
from logart.quant.spec import QuantSpec

EPS = 1e-32  # added inside every log, as the original does, so log2(0) is finite (about -106)
# Rows whose largest |w| is below 2^-90 (~8e-28) are placed as if it were 2^-90, so that every ladder level
# stays a normal float32 (denormals compare as zero on some CPUs); their weights all quantize to zero anyway.
TINY_ROW = 2.0 ** -90
LOG_BITS = (2, 3, 4)


def _rho(x: torch.Tensor) -> torch.Tensor:
    """Round half up; the original uses it to place the exponent window."""
    return torch.floor(x + 0.5)


def _log2(x: torch.Tensor) -> torch.Tensor:
    return torch.log2(x + EPS)


@dataclass
class LogParams:
    """Per-row parameters; each field is a tensor of shape [R]."""

    s: torch.Tensor     # float32 scale multiplier in (0, 1]
    k: torch.Tensor     # int64 number of base-2 codes
    top: torch.Tensor   # int64 top exponent, half units
    asym: torch.Tensor  # int64 ABS shift A; > 0: the positive sign is the smaller one, <= 0: the negative

    def to(self, device) -> "LogParams":
        return LogParams(*(t.to(device) for t in (self.s, self.k, self.top, self.asym)))

    def select(self, index) -> "LogParams":
        return LogParams(*(t[index] for t in (self.s, self.k, self.top, self.asym)))

    @property
    def num_rows(self) -> int:
        return self.s.shape[0]


class LogCodebook(Codebook):
    params_type = LogParams

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        assert spec.is_log
        if spec.bits not in LOG_BITS:
            raise LogartError(f"{spec.bits}-bit log codebooks are not supported (their ladder would span 2^-{2 ** (spec.bits - 1)}).",
                              f"use {', '.join(map(str, LOG_BITS))} bits for log methods, or method 'uniform' for 8 bits.")
        self.L = 2 ** (spec.bits - 1)
        self.strict = spec.mode == "strict"
        # Ladder slots computed per row: reference uses at most L + ceil(2^n / 2) = 2L; strict windows
        # start up to A = 2^n slots down, so they need 3L.
        self.P = 3 * self.L if self.strict else 2 * self.L

    # --- the search space ---------------------------------------------------------------------------
    def k_candidates(self) -> list[int]:
        """Base splits to try, in the original's order (L first): K_n = {L, L-2, ..., 0}."""
        if self.spec.method == "log2":
            return [self.L]
        if self.spec.method == "log_sqrt2":
            return [0]
        return list(range(self.L, -1, -2))

    def table_size(self) -> int:
        return 2 * self.L if self.strict else 2 * self.P + 1

    # --- parameters ---------------------------------------------------------------------------------
    def fit_rows(self, rows: torch.Tensor, k=None, s=1.0) -> LogParams:
        """Parameters for rows [R, C] given the base split k and scale s (scalars or [R] tensors).
        Without k, pick per row the k of least weight error at this s (the original's data-free init)."""
        R = rows.shape[0]
        dev = rows.device
        s = torch.as_tensor(s, dtype=torch.float32, device=dev).expand(R).contiguous()
        if k is None:
            return self._best_k_by_weight_error(rows, s)
        k = torch.as_tensor(k, dtype=torch.int64, device=dev).expand(R).contiguous()
        m_pos = rows.amax(1).clamp(min=0)
        m_neg = (-rows.amin(1)).clamp(min=0)
        if self.spec.symmetric:
            m_pos = m_neg = torch.maximum(m_pos, m_neg)
        return self.params_from_extremes(m_pos, m_neg, k, s)

    def params_from_extremes(self, m_pos, m_neg, k, s) -> LogParams:
        """The row parameters follow from the two extremes, k and s alone (spec §2.1)."""
        pure2 = self._pure2(k)
        big = torch.maximum(m_pos, m_neg).clamp(min=TINY_ROW)   # rows below TINY_ROW count as all-zero
        top2 = 2 * _rho(_log2(big))                                # base-2 window (k = L)
        topr = _rho(2 * _log2(big))                                # sqrt(2) / mixed window
        top = torch.where(pure2, top2, topr).to(torch.int64)
        kp, e2, t_exp = self._ladder_shape(k, top)
        mu = torch.minimum(m_pos, m_neg)
        if self.strict:  # the smaller sign's window must hold mu/s, and that depends on s
            mu = mu / s
        lm = _log2(mu)
        a = torch.where(lm > t_exp, top.float() - _rho(2 * lm), kp.float() + e2.float() - _rho(lm))
        a = a.abs().clamp(max=2 ** self.spec.bits).to(torch.int64)
        if self.spec.symmetric:
            a = torch.zeros_like(a)
        asym = torch.where(m_pos < m_neg, a, -a)
        return LogParams(s=s, k=k, top=top, asym=asym)

    def _pure2(self, k):
        return (k == self.L) & (self.spec.method != "log_sqrt2")

    def _ladder_shape(self, k, top):
        """(k', E2, log2 T) per row. Pure base 2: k' = 0 and no switch (T = +inf); pure sqrt(2): every slot
        is sqrt(2) (k' = P) and T = -inf; mixed: the geometric midpoint of 2^E2 and sqrt(2)^z_r."""
        pure2 = self._pure2(k)
        puresq = k == 0
        kp = torch.where(pure2, torch.zeros_like(k), torch.where(puresq, torch.full_like(k, self.P), self.L - k))
        e2_mixed = torch.div(top - kp, 2, rounding_mode="floor")
        e2 = torch.where(pure2, torch.div(top, 2, rounding_mode="floor"), e2_mixed)
        z_r = top - kp + 1
        t_exp = (z_r.float() / 2 + e2.float()) / 2
        t_exp = torch.where(pure2, torch.full_like(t_exp, math.inf), torch.where(puresq, torch.full_like(t_exp, -math.inf), t_exp))
        return kp, e2, t_exp

    def _best_k_by_weight_error(self, rows, s) -> LogParams:
        best, best_err = None, None
        for k in self.k_candidates():
            p = self.fit_rows(rows, k=k, s=s)
            err = (self.fake_quant_rows(rows, p) - rows).pow(2).sum(1)
            if best is None:
                best, best_err = p, err
            else:
                better = err < best_err  # strict '<': the first candidate wins ties, as in the original
                best = LogParams(*(torch.where(better, a, b) for a, b in zip(
                    (p.s, p.k, p.top, p.asym), (best.s, best.k, best.top, best.asym))))
                best_err = torch.where(better, err, best_err)
        return best

    # --- the ladder ---------------------------------------------------------------------------------
    def _ladder(self, p: LogParams):
        """Half-unit exponents [R, P] of the ladder slots (top-down) and the row's k', E2, log2 T."""
        kp, e2, t_exp = self._ladder_shape(p.k, p.top)
        j = torch.arange(self.P, device=p.k.device)[None, :]
        kpc = kp[:, None]
        e = torch.where(j < kpc, p.top[:, None] - j, 2 * e2[:, None] - 2 * (j - kpc))
        return e, kp, t_exp

    def row_scale(self, p: LogParams) -> torch.Tensor:
        """s * 2^floor(top/2): the per-row factor of every level (exact: a power of two times s)."""
        return torch.ldexp(p.s, torch.div(p.top, 2, rounding_mode="floor").to(torch.int32))

    def _values(self, e: torch.Tensor, p: LogParams, factored: bool) -> torch.Tensor:
        """s * 2^(e/2), computed as row_scale * rel with rel = 2^((e - 2*floor(top/2))/2) so that the packed
        runtime's row_scale * table[code] reproduces every level bit for bit. With the hardware approximation
        odd half-exponents (only sqrt(2) levels have them) become 1.5 * 2^((e-1)/2): x << m plus x << (m-1)."""
        rel = level_values(e - 2 * torch.div(p.top, 2, rounding_mode="floor")[:, None], self.spec.hardware_approx)
        return rel if factored else self.row_scale(p)[:, None] * rel

    # --- tables -------------------------------------------------------------------------------------
    def tables(self, p: LogParams):
        return self._strict_tables(p) if self.strict else self._reference_tables(p)

    def factored_tables(self, p: LogParams):
        """(row_scale [R], rel [R, M]) with levels == row_scale[:, None] * rel exactly."""
        build = self._strict_tables if self.strict else self._reference_tables
        return self.row_scale(p), build(p, factored=True)[0]

    def _reference_tables(self, p: LogParams, factored: bool = False):
        L, P = self.L, self.P
        e, kp, t_exp = self._ladder(p)
        s = p.s
        a = p.asym.abs()
        no_zero = (p.k == 0) & (self.spec.method == "log_dynamic")  # the pure sqrt(2) DBS candidate
        ext = torch.where(no_zero, torch.zeros_like(a), torch.div(a + 1, 2, rounding_mode="floor"))
        used = (L + ext)[:, None]                                      # slots in use per sign
        j = torch.arange(P, device=e.device)[None, :]
        # The smallest used slot fills the unused ones; their intervals end up empty (equal bounds).
        e = torch.where(j < used, e, torch.gather(e, 1, used - 1))
        levels_td = self._values(e, p, factored)                      # top-down magnitudes [R, P]
        # Bound below slot j-1 (between slots j and j-1): midpoint in the exponent domain, scaled by s.
        b_td = s[:, None] * torch.exp2((e[:, 1:] + e[:, :-1]).float() / 4)   # [R, P-1], for j = 1..P-1
        # The base-2 / sqrt(2) switch compares the unscaled |w| with T (quirk Q7).
        switch = (j[:, 1:] == kp[:, None]) & (kp[:, None] > 0) & (kp[:, None] < P)
        b_td = torch.where(switch, torch.exp2(t_exp)[:, None].expand_as(b_td), b_td)
        e_min = torch.gather(e, 1, used - 1).squeeze(1)
        step = torch.where(kp >= used.squeeze(1), 1, 2)  # sqrt(2) step if the lowest slot is a sqrt(2) level
        zb = s * torch.exp2((e_min.float() - step.float() / 2) / 2)
        zb = torch.where(no_zero, torch.zeros_like(zb), zb)          # no zero code: only exact zeros map to 0
        b_td = torch.where(j[:, 1:] >= used, zb[:, None], b_td)     # unused slots: empty intervals
        pos_bounds = torch.cat([zb[:, None], b_td.flip(1)], 1)       # ascending, from the zero upwards
        pos_bounds = torch.cummax(pos_bounds, 1).values              # keep thresholds monotone when T > s*b
        neg_zb = torch.where(no_zero, torch.full_like(zb, -torch.finfo(torch.float32).tiny), -zb)
        neg_bounds = torch.cat([-pos_bounds[:, 1:].flip(1), neg_zb[:, None]], 1)
        neg_bounds = torch.cummin(neg_bounds.flip(1), 1).values.flip(1)   # unused slots: empty intervals
        levels = torch.cat([-levels_td, torch.zeros_like(s)[:, None], levels_td.flip(1)], 1)
        bounds = torch.cat([neg_bounds, pos_bounds], 1)
        return levels, bounds

    def _strict_tables(self, p: LogParams, factored: bool = False):
        L = self.L
        e, _, _ = self._ladder(p)
        vals = self._values(e, p, factored)                           # [R, 3L] top-down
        a = p.asym.abs()
        pos_small = p.asym > 0                                        # the smaller sign holds the zero code
        win = torch.arange(L, device=e.device)[None, :]
        pos_start = torch.where(pos_small, a, torch.zeros_like(a))[:, None]
        neg_start = torch.where(pos_small, torch.zeros_like(a), a)[:, None]
        pos = torch.gather(vals, 1, pos_start + win)                  # top-down, L each
        neg = torch.gather(vals, 1, neg_start + win)
        full = torch.cat([-neg, torch.zeros_like(p.s)[:, None], pos.flip(1)], 1)   # 2L + 1 ascending
        # Drop the smaller sign's lowest slot: its place is taken by the zero code.
        drop = torch.where(pos_small, L + 1, L - 1)[:, None]
        idx = torch.arange(2 * L, device=e.device)[None, :]
        levels = torch.gather(full, 1, idx + (idx >= drop).long())
        return levels, _strict_bounds(levels)


def level_values(e: torch.Tensor, hardware_approx: bool) -> torch.Tensor:
    """2^(e/2) for half-unit exponents e, as mantissa * 2^floor(e/2) with mantissa 1 or sqrt(2) (1.5 with the
    hardware approximation). Written with ldexp so that a level factors *exactly* into a per-row power of two
    and a small table entry: the packed runtime (io/) multiplies them back bit for bit."""
    odd = torch.remainder(e, 2) == 1
    mantissa = torch.where(odd, 1.5 if hardware_approx else math.sqrt(2.0), 1.0).to(torch.float32)
    return torch.ldexp(mantissa, torch.div(e, 2, rounding_mode="floor").to(torch.int32))


def _strict_bounds(levels: torch.Tensor) -> torch.Tensor:
    """Geometric midpoints between same-sign neighbours; the linear midpoint next to zero. The midpoint is
    sqrt|lo| * sqrt|hi|, not sqrt(lo * hi): for rows of tiny weights (|w| ~ 1e-22) the product falls into the
    float32 denormals and loses its precision, and a level could then round to its neighbour."""
    lo, hi = levels[:, :-1], levels[:, 1:]
    same_sign = torch.sign(lo) * torch.sign(hi) > 0
    geo = torch.sign(hi) * torch.sqrt(lo.abs()) * torch.sqrt(hi.abs())
    return torch.where(same_sign, geo, 0.5 * (lo + hi))
