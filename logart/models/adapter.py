"""The adapter protocol: everything the engine needs to know about an architecture, and nothing else.

    adapter.prepare(model)               once, before anything else (fold BatchNorm, untie an opted-in head...)
    adapter.plan(model)                  the model as an ordered list of `Block`s, ends included: an embedding,
                                         stem, head or classifier is a one-site block
    adapter.capture(model, block, data)  `BlockInputs` of a block: what it receives when `data` runs through the
                                         model as it is now (quantized up to that block)
    adapter.run(block, x, kwargs)        the block's output for a batch of its inputs
    adapter.attention(block, kwargs)     the query / key sites and head geometry (for attention-aware rounding),
                                         or None

A chained block's inputs are the previous chained block's outputs (decoder and ViT blocks follow each other
directly), so the driver captures the first one and propagates; every other block is captured from the model
itself (a CNN has pooling between its stages, a head follows the final norm). Activation sites (post-softmax,
post-GELU...) are listed by `Block.act_sites` for the activation quantizers.

Implementations: models/hf_causal.py (Hugging Face decoder LMs), models/cnn.py, models/vit.py (timm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from logart.models.sites import WeightSite


@dataclass
class BlockInputs:
    """What a block receives: `hidden` (one row per calibration sample, fp32, on the CPU) and the keyword
    arguments of its call (attention mask, positions; the same for every sample)."""

    hidden: torch.Tensor
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ActSite:
    """An activation the model could quantize: the input of `module` (or, with `output=True`, its output, or one
    slice of it)."""

    name: str
    module: nn.Module
    kind: str            # "post-softmax", "post-gelu", "post-layernorm", "matmul", "conv-input", ...
    output: bool = False
    chunk: tuple[int, int] | None = None   # (i, n): only the i-th of n equal slices of the last dimension (v of qkv)
    partner: str | None = None             # the site this one is multiplied with (post-softmax: v), for its error
    norm: nn.Module | None = None          # the LayerNorm whose output this input is, when nothing else reads it
                                           # (pre-LN blocks): what a per-channel reparameterization may rescale


@dataclass(eq=False)
class Block:
    name: str                      # full module name ("model.layers.3", "lm_head")
    module: nn.Module
    sites: list[WeightSite]
    chained: bool = True           # inputs = the previous chained block's outputs
    act_sites: list[ActSite] = field(default_factory=list)
    output_act: nn.Module | None = None   # an activation applied to the block's output (a ReLU after a bare conv)


@dataclass(frozen=True)
class AttentionSites:
    """Where a block's queries and keys come from, for attention-aware rounding (spec §4.4). cos / sin
    [T, head_dim]: the rotary embedding the block applies (None without one)."""

    query: str           # full site names
    key: str
    heads: int
    kv_heads: int
    head_dim: int
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class Adapter(Protocol):
    family: str

    def prepare(self, model: nn.Module) -> None: ...

    def plan(self, model: nn.Module) -> list[Block]: ...

    def capture(self, model: nn.Module, block: Block, data) -> BlockInputs: ...

    def run(self, block: Block, x: torch.Tensor, kwargs: dict) -> torch.Tensor: ...

    def attention(self, block: Block, kwargs: dict) -> AttentionSites | None: ...
