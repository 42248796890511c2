"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2; Finkelstein et al. 2019): after a
block's weights are rounded, each site's bias absorbs the mean shift of its output, per output channel, so that
the quantized block's output has the full-precision network's mean on the calibration data.

Why it matters: rounding errors that do not average out over a kernel shift the output by Σ δw · E[x]. A kernel
whose taps cancel (an edge detector: Σ w ≈ 0) on an input with a large mean turns a small relative weight error
into a large output error, which a following BatchNorm (folded into the weights) has scaled up. On ImageNet
MobileNetV2 one depthwise layer does this; its shift is almost all mean, and the bias removes it
(docs/RESULTS.md, twelfth session).

The sites are corrected one after another in forward order, each measured with the sites before it already
corrected, against the full-precision block on the full-precision network's inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from logart.calib.hooks import StopForward


def _channel_dim(module: nn.Module) -> int:
    """Convolutions put output channels at dim 1 ([N, C, ...]); linear layers last ([..., C])."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


@torch.no_grad()
def output_means(run, modules: dict[str, nn.Module], inputs: torch.Tensor, batch: int) -> dict:
    """{name: the mean of the module's output per output channel} over `inputs`, running `run` batch by batch
    and stopping each forward once every module has produced its output."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)

    def hook(name):
        def on_output(module, _args, y):
            dim = _channel_dim(module) % y.dim()
            y = y.detach().float()
            s = y.sum(dim=[d for d in range(y.dim()) if d != dim])
            sums[name] = sums[name] + s if name in sums else s
            counts[name] += y.numel() // y.shape[dim]
            pending.discard(name)
            if not pending:
                raise StopForward
        return on_output

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for i in range(0, inputs.shape[0], batch):
            pending = set(modules)
            try:
                run(inputs[i:i + batch])
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def correct_biases(run, fp_run, sites: dict[str, nn.Module], fp_sites: dict[str, nn.Module], inputs: torch.Tensor,
                   fp_inputs: torch.Tensor, batch: int = 1) -> dict[str, float]:
    """Shift the bias of every site of `sites` ({name: module, forward order}) that has one by the full-precision
    output mean (`fp_sites`, run by `fp_run` on `fp_inputs`) minus its own (run by `run` on `inputs`), `batch`
    inputs per forward.
    Returns {name: the largest |shift| relative to the largest |bias|} of the corrected sites."""
    with_bias = {n: m for n, m in sites.items() if getattr(m, "bias", None) is not None}
    if not with_bias:
        return {}
    targets = output_means(fp_run, {n: fp_sites[n] for n in with_bias}, fp_inputs, batch)
    shifts = {}
    for name, module in with_bias.items():
        if name not in targets:   # never called by the block: nothing to measure
            continue
        mean = output_means(run, {name: module}, inputs, batch)[name]
        shift = (targets[name] - mean).to(module.bias.dtype)
        module.bias.add_(shift)
        shifts[name] = float(shift.abs().max() / module.bias.abs().max().clamp_min(1e-12))
    return shifts
