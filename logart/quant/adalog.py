"""Logarithmic activation codebooks for non-negative, power-law activations (post-softmax, shifted post-GELU):
AdaLog's adaptive base (Wu et al., ECCV 2024, §3.2) and the fixed log2 / log√2 bases it is compared with.

A b-bit code c in 0 .. 2^b - 2 stands for  s · 2^(-c·q/r),  the last code 2^b - 1 for zero:

    encode   c = round(-log2(x / s) · r / q), clamped below at 0; a value whose code would be 2^b - 1 or more
             (too small for the smallest level) is zero
    base     2^(q/r): r = 37 (a prime, so that q·c mod r takes every residue as q varies; AdaLog's choice) and
             q searched; log2 is q = r, log√2 is q = r / 2 (written with r = 2, q = 1)

All b bits are codes: the zero level is one of the 2^b codes (reference implementations keep 2^b nonzero
levels plus zero, a (b + 1)-bit alphabet).

Integer dequantization (AdaLog eq. 7-10). With e = c·q, 2^(-e/r) = 2^(-floor(e/r)) · 2^(-(e mod r)/r), so two
small tables indexed by the code replace the power: `shift[c] = floor(c·q/r)` (a right shift) and
`mantissa[c] = round(2^m · 2^(-(c·q mod r)/r))`, an m-bit integer in (2^(m-1), 2^m]. The hardware value of a
code is s · mantissa[c] · 2^-(shift[c] + m): exact in floating point (a small integer times a power of two),
and the fake quantizer returns exactly that value, so what is evaluated is what integer hardware computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

R_PRIME = 37          # AdaLog's r
MANTISSA_BITS = 10    # m: the width of the multiplier table (within 2^-11 relative of the exact power)
KINDS = ("adalog", "log2", "logsqrt2")


@dataclass(frozen=True)
class LogActParams:
    """One quantizer's parameters: the scale s (the largest level), the base exponent q / r and the bit width."""

    scale: float
    q: int
    r: int
    bits: int
    mantissa_bits: int = MANTISSA_BITS

    @property
    def levels(self) -> int:        # nonzero levels
        return 2 ** self.bits - 1

    @property
    def zero_code(self) -> int:
        return 2 ** self.bits - 1

    def to_dict(self) -> dict:
        return {"scale": self.scale, "q": self.q, "r": self.r, "bits": self.bits,
                "mantissa_bits": self.mantissa_bits, "base": 2.0 ** (self.q / self.r)}


def base_of(kind: str, q: int | None = None) -> tuple[int, int]:
    """(q, r) of a fixed-base kind, or of AdaLog with the searched q."""
    if kind == "log2":
        return 1, 1
    if kind == "logsqrt2":
        return 1, 2
    if kind == "adalog":
        return int(q), R_PRIME
    raise ValueError(f"unknown log activation codebook {kind!r}")


def tables(p: LogActParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, mantissa): int64 [2^b] tables over the codes (the zero code gets mantissa 0)."""
    e = torch.arange(2 ** p.bits, dtype=torch.int64) * p.q
    shift = torch.div(e, p.r, rounding_mode="floor")
    frac = (e - shift * p.r).double()
    mantissa = torch.round(2.0 ** p.mantissa_bits * torch.exp2(-frac / p.r)).to(torch.int64)
    mantissa[p.zero_code] = 0
    return shift, mantissa


def encode(x: torch.Tensor, p: LogActParams) -> torch.Tensor:
    """Codes (int64, same shape as x) of the non-negative tensor x; negative values are treated as zero."""
    ratio = x.clamp(min=0) / p.scale
    c = torch.round(-torch.log2(ratio) * (p.r / p.q))     # log2(0) = -inf -> +inf: the zero code
    c = torch.nan_to_num(c, posinf=float(p.zero_code)).clamp(min=0, max=p.zero_code)
    return c.to(torch.int64)


def level_values(p: LogActParams, dtype=torch.float32) -> torch.Tensor:
    """The value of every code [2^b], through the integer tables (module doc)."""
    shift, mantissa = tables(p)
    values = torch.ldexp(mantissa.double(), -(shift + p.mantissa_bits).double()) * p.scale
    return values.to(dtype)


def decode(codes: torch.Tensor, p: LogActParams) -> torch.Tensor:
    return level_values(p).to(codes.device)[codes]


def fake_quant(x: torch.Tensor, p: LogActParams) -> torch.Tensor:
    return decode(encode(x, p), p).to(x.dtype)


def exact_power(codes: torch.Tensor, p: LogActParams) -> torch.Tensor:
    """s · 2^(-c·q/r) in float64 without tables (and 0 for the zero code): the formula the tables approximate."""
    v = p.scale * torch.exp2(-codes.double() * p.q / p.r)
    return torch.where(codes == p.zero_code, torch.zeros_like(v), v)
