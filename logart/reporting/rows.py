"""One row (output channel or group) of a packed layer: its codebook levels, codes and weights, for the
codebook overlay plot. The levels are the row's whole dequant table: all 2^n entries, used or not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logart.errors import LogartError
from logart.io.checkpoint import module_spec
from logart.io.linear import row_geometry
from logart.quant import to_rows, unpack
from logart.quant.rows import PER_CHANNEL, PER_TENSOR
from logart.reporting.run import RunFolder


@dataclass
class RowView:
    layer: str
    row: int
    rows: int                       # rows of the layer
    channel: int | None             # output channel (None per tensor)
    cols: tuple[int, int] | None    # the inputs [start, stop) the row covers (None per tensor)
    bits: int
    levels: np.ndarray              # the 2^n dequantized levels of the row, in code order (original scale)
    counts: np.ndarray              # weights per code
    values: np.ndarray              # the row's quantized weights
    fp: np.ndarray | None           # the row's full-precision weights, when the fp model was given
    choices: dict                   # the row's codebook choices: k, s, top, asym (log) or scale, zero (uniform)

    @property
    def where(self) -> str:
        if self.channel is None:
            return "whole tensor"
        if self.cols is None:
            return f"output channel {self.channel}"
        return f"output channel {self.channel}, inputs {self.cols[0]}-{self.cols[1] - 1}"

    @property
    def fp_error(self) -> float | None:
        """||w_q - w|| / ||w|| for the row, when the fp weights are known (a mismatched --model shows here)."""
        if self.fp is None:
            return None
        norm = float(np.linalg.norm(self.fp))
        return float(np.linalg.norm(self.values - self.fp)) / norm if norm else None


def representative_row(packed: dict, choices: dict) -> int:
    """A typical row: among the rows with the layer's most common k (log codebooks), the one whose row scale
    is the median; rows that are all zero are skipped when any other exists."""
    scale = packed["row_scale"].float().abs()
    candidates = torch.nonzero(scale > 0).flatten()
    if candidates.numel() == 0:
        candidates = torch.arange(scale.numel())
    k = choices.get("k")
    if k is not None and k.numel() == scale.numel():
        kc = k[candidates]
        mode = torch.mode(kc).values
        candidates = candidates[kc == mode]
    order = torch.argsort(scale[candidates])
    return int(candidates[order[(order.numel() - 1) // 2]])


def _where(row: int, out: int, inp: int, group_size: int):
    if group_size == PER_TENSOR:
        return None, None
    if group_size == PER_CHANNEL:
        return row, (0, inp)
    per_channel = inp // group_size
    start = (row % per_channel) * group_size
    return row // per_channel, (start, start + group_size)


def row_view(run: RunFolder, name: str, row: int | None = None, fp_weight: torch.Tensor | None = None) -> RowView:
    """The row `row` of layer `name` (default: `representative_row`), with its fp weights if `fp_weight` (the
    layer's full-precision weight [out, in]) is given."""
    spec = module_spec(run.quant_config or {}, name)   # the layer's own codebook where an override applied
    bits, group_size = int(spec["bits"]), int(spec.get("group_size", PER_CHANNEL))
    out, inp = run.shape(name)
    packed = run.packed_layer(name)
    choices = run.row_choices(name)
    n_rows, length = row_geometry(out, inp, group_size)
    if row is None:
        row = representative_row(packed, choices)
    if not 0 <= row < n_rows:
        raise LogartError(f"row {row} is out of range for {name}, which has {n_rows} rows.",
                          f"pass --row between 0 and {n_rows - 1}, or leave it out for a representative row.")
    codes = unpack(packed["qweight"][row:row + 1], bits, length)[0]
    table = packed["tables"][int(packed["table_index"][row])].double()
    levels = (float(packed["row_scale"][row]) * table).numpy()
    fp = None
    if fp_weight is not None:
        if tuple(fp_weight.shape) != (out, inp):
            raise LogartError(f"the --model weight of {name} has shape {tuple(fp_weight.shape)}, the run's is "
                              f"{(out, inp)}.", "pass the model that was quantized (report.json names it).")
        fp = to_rows(fp_weight, group_size)[row].double().numpy()
    channel, cols = _where(row, out, inp, group_size)
    picked = {}
    for key, t in choices.items():
        v = t.reshape(-1)[row] if t.numel() == n_rows else t.reshape(-1)[0]
        picked[key] = v.item()
    return RowView(layer=name, row=row, rows=n_rows, channel=channel, cols=cols, bits=bits, levels=levels,
                   counts=np.bincount(codes.numpy(), minlength=2 ** bits), values=levels[codes.numpy()], fp=fp,
                   choices=picked)
