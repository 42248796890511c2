"""Classifier metrics: top-1 accuracy where labels exist, fidelity to the fp32 model where they do not.

    top-1 agreement   % of inputs on which the quantized model's top class is the fp32 model's
    KL                mean over inputs of KL(p_fp32 ‖ p_quantized), in nats
"""

from __future__ import annotations

import torch


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The model's outputs for `x` [N, ...], in batches, fp32 on the CPU. Batches of 32: at 128, MobileNetV2's
    224² activations alone took 1.7 GB, the peak of a whole calibration run; on the CPU 32 is as fast."""
    device = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch].to(device)).float().cpu() for i in range(0, x.shape[0], batch)])


def top1(out: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((out.argmax(1) == labels).float().mean())


def agreement(reference: torch.Tensor, out: torch.Tensor) -> float:
    return 100.0 * float((out.argmax(1) == reference.argmax(1)).float().mean())


def kl(reference: torch.Tensor, out: torch.Tensor) -> float:
    """Mean KL(softmax(reference) ‖ softmax(out))."""
    p_log = torch.log_softmax(reference.double(), 1)
    q_log = torch.log_softmax(out.double(), 1)
    return float((p_log.exp() * (p_log - q_log)).sum(1).mean())


def scores(reference: torch.Tensor, out: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """{top1 (when labelled), top1_fp32, agreement, kl} of quantized outputs against the fp32 ones."""
    row = {"agreement": round(agreement(reference, out), 3), "kl": round(kl(reference, out), 6)}
    if labels is not None:
        row["top1"] = round(top1(out, labels), 3)
        row["top1_fp32"] = round(top1(reference, labels), 3)
    return row
