"""A layer's codebook tables laid out for rounding algorithms that work on the weight matrix W [O, I].

The codebook's row view groups weights as (output channel, input group); rounding algorithms walk W by input
column (GPTQ) or need whole-matrix products (ΔW H). `LayerTables` builds every row's table once per layer
and stores it **group-major**: table row `gi * O + o` holds group gi of output channel o. Then

* the tables of one input column j (group j // group) are one contiguous [O, M] slice, so GPTQ quantizes a
  column with one `searchsorted` and one `gather` and never rebuilds a table;
* the whole matrix in table layout is W.view(O, G, group).transpose(0, 1): [G*O, group] rows, and the batched
  row functions of quant/table.py apply unchanged.

A codebook with its own arithmetic encoding rule (uniform: round half to even, which differs from the table
thresholds exactly on a midpoint) is encoded with that rule, so results agree with `cb.encode` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from logart.errors import LogartError
from logart.quant.codebook import Codebook
from logart.quant.rows import from_rows
from logart.quant.table import decode_rows, encode_rows, neighbour_codes


def weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """W [O, ...] as a float32 matrix [O, I] (conv kernels flattened per output channel, as the codebook does)."""
    return w.detach().reshape(w.shape[0], -1).to(torch.float32)


class LayerTables:
    """Every table of one layer: levels [G*O, M] ascending, bounds [G*O, M-1], group-major (see module doc)."""

    def __init__(self, w: torch.Tensor, cb, params):
        O = w.shape[0]
        I = w.numel() // O
        gs = cb.spec.group_size
        group = I if gs in (-1, 0) else gs
        if I % group:
            raise LogartError(f"group size {gs} does not divide the row length {I} (weight shape {tuple(w.shape)}).",
                              f"choose a group size that divides {I}, or -1 for per-channel.")
        G = I // group
        levels, bounds = cb.tables(params)
        levels, bounds = levels.to(w.device), bounds.to(w.device)
        expected = 1 if gs == 0 else O * G
        if levels.shape[0] != expected:
            raise LogartError(f"the codebook parameters describe {levels.shape[0]} rows but the weight "
                              f"{tuple(w.shape)} has {expected} at group size {gs}.",
                              "fit the parameters on this layer's weight with the same codebook (cb.fit(W)).")
        M = levels.shape[1]
        if gs == 0:  # per tensor: one table shared by every row
            levels, bounds = levels.expand(O, M), bounds.expand(O, M - 1)
        self.O, self.I, self.G, self.group, self.M = O, I, G, group, M
        self.shape = w.shape
        self.levels = levels.reshape(O, G, M).transpose(0, 1).reshape(G * O, M).contiguous()
        self.bounds = bounds.reshape(O, G, M - 1).transpose(0, 1).reshape(G * O, M - 1).contiguous()
        # The codebook's own encoding rule, when it has one: whole-matrix and per-group-column parameters.
        self.cb, self.params, self.group_params = None, None, None
        if type(cb).encode_rows is not Codebook.encode_rows and hasattr(params, "select"):
            params = params.to(w.device) if hasattr(params, "to") else params
            self.cb, self.params = cb, params
            o = torch.arange(O, device=levels.device)
            self.group_params = [params.select(torch.zeros_like(o) if gs == 0 else o * G + g) for g in range(G)]

    # --- layout ---------------------------------------------------------------------------------------
    def to_table(self, x: torch.Tensor) -> torch.Tensor:
        """[O, I] -> [G*O, group] (contiguous)."""
        return x.reshape(self.O, self.G, self.group).transpose(0, 1).reshape(self.G * self.O, self.group).contiguous()

    def from_table(self, x: torch.Tensor) -> torch.Tensor:
        """[G*O, group] -> [O, I]."""
        return x.reshape(self.G, self.O, self.group).transpose(0, 1).reshape(self.O, self.I)

    def per_row(self, v: torch.Tensor) -> torch.Tensor:
        """A per-table-row quantity [G*O] broadcast to the weight layout [O, I]."""
        return self.from_table(v[:, None].expand(-1, self.group))

    def column_group(self) -> torch.Tensor:
        """The group of every input column, [I] int64."""
        return torch.arange(self.I, device=self.levels.device) // self.group

    # --- whole matrix ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-level codes (the codebook's own rule) of x [O, I] -> int64 [O, I]."""
        if self.cb is not None:
            rows = self.cb.encode_rows(self.cb.rows(x.reshape(self.shape)), self.params)
            return from_rows(rows, self.shape).reshape(self.O, self.I)
        return self.from_table(encode_rows(self.to_table(x), self.bounds))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.from_table(decode_rows(self.to_table(codes), self.levels))

    def neighbours(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of the largest level <= x and the smallest level >= x, [O, I] each."""
        lo, hi = neighbour_codes(self.to_table(x), self.levels)
        return self.from_table(lo), self.from_table(hi)

    def canonical(self, codes: torch.Tensor) -> torch.Tensor:
        """Replace codes whose level is repeated in the table (reference mode pads unused slots with copies of
        the smallest level) by the code the codebook itself gives that value, when that decodes to the same
        value. Codes whose level lies outside its own interval (reference mode, s < 1, spec quirk Q7) stay."""
        if not bool((self.levels[:, 1:] == self.levels[:, :-1]).any()):
            return codes
        values = self.decode(codes)
        again = self.encode(values)
        return torch.where(self.decode(again) == values, again, codes)

    # --- one input column (GPTQ) ---------------------------------------------------------------------
    def quantize_column(self, col: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [O], codes [O]) of one input column whose group index is `group`."""
        rows = slice(group * self.O, (group + 1) * self.O)
        if self.cb is not None:
            codes = self.cb.encode_rows(col.unsqueeze(1), self.group_params[group])
        else:
            codes = torch.searchsorted(self.bounds[rows], col.unsqueeze(1).contiguous())
        return torch.gather(self.levels[rows], 1, codes).squeeze(1), codes.squeeze(1)


@dataclass
class Rounded:
    """What every rounding algorithm returns.

    weight: float32, the input weight's shape, every entry one of its row's table levels.
    codes: int64, same shape: indices into the row tables, so `cb.decode(codes, params) == weight`.
    source: GPTQ only: the error-compensated continuous weights each column had when it was quantized
        (the starting point for learned rounding after GPTQ, spec §4.6 `W_update`).
    history: learned rounding only: (iteration, soft reconstruction loss, regulariser, hard loss) samples,
        the last one after the final hard rounding.
    info: algorithm notes (extra damping used, iterations run, ...).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    source: torch.Tensor | None = None
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def hessian_loss(dw: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) = Σ_r Δw_r H Δw_rᵀ for ΔW [O, I] (or any [O, ...] shape) and H [I, I]."""
    d = weight_matrix(dw)
    return float(torch.dot((d @ H.to(d)).flatten(), d.flatten()))
