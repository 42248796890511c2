"""Learned rounding (LLR): AdaRound on the exponent, for any table codebook. Spec: logart-reference.md §3.3, §4.6.

Every weight may end on one of two table levels around its source value w (W, or the GPTQ-updated W): the
level just below and the level just above. A continuous variable V per weight chooses between them through the
rectified sigmoid h(V) = clamp(sigmoid(V)(ζ - γ) + γ, 0, 1), and the soft weight moves between the two levels

    log codebooks:  |ŵ| = |down|^(1-h) |up|^h      (interpolation of the exponent: LogART's LLR)
    uniform:         ŵ  = down + h (up - down)       (plain AdaRound)

where down/up are the neighbours of smaller/larger magnitude. Between 0 and the smallest level (`zero_segment`):
* `log` (reference mode, as the original): the down level is a virtual level below the smallest one, placed so
  that their geometric midpoint is the codebook's zero threshold (one ladder step down in reference mode), and
  h = 0 means 0;
* `linear` (strict mode, whose zero threshold is the linear midpoint): soft = h * smallest level.
Zero counts as a neighbour only where the codebook can round to it (the pure-sqrt(2) `log_dynamic` book has no
zero code: there the smallest level is a floor). V starts where h equals the fractional position of w between
the two, so the soft weight starts at w; where the codebook's own thresholds are not the midpoint of that
interpolation (exact ties, reference-mode hardware-approximated levels) the start is nudged across 0.5, so the
hard rounding at the start is exactly the codebook's round-to-nearest.

Loss per iteration, with ΔW = soft - W_original:

    Σ (ΔW H) ⊙ ΔW          or, for q/k projections with per-head factors G [heads, d, d],  Σ_h tr(G_h ΔW_h H ΔW_hᵀ)
    + λ Σ (1 - |2h - 1|^β)  after a warm-up (first 20% of iterations, regulariser off); β: 20, then linear to 2

minimised by Adam (lr 0.05, cosine to 0.3 lr). The gradient is written out by hand: H is symmetric, so
d/dΔW = 2 ΔW H (or 2 G_h ΔW_h H), and an iteration costs one [O, I] x [I, I] matmul plus elementwise work.
(The factored form ‖ΔW L‖² with H = L Lᵀ costs two matmuls per iteration, forward and backward, so it is not
used.) The final weight is the hard rounding h >= 0.5 -> up (V >= 0), exactly on the codebook.

Deterministic: there is no randomness anywhere (init, order and optimiser are fixed by the inputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from logart.errors import LogartError
from logart.rounding.soft import AnnealSchedule, SoftRounding
from logart.rounding.tables import LayerTables, Rounded, weight_matrix


@dataclass(frozen=True)
class LLRConfig(AnnealSchedule):
    """LLR settings; the schedule's defaults (`AnnealSchedule`) are the LLM reference's (`--num_iters 500 --lr 0.05
    --round_weight 1`). reg_weight: λ; the reference uses 1.5 for q/k/v projections (`--round_weight_qkv`), 1.0
    elsewhere.
    """

    gamma: float = -0.1
    zeta: float = 1.1
    record_every: int = 50   # loss samples in Rounded.history (each costs one extra matmul and a sync)
    zero_segment: str = "auto"

    def zero_segment_for(self, spec) -> str:
        """How a log weight moves between 0 and the smallest level: `log` (the original: the exponent moves to
        a virtual level one step below, and h = 0 means 0) or `linear` (soft = h * level). `auto`: `log` in
        reference mode, `linear` in strict mode, whose zero threshold is the linear midpoint."""
        if self.zero_segment not in ("auto", "log", "linear"):
            raise LogartError(f"unknown zero_segment {self.zero_segment!r}.", "use 'auto', 'log' or 'linear'.")
        if self.zero_segment != "auto":
            return self.zero_segment
        return "log" if spec.mode == "reference" else "linear"

    def to_dict(self) -> dict:
        return asdict(self)


class QuadraticLoss:
    """Σ_r Δw_r H Δw_rᵀ, with H [I, I] or per head [heads, I, I], optionally attention-aware with G."""

    def __init__(self, H: torch.Tensor, O: int, I: int, device, G: torch.Tensor | None = None):
        H = H.detach().to(device=device, dtype=torch.float32)
        if H.shape[-2:] != (I, I) or H.dim() not in (2, 3):
            raise LogartError(f"the Hessian has shape {tuple(H.shape)}, but the weight has {I} input columns.",
                              f"pass H [{I}, {I}] (or per head [heads, {I}, {I}]) for this layer.")
        self.H = (0.5 * (H + H.transpose(-1, -2))).contiguous()   # only the symmetric part enters the loss
        self.G = None
        heads = H.shape[0] if H.dim() == 3 else None
        if G is not None:
            G = G.detach().to(device=device, dtype=torch.float32)
            if G.dim() != 3 or G.shape[1] != G.shape[2] or G.shape[0] * G.shape[1] != O or \
                    (heads is not None and heads != G.shape[0]):
                raise LogartError(f"the attention factor G has shape {tuple(G.shape)}; the weight has {O} rows.",
                                  "pass G as [heads, head_dim, head_dim] with heads * head_dim == out_features.")
            self.G = (0.5 * (G + G.transpose(1, 2))).contiguous()
            heads = G.shape[0]
        if heads is not None and O % heads:
            raise LogartError(f"{O} output rows do not split into {heads} heads.", "check the per-head H / G.")
        self.heads, self.O, self.I = heads, O, I

    def _per_head(self, x):
        return x.view(self.heads, self.O // self.heads, self.I)

    def product(self, dw: torch.Tensor) -> torch.Tensor:
        """P = ΔW H (per head for a 3-D H), [O, I]."""
        if self.H.dim() == 2:
            return dw @ self.H
        return torch.bmm(self._per_head(dw), self.H).view(self.O, self.I)

    def backprop(self, P: torch.Tensor) -> torch.Tensor:
        """Half the gradient d loss / d ΔW given P = ΔW H: P itself (reused in place), or G_h P_h."""
        if self.G is None:
            return P
        return torch.bmm(self.G, self._per_head(P)).view(self.O, self.I)

    def value(self, dw: torch.Tensor, P: torch.Tensor | None = None) -> float:
        P = self.product(dw) if P is None else P
        if self.G is None:
            return float(torch.dot(P.flatten(), dw.flatten()))
        return float((torch.bmm(self._per_head(P), self._per_head(dw).transpose(1, 2)) * self.G).sum())


class Objective:
    """The LLR loss as a function of V, with its gradient written out (see the module doc). Constant factors
    (2 from the quadratic, ζ - γ from h) are folded into precomputed tensors, so that an iteration is one
    matmul and about twenty elementwise passes. h and the soft weights are the SoftRounding's (rounding/soft.py),
    the same path that block reconstruction differentiates with autograd."""

    def __init__(self, W: torch.Tensor, soft: SoftRounding, loss: QuadraticLoss, cfg: LLRConfig):
        self.W, self.sr, self.br, self.loss, self.cfg = W, soft, soft.bracket, loss, cfg
        self.span = soft.span

    def init_v(self) -> torch.Tensor:
        return self.sr.init_v()

    def grad(self, V: torch.Tensor, beta: float | None, want_value: bool = False):
        """(d total / d V, reconstruction loss, regulariser); the losses only with want_value.
        beta None: warm-up, regulariser off."""
        h, sig, h_lin = self.sr.h(V)
        soft, coef = self.sr.soft(h)
        dw = soft.sub_(self.W)
        P = self.loss.product(dw)
        rec = self.loss.value(dw, P) if want_value else None
        g = self.loss.backprop(P).mul_(coef)                        # d rec / d h, times ζ - γ
        reg = 0.0
        if beta is not None:
            lam = self.cfg.reg_weight
            t = h.mul_(2).sub_(1)                                    # 2h - 1 (h is not needed any more)
            if beta == 2:                                            # x = |t|^(β-1) sign(t)
                x = t
            elif beta > 2:                                           # t |t|^(β-2): log/exp beat pow 2x
                x = t.abs().log_().mul_(beta - 2).exp_().mul_(t)
            else:
                x = t.abs().pow_(beta - 1).mul_(torch.sign(t))
            if want_value:
                reg = lam * float((1 - x * t).sum())
            g.add_(x, alpha=-2 * beta * lam * self.span)            # d/dh of -λ|2h-1|^β, times ζ - γ
        g = torch.ops.aten.hardtanh_backward(g, h_lin, 0.0, 1.0)    # no gradient where h is clamped
        return torch.ops.aten.sigmoid_backward(g, sig), rec, reg    # times sigmoid'(V)

    def hard_codes(self, V: torch.Tensor) -> torch.Tensor:
        return self.br.hard_codes(V >= 0)


def _adam(V: torch.Tensor, lr: float) -> torch.optim.Adam:
    """Adam on V; the fused kernel (one pass, CPU and CUDA) where this torch has it for V's device."""
    try:
        return torch.optim.Adam([V], lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam([V], lr=lr)


@torch.no_grad()
def learned_rounding(w: torch.Tensor, H: torch.Tensor, cb, params, *, source: torch.Tensor | None = None,
                     G: torch.Tensor | None = None, config: LLRConfig = LLRConfig()) -> Rounded:
    """LLR of `w` [O, ...] with fixed codebook parameters and the layer Hessian H [I, I] (damped; dead input
    columns already zeroed in `w`). `source`: the weights to round from (default w; pass `gptq(...).source`
    for GPTQ-then-LLR); the loss is always measured against `w`. `G`: per-head attention factors for q/k.
    Returns weights exactly on the codebook, their codes, and loss samples in `history`."""
    cfg = config
    tables = LayerTables(w, cb, params)
    W = weight_matrix(w)
    src = W if source is None else weight_matrix(source).to(W.device)
    if src.shape != W.shape:
        raise LogartError(f"the source weight has shape {tuple(source.shape)}, the weight {tuple(w.shape)}.",
                          "pass the GPTQ-updated weight of this same layer as source.")
    O, I = W.shape
    loss = QuadraticLoss(H, O, I, W.device, G)
    soft = SoftRounding(tables, src, cb.log_rows(params), cfg.zero_segment_for(cb.spec), cfg.gamma, cfg.zeta)
    soft.bracket.align(tables, weight_matrix(cb.fake_quant(src.reshape(w.shape), params)))
    obj = Objective(W, soft, loss, cfg)
    V = obj.init_v()
    opt = _adam(V, cfg.lr)
    history = []
    for it in range(cfg.iters):
        record = cfg.record_every > 0 and it % cfg.record_every == 0
        g, rec, reg = obj.grad(V, cfg.beta(it), want_value=record)
        if record:
            history.append((it, rec, reg, loss.value(tables.decode(obj.hard_codes(V)) - W)))
        V.grad = g
        opt.param_groups[0]["lr"] = cfg.lr_at(it)                  # cosine annealing to lr_min_ratio * lr
        opt.step()
    codes = tables.canonical(obj.hard_codes(V))
    weight = tables.decode(codes)
    final = loss.value(weight - W)
    history.append((cfg.iters, final, 0.0, final))
    info = {"loss": final, "config": cfg.to_dict()}
    return Rounded(weight=weight.reshape(w.shape), codes=codes.reshape(w.shape), history=history, info=info)
