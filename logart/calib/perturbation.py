"""The perturbation Hessian of a block's output (APHQ-ViT, the original ViT pipeline's `hessian_perturb` loss;
spec §6): how much each element of the block's output matters to the network's prediction.

On the full-precision network, with T = 20 and p = softmax(f(x) / T) the unperturbed prediction:

    g+ = d KL(p ‖ softmax(f(x; out + ε) / T)) / d out      the block's output shifted by +ε everywhere
    g- = the same with -ε
    weight = |g+ - g-|  ≈ 2ε |H·1|, averaged over the samples (`use_mean_hessian`) and scaled to mean 1

so that the reconstruction loss Σ weight · (y_q - y_fp)² stays on the scale of the plain MSE. ε is 1e-3, not
the original's 1e-6: in float32 a 1e-6 shift leaves gradients at the level of rounding noise.
"""

from __future__ import annotations

import torch
from torch import nn

EPSILON = 1e-3
TEMPERATURE = 20.0


def _gradient(model: nn.Module, module: nn.Module, x: torch.Tensor, target: torch.Tensor, shift: float) -> torch.Tensor:
    held = {}

    def hook(_m, _args, out):
        delta = torch.full_like(out, shift, requires_grad=True)
        held["delta"] = delta
        return out + delta

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            loss = nn.functional.kl_div(torch.log_softmax(logits / TEMPERATURE, -1), target, reduction="batchmean")
            (grad,) = torch.autograd.grad(loss, held["delta"])
    finally:
        handle.remove()
    return grad


def perturbation_weights(model: nn.Module, module: nn.Module, data: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """[1, *output shape of one sample]: the mean |g+ - g-| of `module`'s output in `model` over `data`, scaled to
    mean 1."""
    total, count = None, 0
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for i in range(0, data.shape[0], batch):
            x = data[i:i + batch]
            with torch.no_grad():
                target = torch.softmax(model(x) / TEMPERATURE, -1)
            g = (_gradient(model, module, x, target, EPSILON) - _gradient(model, module, x, target, -EPSILON)).abs()
            part = g.sum(0, keepdim=True)
            total = part if total is None else total + part
            count += x.shape[0]
    finally:
        for p in frozen:
            p.requires_grad_(True)
    weights = total / count
    return weights / weights.mean().clamp(min=1e-30)
