"""The adapter for timm Vision Transformers (ViT, DeiT). Minimal: patch embedding, the chained transformer blocks
and the head as weight sites, and the activation sites of each block.

    plan   patch embedding (its conv: a one-site block, captured) + `model.blocks` (chained: each block's input
           is the previous block's output) + the head (captured after the final norm and the pooling)
    acts   per block: the post-LayerNorm inputs of qkv and fc1, the post-softmax attention (the input of
           `attn_drop`, which exists once `prepare` switches timm's fused attention off), the post-GELU input of
           fc2; q and k before their product (outputs of `q_norm` / `k_norm`, identities unless qk-norm is on)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from logart.errors import LogartError
from logart.models.adapter import ActSite, Block
from logart.models.capture import CalledOnTensors
from logart.models.sites import WeightSite


def _role(name: str) -> str:
    return "qkv" if name.endswith("attn.qkv") else "plain"


def _act_sites(name: str, block: nn.Module) -> list[ActSite]:
    attn, mlp = block.attn, block.mlp
    sites = [ActSite(f"{name}.attn.qkv", attn.qkv, "post-layernorm"),
             ActSite(f"{name}.mlp.fc1", mlp.fc1, "post-layernorm"),
             ActSite(f"{name}.mlp.fc2", mlp.fc2, "post-gelu"),
             ActSite(f"{name}.attn.proj", attn.proj, "attention-output")]
    if hasattr(attn, "attn_drop"):
        sites.append(ActSite(f"{name}.attn.attn_drop", attn.attn_drop, "post-softmax"))
    for part in ("q_norm", "k_norm"):
        if hasattr(attn, part):
            sites.append(ActSite(f"{name}.attn.{part}", getattr(attn, part), "matmul", output=True))
    return sites


@dataclass
class TimmViT(CalledOnTensors):
    batch_size: int = 32
    family: str = "vit"

    def prepare(self, model: nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, "fused_attn"):   # the explicit softmax path: post-softmax is a hookable tensor
                module.fused_attn = False

    def plan(self, model: nn.Module) -> list[Block]:
        blocks = getattr(model, "blocks", None)
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if not isinstance(blocks, nn.Sequential) or not isinstance(proj, nn.Conv2d):
            raise LogartError(f"{type(model).__name__} is not a timm VisionTransformer (no patch_embed.proj conv and "
                              "blocks).", "pass a timm ViT or DeiT model.")
        plan = [Block("patch_embed.proj", proj, [WeightSite("patch_embed.proj", proj)], chained=False)]
        for i, block in enumerate(blocks):
            name = f"blocks.{i}"
            sites = [WeightSite(f"{name}.{n}", m, _role(n)) for n, m in block.named_modules()
                     if isinstance(m, nn.Linear)]
            plan.append(Block(name, block, sites, act_sites=_act_sites(name, block)))
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear):
            plan.append(Block("head", head, [WeightSite("head", head)], chained=False))
        return plan
