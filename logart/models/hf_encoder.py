"""The adapter for Hugging Face text encoders of the BERT family (BertModel and its task heads, RoBERTa-style
layouts with `attention.self.query/key/value`): the encoder layers as chained blocks, with the same activation
sites as a ViT block.

    plan   every `encoder.layer.i` (chained; inputs captured with the attention mask every layer takes)
    acts   the post-LayerNorm input of the self-attention (what query, key and value read), the attention
           output (attention.output.dense's input), the post-GELU input of output.dense, and both attention
           products' inputs: q, k, v and the post-softmax probabilities

transformers computes attention in a function, not in modules, so `prepare` switches the model to logart's own
eager attention function (registered with transformers' AttentionInterface): the same arithmetic as
transformers' eager path, passing q, k, v and the probabilities through identity modules it adds to each
self-attention (`logart_q`, `logart_k`, `logart_v`, `logart_probs`), where quantizers can hook them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from logart.errors import LogartError
from logart.models.adapter import ActSite, Block, BlockInputs
from logart.models.decoder import block_output, capture_block_inputs
from logart.models.sites import WeightSite

ATTENTION = "logart_eager"
ROLES = ("query", "key", "value")   # the leaf names that are also weight roles


def logart_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """transformers' eager attention, with hookable identities on its matrix-product inputs."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    query, key, value = module.logart_q(query), module.logart_k(key), module.logart_v(value)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = module.logart_probs(nn.functional.softmax(weights, dim=-1))
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, layers) of a BERT-style encoder (`encoder.layer.i` with `attention.self.query`), or None."""
    for name, module in model.named_modules():
        if name.endswith("encoder.layer") and isinstance(module, nn.ModuleList) and len(module) and all(
                hasattr(getattr(getattr(m, "attention", None), "self", None), "query") for m in module):
            return name, module
    return None


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = encoder_layers(model)
    if found is not None:
        return found
    raise LogartError(f"{type(model).__name__} has no BERT-style encoder layers (encoder.layer.i with "
                      "attention.self.query).", "pass a BertModel or another BERT-family encoder.")


def _act_sites(name: str, layer: nn.Module) -> list[ActSite]:
    attn = layer.attention.self
    return [ActSite(f"{name}.attention.self", attn, "post-layernorm"),
            ActSite(f"{name}.attention.output.dense", layer.attention.output.dense, "attention-output"),
            ActSite(f"{name}.output.dense", layer.output.dense, "post-gelu"),
            ActSite(f"{name}.attention.self.logart_q", attn.logart_q, "matmul", output=True),
            ActSite(f"{name}.attention.self.logart_k", attn.logart_k, "matmul", output=True),
            ActSite(f"{name}.attention.self.logart_v", attn.logart_v, "matmul", output=True),
            ActSite(f"{name}.attention.self.logart_probs", attn.logart_probs, "post-softmax",
                    partner=f"{name}.attention.self.logart_v")]


@dataclass
class HFEncoder:
    family: str = "encoder"
    batch_size: int = 1

    def prepare(self, model: nn.Module) -> None:
        from transformers import AttentionInterface

        _, layers = _layers(model)
        AttentionInterface.register(ATTENTION, logart_eager_attention)
        for layer in layers:
            attn = layer.attention.self
            for part in ("logart_q", "logart_k", "logart_v", "logart_probs"):
                if not hasattr(attn, part):
                    attn.add_module(part, nn.Identity())
        for module in model.modules():   # every config object the layers read their attention choice from
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = ATTENTION

    def plan(self, model: nn.Module) -> list[Block]:
        prefix, layers = _layers(model)
        plan = []
        for i, layer in enumerate(layers):
            name = f"{prefix}.{i}"
            sites = [WeightSite(f"{name}.{n}", m, leaf if (leaf := n.rsplit(".", 1)[-1]) in ROLES else "plain")
                     for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            acts = _act_sites(name, layer) if hasattr(layer.attention.self, "logart_q") else []
            plan.append(Block(name, layer, sites, act_sites=acts))
        return plan

    def capture(self, model: nn.Module, block: Block, data: torch.Tensor) -> BlockInputs:
        return capture_block_inputs(model, data, block.module)

    def run(self, block: Block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return block_output(block.module(x, **kwargs))

    def attention(self, block: Block, kwargs: dict):
        return None
