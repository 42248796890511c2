"""The codebook interface shared by every method: fit parameters, then encode / decode through row tables."""

from __future__ import annotations

import torch

from logart.quant.rows import from_rows, to_rows
from logart.quant.spec import QuantSpec
from logart.quant.table import decode_rows, encode_rows


class Codebook:
    """Base class. Subclasses implement `fit_rows` (per-row parameters) and `tables` (levels and bounds).

    All public methods take and return tensors in the weight's own shape; `*_rows` methods work on the
    [R, C] row view (see rows.py) and are what the search and rounding algorithms call in their loops.
    """

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.bits = spec.bits

    # --- to implement -------------------------------------------------------------------------------
    def fit_rows(self, rows: torch.Tensor, **choice):
        raise NotImplementedError

    def tables(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels [R, M] ascending, bounds [R, M-1]) for every row."""
        raise NotImplementedError

    # --- search axes: the candidates the parameter search may try (search/grid.py) ----------------------
    def k_candidates(self) -> list[int] | None:
        """The base splits k the search may try, in the original's order; None: no k axis (uniform)."""
        return None

    def s_candidates(self) -> torch.Tensor:
        """The scale multipliers s the search may try (SFS): 1.00, 0.99, ..., 0.01 (float32, as the original)."""
        return torch.arange(1.0, 0.0, -0.01)

    # --- row API (used by search/ and rounding/) ----------------------------------------------------
    def encode_rows(self, rows: torch.Tensor, params) -> torch.Tensor:
        return encode_rows(rows, self.tables(params)[1])

    def fake_quant_rows(self, rows: torch.Tensor, params) -> torch.Tensor:
        levels, bounds = self.tables(params)
        return decode_rows(encode_rows(rows, bounds), levels)

    # --- weight API ---------------------------------------------------------------------------------
    def rows(self, w: torch.Tensor) -> torch.Tensor:
        return to_rows(w, self.spec.group_size)

    def fit(self, w: torch.Tensor, **choice):
        """Per-row parameters for `w`. Keyword choices (k, s, clip...) come from a search; omitted ones
        take the data-free default."""
        return self.fit_rows(self.rows(w), **choice)

    def encode(self, w: torch.Tensor, params=None):
        """(codes shaped like w, params). Codes index the row's sorted table (see table.py)."""
        rows = self.rows(w)
        if params is None:
            params = self.fit_rows(rows)
        return from_rows(self.encode_rows(rows, params), w.shape), params

    def decode(self, codes: torch.Tensor, params) -> torch.Tensor:
        shape = codes.shape
        levels, _ = self.tables(params)
        return from_rows(decode_rows(codes.reshape(levels.shape[0], -1), levels), shape)

    def fake_quant(self, w: torch.Tensor, params=None) -> torch.Tensor:
        """Quantize and dequantize: the weight the quantized model computes with (float32)."""
        rows = self.rows(w)
        if params is None:
            params = self.fit_rows(rows)
        return from_rows(self.fake_quant_rows(rows, params), w.shape)

    def log_rows(self, params):
        """Whether rows round between log levels (exponent interpolation) rather than uniform ones: one bool for
        the whole codebook, or a bool per row where rows mix the two (quant/union.py)."""
        return self.spec.is_log

    def table_size(self) -> int:
        """Number of table entries per row (2^n in strict mode)."""
        raise NotImplementedError
