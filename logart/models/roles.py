"""What a linear layer does inside a block, from its name alone (architecture knowledge lives in models/)."""

from __future__ import annotations

import re

# The projections that produce attention queries, keys and values (separate or fused), across HF families.
_QKV = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|query|key|value|query_key_value|c_attn|Wqkv)$")


def is_qkv(name: str) -> bool:
    """True for q/k/v projections: LLR weights their rounding regulariser differently (spec §3.3)."""
    return bool(_QKV.search(name))
