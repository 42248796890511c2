"""The adapter for convolutional networks (any `nn.Module` of Conv2d / Linear layers; torchvision ResNet and
MobileNetV2 style). Minimal: BatchNorm folding, generic block discovery, conv and linear weight sites.

    prepare   folds every BatchNorm2d that directly follows a Conv2d (the BatchNorm's input *is* the conv's
              output in one traced forward of `example`) into that conv: w' = w γ/σ, b' = (b - μ) γ/σ + β,
              σ = sqrt(var + eps); the BatchNorm becomes an Identity. Exact in eval mode.
    plan      reconstruction blocks in execution order: a child module holding several weight layers that is not
              a plain container (a residual block, an inverted residual) is one block; plain containers
              (nn.Sequential, nn.ModuleList) are opened; a bare conv / linear (stem, classifier) is a one-site
              block. Every block is captured from the model itself (pooling and flattening sit between blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from logart.errors import LogartError
from logart.models.adapter import ActSite, Block
from logart.models.capture import CalledOnTensors
from logart.models.sites import WeightSite

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def _weight_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, WEIGHT_LAYERS)]


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) for every BatchNorm2d fed directly by a Conv2d, found in one forward."""
    outputs, pairs, handles = {}, [], []
    names = {m: n for n, m in model.named_modules()}

    def record_conv(m, _args, out):
        outputs[id(out)] = (names[m], out)   # holding `out` keeps its id unique during the forward

    def check_bn(m, args):
        hit = outputs.get(id(args[0]))
        if hit is not None and hit[1] is args[0]:
            pairs.append((hit[0], names[m]))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(record_conv))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(check_bn))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return pairs


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Fold every BatchNorm2d that follows a Conv2d into it (module doc); returns the folded conv names."""
    if model.training:
        raise LogartError("the model is in training mode: BatchNorm uses batch statistics, so it cannot be folded.",
                          "call model.eval() before quantizing.")
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model, example):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
        _set_module(model, bn_name, nn.Identity())
        folded.append(conv_name)
    return folded


def find_blocks(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Reconstruction blocks in registration order (module doc)."""
    found = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        layers = _weight_layers(child)
        if not layers:
            continue
        if isinstance(child, WEIGHT_LAYERS) or (len(layers) > 1 and not isinstance(child, (nn.Sequential, nn.ModuleList))):
            found.append((full, child))
        else:
            found += find_blocks(child, f"{full}.")
    return found


@dataclass
class CNN(CalledOnTensors):
    """`example`: one input batch (e.g. `data[:2]`), for the BatchNorm trace. `batch_size`: capture batches."""

    example: torch.Tensor
    batch_size: int = 32
    family: str = "cnn"

    def prepare(self, model: nn.Module) -> None:
        fold_batchnorm(model, self.example)

    def plan(self, model: nn.Module) -> list[Block]:
        blocks = []
        for name, module in find_blocks(model):
            layers = [(name, module)] if isinstance(module, WEIGHT_LAYERS) else \
                [(f"{name}.{n}", m) for n, m in _weight_layers(module)]
            acts = [ActSite(n, m, "conv-input" if isinstance(m, nn.Conv2d) else "linear-input") for n, m in layers]
            blocks.append(Block(name, module, [WeightSite(n, m) for n, m in layers], chained=False, act_sites=acts))
        if not blocks:
            raise LogartError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize.",
                              "pass a convolutional network.")
        return blocks
