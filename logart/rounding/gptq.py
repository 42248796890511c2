"""GPTQ / OPTQ error feedback for any table codebook (LogART's `--optq_init`, spec §4.7; related-methods §2.3).

Columns are quantized one at a time with the row's fixed table; the rounding error of column j, scaled by the
Cholesky factor of H⁻¹, is pushed into the columns not yet quantized, which minimises tr(ΔW H ΔWᵀ) greedily.
With U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U):

    q_j = Q(w_j)                           # nearest level of each row's table for column j's group
    e_j = (w_j - q_j) / U_jj
    w_k -= e_j U_jk      for k > j         # inside a lazy block of 128 columns; one matmul per block after

The codebook parameters (scale, base split, ...) are fixed beforehand, so grouped codebooks behave like GPTQ's
"static groups": column j always uses the table of group j // group_size, also under act-order.
"""

from __future__ import annotations

import warnings

import torch

from logart.errors import LogartError
from logart.rounding.tables import LayerTables, Rounded, weight_matrix

BLOCK = 128
MAX_RETRIES = 6


def check_hessian(H: torch.Tensor, columns: int, device) -> torch.Tensor:
    if H.dim() == 3:
        raise LogartError(f"GPTQ takes one [{columns}, {columns}] Hessian, got a per-head one {tuple(H.shape)}.",
                          "pass the layer's shared H to gptq (per-head H is supported by learned_rounding).")
    if H.dim() != 2 or H.shape != (columns, columns):
        raise LogartError(f"the Hessian has shape {tuple(H.shape)}, but the weight has {columns} input columns.",
                          f"pass the [{columns}, {columns}] H of this layer's inputs (HessianAccumulator.finalize()).")
    H = H.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(H).all()):
        raise LogartError("the Hessian contains NaN/inf.", "check the calibration inputs of this layer.")
    return H


def inverse_cholesky(H: torch.Tensor, max_retries: int = MAX_RETRIES) -> tuple[torch.Tensor, float]:
    """(U, extra): the upper Cholesky factor of (H + extra I)⁻¹. `extra` is 0 when H factorises as given;
    otherwise damping of 1%, 10%, 100%, ... of mean(diag H) is added until it does (with a warning)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    base = float(H.diagonal().mean().abs()) or 1.0
    extra = 0.0
    for attempt in range(max_retries + 1):
        Hd = H + extra * eye if extra else H
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if extra:
                    warnings.warn(f"GPTQ: the Hessian was not positive definite; added {extra:.3g} "
                                  f"({extra / base:.0%} of mean diag H) to its diagonal.", stacklevel=3)
                return U, extra
        extra = 0.01 * base if extra == 0 else extra * 10
    raise LogartError(f"GPTQ: the Hessian is not positive definite even with {extra / 10 / base:.0%} extra damping.",
                      "use more calibration data, a larger damp in HessianAccumulator.finalize(), or plain RTN.")


@torch.no_grad()
def gptq(w: torch.Tensor, H: torch.Tensor, cb, params, *, block_size: int = BLOCK,
         act_order: bool = False) -> Rounded:
    """GPTQ rounding of `w` [O, ...] with fixed codebook parameters and the layer Hessian H [I, I] (damped,
    dead inputs handled: HessianAccumulator.finalize()). Returns weights exactly on the codebook, their codes,
    and the error-compensated weights each column had when it was quantized (`source`).

    act_order: quantize columns by decreasing diag H (the most sensitive inputs first), permuted back at the
    end. Inputs with diag H == 0 are treated as dead: their weight columns become 0 (H_jj := 1)."""
    tables = LayerTables(w, cb, params)
    W = weight_matrix(w).clone()
    O, I = W.shape
    H = check_hessian(H, I, W.device).clone()
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    group_of = tables.column_group()
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H, group_of = W[:, perm], H[perm][:, perm], group_of[perm]
    U, extra = inverse_cholesky(H)
    groups = group_of.tolist()

    Q = torch.empty_like(W)
    codes = torch.empty(O, I, dtype=torch.int64, device=W.device)
    source = torch.empty_like(W)
    for i1 in range(0, I, block_size):
        i2 = min(i1 + block_size, I)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        E1 = torch.empty(O, i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            col = W1[:, i]
            source[:, i1 + i] = col
            q, c = tables.quantize_column(col, groups[i1 + i])
            Q[:, i1 + i] = q
            codes[:, i1 + i] = c
            err = (col - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        if i2 < I:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes, source = Q[:, inv], codes[:, inv], source[:, inv]
    info = {"extra_damp": extra, "act_order": act_order, "dead_inputs": int(dead.sum())}
    return Rounded(weight=Q.reshape(w.shape), codes=codes.reshape(w.shape), source=source.reshape(w.shape), info=info)
