"""The layer Hessian of the squared output error: H = (2/N) Σ_t x_t x_tᵀ over the layer's N calibration inputs.

    acc = HessianAccumulator(layer.in_features)
    for x in inputs:                      # x [..., C]: any batch/sequence shape, any float dtype
        acc.add_batch(x)
    H, dead = acc.finalize()              # damped; `dead` marks inputs that were always zero
    W[:, dead] = 0                        # the caller zeroes the weight columns of dead inputs

H is kept as a running average in float32 (as GPTQ does): every batch rescales the sum so far, so its entries
stay the size of one token's x xᵀ however many tokens arrive. Spec: logart-reference.md §4.4-4.5.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from logart.errors import LogartError

DAMP = 0.01              # --percdamp: fraction of mean(diag H) added to the diagonal
DEAD_VALUE = 1 / 2048    # --replace: the diagonal entry given to inputs that were always zero


class FinalHessian(NamedTuple):
    H: torch.Tensor      # [C, C] float32, dead inputs replaced, damped
    dead: torch.Tensor   # [C] bool: inputs whose diagonal was zero (their weight columns must be zeroed)


class HessianAccumulator:
    """Running average of 2 x xᵀ over every input row seen by `add_batch`."""

    def __init__(self, columns: int, device=None):
        self.columns = int(columns)
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=device)
        self.count = 0  # tokens seen, N

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., C] (one row per token / position)."""
        if x.shape[-1] != self.columns:
            raise LogartError(f"the Hessian expects inputs with {self.columns} features, got shape {tuple(x.shape)}.",
                              "feed the layer's own input (its last dimension must be in_features).")
        x = x.detach().reshape(-1, self.columns).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.count + m
        # H_new = (N/total) H_old + (2/total) xᵀx: the old average is rescaled before the new rows are added.
        self.H.mul_(self.count / total)
        self.H.addmm_(x.T, x, alpha=2.0 / total)
        self.count = total

    @torch.no_grad()
    def finalize(self, damp: float = DAMP, dead_value: float = DEAD_VALUE) -> FinalHessian:
        """A damped copy of H (the accumulator itself is unchanged and can take more batches).

        Inputs whose diagonal is exactly 0 never fired: their H_jj becomes `dead_value` and they are reported
        in `dead`, so that the caller zeroes the matching weight columns. Then H += damp * mean(diag H) * I."""
        if self.count == 0:
            raise LogartError("the Hessian has seen no calibration inputs.",
                              "run calibration data through the layer (add_batch) before finalize().")
        H = self.H.clone()
        H = 0.5 * (H + H.T)  # exact symmetry; the quadratic forms built on H only see its symmetric part
        if not bool(torch.isfinite(H).all()):
            raise LogartError("the Hessian contains NaN/inf: the calibration inputs were not finite.",
                              "check the model's activations (fp16 overflow?) or run calibration in float32.")
        diag = H.diagonal()
        dead = diag == 0
        diag[dead] = dead_value
        diag += damp * diag.mean()
        return FinalHessian(H, dead)
