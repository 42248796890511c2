"""What a linear layer does inside a block: its role from its name, and the head layout of the attention
(architecture knowledge lives in models/)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from logart.errors import LogartError

# The projections that produce attention queries, keys and values (separate or fused), across HF families.
_QKV = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|query|key|value|query_key_value|c_attn|Wqkv)$")


_ROLE_OF = {"q_proj": "query", "query": "query", "k_proj": "key", "key": "key", "v_proj": "value", "value": "value"}


def is_qkv(name: str) -> bool:
    """True for q/k/v projections: LLR weights their rounding regulariser differently (spec §3.3)."""
    return bool(_QKV.search(name))


def role_of(name: str) -> str:
    """The weight role of a linear layer from its name: query, key, value, qkv (fused) or plain."""
    m = _QKV.search(name)
    return "plain" if m is None else _ROLE_OF.get(m.group(2), "qkv")


def block_rope(kwargs: dict, head_dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (cos, sin) [T, head_dim] a Hugging Face block applies to its queries and keys, from the
    `position_embeddings` it is called with; (None, None) for models without rotary embeddings (OPT). Partial
    rotary embeddings (Phi) rotate only part of each head, which attention-aware factors do not model: a clear
    error instead of a wrong G."""
    pe = kwargs.get("position_embeddings")
    if pe is None:
        return None, None
    cos, sin = pe
    if cos.shape[-1] != head_dim:
        raise LogartError(f"the attention rotates {cos.shape[-1]} of {head_dim} dimensions per head (partial rotary "
                          "embeddings); attention-aware rounding does not model that.",
                          "run without --attention-aware for this model.")
    return cos.reshape(-1, head_dim), sin.reshape(-1, head_dim)


@dataclass(frozen=True)
class AttentionLayout:
    """Where a block's query and key projections are and how their outputs split into heads."""

    query: str       # block-relative name of the query projection (e.g. "self_attn.q_proj")
    key: str
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool = False   # per-head norms between the projections and the scores (Qwen3, OLMo2, Gemma3)


def attention_layout(block: nn.Module) -> AttentionLayout | None:
    """The separate q/k projections of a block's attention and its head geometry, or None where there are none
    (fused qkv projections). The head size is the attention module's `head_dim`; the head counts follow from the
    projections' output sizes, so grouped-query attention needs no config lookup."""
    for path, module in block.named_modules():
        q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            d = getattr(module, "head_dim", None)
            if not isinstance(d, int) or q.out_features % d or k.out_features % d:
                return None
            prefix = f"{path}." if path else ""
            norms = any(hasattr(module, n) for n in ("q_norm", "k_norm"))
            return AttentionLayout(f"{prefix}q_proj", f"{prefix}k_proj", q.out_features // d, k.out_features // d, d,
                                   norms)
    return None
