"""The layer Hessian of the squared output error: H = (2/N) Σ_t x_t x_tᵀ over the layer's N calibration inputs.

    acc = HessianAccumulator(layer.in_features)
    for x in inputs:                      # x [..., C]: any batch/sequence shape, any float dtype
        acc.add_batch(x)
    H, dead = acc.finalize()              # damped; `dead` marks inputs that were always zero
    W[:, dead] = 0                        # the caller zeroes the weight columns of dead inputs

H is kept as a running average in float32 (as GPTQ does): every batch rescales the sum so far, so its entries
stay the size of one token's x xᵀ however many tokens arrive. Spec: logart-reference.md §4.4-4.5.

Full-precision targets (`Recipe.calibration.fp_target`): block by block, the quantized model's inputs x drift away from the
full-precision model's inputs x° for the same token. GPTQ's objective Σ ||(Q - W) x||² asks a layer to reproduce
the full-precision *layer* on the drifted inputs; Σ ||Q x - W x°||² asks it to reproduce the full-precision
*model*, so each layer also undoes some of the error of the blocks before it (the asymmetric calibration of
GPTAQ, Li et al. 2025). With D = (2/N) Σ (x° - x) xᵀ the second objective is

    Σ ||Q x - W x°||² = tr((Q - W°) H (Q - W°)ᵀ) + const,   W° = W + W D H⁻¹,

the same quadratic form around a moved target, so search, GPTQ and learned rounding run unchanged on W°.
The target moves only a fraction α of the way, W° = W + α W D H⁻¹: the least-squares move fits a few hundred
calibration windows exactly and can be as large as W itself in late blocks, where its own quantization error
outweighs the drift it corrects (strengths measured in docs/RESULTS.md).
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
        self.D = None   # (2/N) Σ (x° - x) xᵀ, once full-precision inputs x° are given
        self.count = 0  # tokens seen, N

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add the rows of x [..., C] (one row per token / position). `x_fp`: the full-precision model's inputs
        for the same tokens (same shape), for the full-precision target (module doc); give them always or never."""
        if x.shape[-1] != self.columns:
            raise LogartError(f"the Hessian expects inputs with {self.columns} features, got shape {tuple(x.shape)}.",
                              "feed the layer's own input (its last dimension must be in_features).")
        if x_fp is not None and x_fp.shape != x.shape:
            raise LogartError(f"full-precision inputs {tuple(x_fp.shape)} do not match the inputs {tuple(x.shape)}.",
                              "pass the full-precision model's inputs for the same tokens.")
        if (x_fp is None) != (self.D is None) and self.count:
            raise LogartError("full-precision inputs were given for some batches only.",
                              "give x_fp with every batch, or with none.")
        x = x.detach().reshape(-1, self.columns).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.count + m
        # H_new = (N/total) H_old + (2/total) xᵀx: the old average is rescaled before the new rows are added.
        self.H.mul_(self.count / total)
        self.H.addmm_(x.T, x, alpha=2.0 / total)
        if x_fp is not None:
            drift = x_fp.detach().reshape(-1, self.columns).to(self.H.device, torch.float32) - x
            if self.D is None:
                self.D = torch.zeros_like(self.H)
            self.D.mul_(self.count / total)
            self.D.addmm_(drift.T, x, alpha=2.0 / total)
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

    @torch.no_grad()
    def target(self, W: torch.Tensor, H: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The weight the quantized layer should approach: W itself, or with full-precision inputs seen the moved
        target W° = W + α W D H⁻¹ with α = `strength` (module doc; 1 is the least-squares optimum). H: the
        damped Hessian from `finalize()` (positive definite)."""
        if self.D is None:
            return W
        shift = torch.cholesky_solve((W.double() @ self.D.double()).T, torch.linalg.cholesky(H.double()))
        return W + strength * shift.T.to(W.dtype)
