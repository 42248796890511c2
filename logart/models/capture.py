"""Input capture for models called on plain tensors (CNNs, timm ViTs): run each batch of `data` through the model
only as far as one module and keep what that module receives."""

from __future__ import annotations

import torch
from torch import nn

from logart.calib.hooks import StopForward
from logart.models.adapter import Block, BlockInputs


@torch.no_grad()
def capture_inputs(model: nn.Module, module: nn.Module, data: torch.Tensor, batch_size: int = 32,
                   dtype: torch.dtype = torch.float32) -> BlockInputs:
    """The first positional input of `module` for every sample of `data` [N, ...], on the CPU in `dtype`. The
    forward stops at `module`: nothing after it is computed. Written into one tensor as the batches come, so the
    cache never exists twice."""
    out = None
    start = 0

    def hook(_m, args):
        nonlocal out
        x = args[0].detach()
        if out is None:
            out = torch.empty((data.shape[0], *x.shape[1:]), dtype=dtype)
        out[start:start + x.shape[0]] = x.to("cpu", dtype)
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
    if out is None:
        raise RuntimeError("the module was never called by the model's forward")
    return BlockInputs(out)


class CalledOnTensors:
    """The adapter methods shared by models called on one plain tensor (CNNs, timm ViTs): blocks are captured by
    running the model up to them and run as `block(x)`; no separate query / key sites. Needs `batch_size`.

    `cache_dtype`: the precision of the cached block inputs. float16 halves the calibration cache (the inputs of
    a block, the full-precision network's and the reconstruction targets are each one copy per calibration
    image), which lets a CNN calibrate on four times the images in the same memory; every batch is computed in
    float32 (`run` casts it back)."""

    cache_dtype = torch.float32

    def capture(self, model: nn.Module, block: Block, data: torch.Tensor) -> BlockInputs:
        return capture_inputs(model, block.module, data, self.batch_size, self.cache_dtype)

    def run(self, block: Block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if x.dtype == self.cache_dtype:   # a no-op for the float32 cache
            x = x.float()
        y = block.module(x, **kwargs)
        return block.output_act(y) if block.output_act is not None else y

    def attention(self, block: Block, kwargs: dict):
        return None
