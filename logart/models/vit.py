"""The adapter for timm Vision Transformers: ViT and DeiT (`model.blocks`) and Swin (`model.layers`: stages of
a patch merging and window-attention blocks).

    plan   patch embedding (its conv: a one-site block, captured), then the chained units in order (each one's
           input is the previous one's output): the transformer blocks and, in Swin, each stage's patch merging
           (its `reduction` linear); then the head (`head` or `head.fc`, captured after the final norm and pooling)
    acts   per transformer block: the post-LayerNorm inputs of qkv and fc1, the attention output (proj's input),
           the post-GELU input of fc2, the inputs of both attention products: q and k (outputs of `q_norm` /
           `k_norm`, identities unless qk-norm is on; absent in Swin), v (the last third of qkv's output) and the
           post-softmax attention (the input of `attn_drop`, reached once `prepare` switches timm's fused
           attention off)
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
    norm1, norm2 = (getattr(block, n, None) for n in ("norm1", "norm2"))
    norm1, norm2 = (n if isinstance(n, nn.LayerNorm) and n.elementwise_affine else None for n in (norm1, norm2))
    sites = [ActSite(f"{name}.attn.qkv", attn.qkv, "post-layernorm", norm=norm1),
             ActSite(f"{name}.mlp.fc1", mlp.fc1, "post-layernorm", norm=norm2),
             ActSite(f"{name}.mlp.fc2", mlp.fc2, "post-gelu"),
             ActSite(f"{name}.attn.proj", attn.proj, "attention-output")]
    for i, part in enumerate(("q_norm", "k_norm")):    # q and k, the inputs of q·kT
        if hasattr(attn, part):
            sites.append(ActSite(f"{name}.attn.{part}", getattr(attn, part), "matmul", output=True))
        else:   # Swin: no norms, q and k are the first two thirds of qkv's output
            sites.append(ActSite(f"{name}.attn.{part[0]}", attn.qkv, "matmul", output=True, chunk=(i, 3)))
    # v, the other input of attention x v: the last third of qkv's output
    sites.append(ActSite(f"{name}.attn.v", attn.qkv, "matmul", output=True, chunk=(2, 3)))
    if hasattr(attn, "attn_drop"):
        sites.append(ActSite(f"{name}.attn.attn_drop", attn.attn_drop, "post-softmax", partner=f"{name}.attn.v"))
    return sites


@dataclass
class TimmViT(CalledOnTensors):
    batch_size: int = 32
    family: str = "vit"
    captures_fp: bool = True   # reconstruction targets (and perturbation Hessians) from a full-precision copy

    def prepare(self, model: nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, "fused_attn"):   # the explicit softmax path: post-softmax is a hookable tensor
                module.fused_attn = False

    def plan(self, model: nn.Module) -> list[Block]:
        found = _patch_embed_and_chain(model)
        if found is None:
            raise LogartError(f"{type(model).__name__} is not a timm ViT, DeiT or Swin model (no patch_embed.proj "
                              "conv followed by transformer blocks).", "pass a timm ViT, DeiT or Swin model.")
        proj, units = found
        plan = [Block("patch_embed.proj", proj, [WeightSite("patch_embed.proj", proj)], chained=False)]
        for name, unit in units:
            sites = [WeightSite(f"{name}.{n}", m, _role(n)) for n, m in unit.named_modules() if isinstance(m, nn.Linear)]
            acts = _act_sites(name, unit) if _is_transformer_block(unit) else []
            plan.append(Block(name, unit, sites, act_sites=acts))
        head = getattr(model, "head", None)
        name = "head"
        if not isinstance(head, nn.Linear):                 # Swin's ClassifierHead: pooling, then .fc
            head, name = getattr(head, "fc", None), "head.fc"
        if isinstance(head, nn.Linear):
            plan.append(Block(name, head, [WeightSite(name, head)], chained=False))
        return plan


def is_timm_vit(model: nn.Module) -> bool:
    """A timm ViT, DeiT or Swin: a patch embedding conv followed by transformer blocks (what `plan` takes)."""
    return _patch_embed_and_chain(model) is not None


def _patch_embed_and_chain(model: nn.Module) -> tuple[nn.Conv2d, list[tuple[str, nn.Module]]] | None:
    """(patch embedding conv, chained units) of a timm ViT, DeiT or Swin; None for any other model."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    units = _chain(model) if isinstance(proj, nn.Conv2d) else []
    return (proj, units) if units else None


def _is_transformer_block(m: nn.Module) -> bool:
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(mlp, "fc1", None), nn.Linear)
            and isinstance(getattr(mlp, "fc2", None), nn.Linear))


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the chained units: `blocks` (ViT, DeiT) or each stage's merging and blocks (Swin)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and all(_is_transformer_block(b) for b in blocks):
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    stages = getattr(model, "layers", None)
    if not isinstance(stages, nn.Sequential):
        return []
    units = []
    for i, stage in enumerate(stages):
        merge = getattr(stage, "downsample", None)
        if isinstance(getattr(merge, "reduction", None), nn.Linear):
            units.append((f"layers.{i}.downsample", merge))
        inner = getattr(stage, "blocks", None)
        if not isinstance(inner, nn.Sequential) or not all(_is_transformer_block(b) for b in inner):
            return []
        units += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(inner)]
    return units
