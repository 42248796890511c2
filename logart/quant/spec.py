"""What a codebook is: a frozen, printable description. Every result row records it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from logart.errors import LogartError

METHODS = ("uniform", "log2", "log_sqrt2", "log_dynamic", "log_or_uniform")
MODES = ("strict", "reference")
SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """A weight codebook.

    method: `uniform` (integer grid), `log2`, `log_sqrt2`, `log_dynamic` (LogART's mixed base, DBS), or
        `log_or_uniform` (per row the mixed-base table or a uniform grid, whichever scores lower; quant/union.py).
    bits: code width n; every strict-mode weight is one n-bit code.
    group_size: -1 per output channel, 0 per tensor, g > 0 per group of g inputs.
    symmetric: one range for both signs. False turns on the asymmetric extension (ABS) for log codebooks and
        a zero point for uniform ones.
    hardware_approx: replace odd powers of sqrt(2) by 1.5 * 2^m, so every level is a shift or shift+add.
    mode: `strict` (at most 2^n values per row: packable) or `reference` (the original code's numerics,
        up to 2^n + 2 values per row: fake-quant only). Uniform codebooks are the same in both modes.
    """

    method: str = "log_dynamic"
    bits: int = 4
    group_size: int = -1
    symmetric: bool = False
    hardware_approx: bool = False
    mode: str = "strict"

    def __post_init__(self):
        if self.method not in METHODS:
            raise LogartError(f"unknown quantization method {self.method!r}.", f"use one of {', '.join(METHODS)}.")
        if self.bits not in SUPPORTED_BITS:
            raise LogartError(f"{self.bits}-bit weights are not supported.",
                              f"use one of {', '.join(map(str, SUPPORTED_BITS))} bits.")
        if self.mode not in MODES:
            raise LogartError(f"unknown codebook mode {self.mode!r}.", f"use one of {', '.join(MODES)}.")
        if not isinstance(self.group_size, int) or self.group_size < -1:
            raise LogartError(f"group size {self.group_size!r} is not valid.",
                              "use -1 (per channel), 0 (per tensor) or a positive group size such as 128.")
        if self.method == "log_or_uniform" and self.mode != "strict":
            raise LogartError("the log_or_uniform codebook exists in strict mode only (the reference log tables have "
                              "2^n + 2 entries, a uniform grid 2^n).", "use mode 'strict', or method 'log_dynamic'.")
        if self.hardware_approx and self.method == "uniform":
            raise LogartError("the hardware approximation applies to log codebooks only.",
                              "drop hardware_approx or pick a log method.")

    @property
    def is_log(self) -> bool:
        return self.method != "uniform"

    def to_dict(self) -> dict:
        return asdict(self)
