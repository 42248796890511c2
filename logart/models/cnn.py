"""The adapter for convolutional networks (any `nn.Module` of Conv2d / Linear layers; torchvision ResNet and
MobileNetV2 style). Minimal: BatchNorm folding, generic block discovery, conv and linear weight sites.

    prepare   folds every BatchNorm2d that directly follows a Conv2d (the BatchNorm's input *is* the conv's
              output in one traced forward of `example`) into that conv: w' = w γ/σ, b' = (b - μ) γ/σ + β,
              σ = sqrt(var + eps); the BatchNorm becomes an Identity. Exact in eval mode.
    plan      reconstruction blocks in execution order: a child module holding several weight layers that is not
              a plain container (a residual block, an inverted residual) is one block; plain containers
              (nn.Sequential, nn.ModuleList) holding several are opened; a child with one weight layer (a bare
              conv or linear, or torchvision's conv-BN-ReLU Sequential) is a one-site block. Every block is
              captured from the model itself (pooling and flattening sit between blocks).
    fusion    a bare conv / linear whose output goes straight into a ReLU / ReLU6 / ... module (ResNet's stem:
              conv1 -> bn1 -> relu, found in the same traced forward, the folded BatchNorm being an Identity that
              passes the tensor through) gets that module as its block's `output_act`: reconstruction then
              matches the block's output after its activation, as the original does.
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
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU)


def _weight_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, WEIGHT_LAYERS)]


@torch.no_grad()
def direct_consumers(model: nn.Module, producers: dict, consumer, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """(producer name, consumer module) for every module of the model matching `consumer` (a predicate) whose
    input is the very output tensor of one of `producers` ({name: module}), found in one forward of `example`.
    Modules that return their input unchanged (Identity, an in-place ReLU) keep the tensor the same object."""
    outputs, pairs, handles = {}, [], []
    names = {m: n for n, m in producers.items()}

    def record(m, _args, out):
        outputs[id(out)] = (names[m], out)   # holding `out` keeps its id unique during the forward

    def check(m, args):
        hit = outputs.get(id(args[0]))
        if hit is not None and hit[1] is args[0]:
            pairs.append((hit[0], m))

    handles = [m.register_forward_hook(record) for m in producers.values()]
    handles += [m.register_forward_pre_hook(check) for m in model.modules() if consumer(m)]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return pairs


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) for every BatchNorm2d fed directly by a Conv2d."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    names = {m: n for n, m in model.named_modules()}
    return [(c, names[bn]) for c, bn in
            direct_consumers(model, convs, lambda m: isinstance(m, nn.BatchNorm2d), example)]


def following_activations(model: nn.Module, modules: dict, example: torch.Tensor) -> dict:
    """{name: activation module} for each of `modules` whose output goes straight into an activation module."""
    found = {}
    for name, act in direct_consumers(model, modules, lambda m: isinstance(m, ACTIVATIONS), example):
        found.setdefault(name, act)
    return found


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
        if len(layers) == 1 or not isinstance(child, (nn.Sequential, nn.ModuleList)):
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
    captures_fp: bool = True   # reconstruction targets from a full-precision copy of the network (calib/driver.py)
    # Convolutions run in channels-last memory order: on MobileNetV2's blocks (batch 32, 2 cores) a reconstruction
    # iteration took 1.44 s instead of 2.32 s (bench/cnn_speed.py). Only the layout changes, never a value.
    memory_format: torch.memory_format = torch.channels_last

    def prepare(self, model: nn.Module) -> None:
        fold_batchnorm(model, self.example)
        model.to(memory_format=self.memory_format)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of block inputs in the adapter's memory order (reconstruction batches are gathered rows)."""
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def plan(self, model: nn.Module) -> list[Block]:
        found = find_blocks(model)
        if not found:
            raise LogartError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize.",
                              "pass a convolutional network.")
        fused = following_activations(model, dict(_weight_layers(model)), self.example)
        blocks = []
        for name, module in found:
            layers = [(name, module)] if isinstance(module, WEIGHT_LAYERS) else \
                [(f"{name}.{n}" if n else name, m) for n, m in _weight_layers(module)]
            acts = [ActSite(n, m, "conv-input" if isinstance(m, nn.Conv2d) else "linear-input") for n, m in layers]
            sites = [WeightSite(n, m, act=fused.get(n)) for n, m in layers]
            # `fused` names weight layers only, so only a bare conv / linear block gets an output activation
            blocks.append(Block(name, module, sites, chained=False, act_sites=acts, output_act=fused.get(name)))
        return blocks
