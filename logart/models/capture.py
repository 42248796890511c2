"""Input capture for models called on plain tensors (CNNs, timm ViTs): run each batch of `data` through the model
only as far as one module and keep what that module receives."""

from __future__ import annotations

import torch
from torch import nn

from logart.calib.hooks import StopForward
from logart.models.adapter import Block, BlockInputs


@torch.no_grad()
def capture_inputs(model: nn.Module, module: nn.Module, data: torch.Tensor, batch_size: int = 32) -> BlockInputs:
    """The first positional input of `module` for every sample of `data` [N, ...], fp32 on the CPU. The forward
    stops at `module`: nothing after it is computed."""
    seen = []

    def hook(_m, args):
        seen.append(args[0].detach().float().cpu())
        raise StopForward

    device = next(model.parameters()).device
    handle = module.register_forward_pre_hook(hook)
    try:
        for start in range(0, data.shape[0], batch_size):
            try:
                model(data[start:start + batch_size].to(device))
            except StopForward:
                pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the module was never called by the model's forward")
    return BlockInputs(torch.cat(seen))


class CalledOnTensors:
    """The adapter methods shared by models called on one plain tensor (CNNs, timm ViTs): blocks are captured by
    running the model up to them and run as `block(x)`; no separate query / key sites. Needs `batch_size`."""

    def capture(self, model: nn.Module, block: Block, data: torch.Tensor) -> BlockInputs:
        return capture_inputs(model, block.module, data, self.batch_size)

    def run(self, block: Block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        y = block.module(x, **kwargs)
        return block.output_act(y) if block.output_act is not None else y

    def attention(self, block: Block, kwargs: dict):
        return None
