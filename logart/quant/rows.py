"""Granularity: every codebook works on a 2-D matrix of independent *rows*.

A row is one output channel (group_size = -1), one contiguous group of `group_size` inputs of one output
channel (group_size > 0; a last shorter group is zero-padded), or the whole tensor (group_size = 0, per-tensor). Conv weights are flattened per
output channel first. Codebooks never see the original shape; `to_rows`/`from_rows` translate.
"""

from __future__ import annotations

import torch

from logart.errors import LogartError

PER_CHANNEL = -1
PER_TENSOR = 0


def check_weight(w: torch.Tensor) -> None:
    """Reject inputs no codebook can represent, with a message that names the fix."""
    if not isinstance(w, torch.Tensor):
        raise LogartError(f"expected a torch.Tensor weight, got {type(w).__name__}.", "pass the layer's weight tensor.")
    if w.numel() == 0:
        raise LogartError(f"the weight is empty (shape {tuple(w.shape)}).", "quantize a layer that has weights.")
    if not w.is_floating_point():
        raise LogartError(f"the weight has dtype {w.dtype}; a floating-point weight is needed.",
                          "pass the full-precision weight, not already-quantized codes.")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise LogartError(f"the weight has {bad} NaN/inf value(s) out of {w.numel()}.",
                          "fix or re-load the model; a NaN/inf weight cannot be quantized.")


def to_rows(w: torch.Tensor, group_size: int = PER_CHANNEL) -> torch.Tensor:
    """View `w` ([out, ...]) as float32 rows [R, C] for the given granularity."""
    check_weight(w)
    flat = w.detach().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().reshape(1, -1)
    flat = flat.to(torch.float32)
    if group_size == PER_CHANNEL:
        return flat
    if group_size == PER_TENSOR:
        return flat.reshape(1, -1)
    if group_size < 0:
        raise LogartError(f"group size {group_size} is not valid.",
                          "use -1 (per channel), 0 (per tensor) or a positive group size such as 128.")
    pad = padded_width(flat.shape[1], group_size) - flat.shape[1]
    if pad:
        # A last, shorter group (576 inputs in groups of 128: four of 128, one of 64) is zero-padded. Exact: every
        # packable codebook holds 0 (uniform ranges always include it, strict log tables reserve it), a zero
        # never moves a group's max |w| or its min/max range, and from_rows drops the padding again.
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, group_size)


def padded_width(cols: int, group_size: int) -> int:
    """Row length rounded up to whole groups (unchanged per channel / per tensor)."""
    return cols if group_size <= 0 else -(-cols // group_size) * group_size


def from_rows(rows: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """Inverse of `to_rows`: back to the original weight shape (dropping a last group's zero padding)."""
    numel = 1
    for n in shape:
        numel *= n
    if rows.numel() != numel:
        return rows.reshape(shape[0], -1)[:, :numel // shape[0]].reshape(shape)
    return rows.reshape(shape)
