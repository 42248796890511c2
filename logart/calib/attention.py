"""Attention-aware factors G for the q and k projections (spec §4.4), RoPE-aware through the model's own cos/sin.

An error ΔW_q in the query projection matters through the attention scores q_t·k_s, so LLR weighs it per head
with the keys' second moment: loss_q = Σ_h tr(G_h ΔW_h H ΔW_hᵀ) with G_q,h = C_K,h, and symmetrically G_k = C_Q
(C = (2/N) Σ_t y_t y_tᵀ of the projection outputs y, per head). With rotary embeddings the scores see the
rotated vectors R_t q_t and R_s k_s, so C is taken after rotation and mapped back to the projection's output
space by averaging over positions: G = mean_t R_tᵀ C R_t.

The rotation (cos, sin) comes from the adapter, which reads it from what the model itself computed (Hugging Face
blocks: their `position_embeddings`), so every `rope_scaling` variant (linear, dynamic, yarn, llama3) is
honoured; the original code rebuilt R_t from `rope_theta` and ignored the scaling (spec Q16). With R_t = diag(cos_t) + diag(sin_t)·P (P: HF's rotate_half),
mean_t R_tᵀ C R_t expands into four Hadamard products of C with position averages of cos/sin outer products:
exact, and no [T, d, d] tensor is ever built.

Grouped-query attention: C_Q is averaged over each group of query heads (for G_k) and C_K repeated over the
group (for G_q), as in the original.
"""

from __future__ import annotations

import torch



def rotate_half_matrix(d: int, dtype=torch.float32) -> torch.Tensor:
    """P with P @ v == rotate_half(v) = cat(-v[d/2:], v[:d/2]) (the Hugging Face convention)."""
    h = d // 2
    P = torch.zeros(d, d, dtype=dtype)
    P[torch.arange(h), torch.arange(h) + h] = -1.0
    P[torch.arange(h) + h, torch.arange(h)] = 1.0
    return P


def rotate(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R_t y_t for y [..., T, d] and cos/sin [T, d]: y·cos + rotate_half(y)·sin."""
    h = y.shape[-1] // 2
    return y * cos + torch.cat((-y[..., h:], y[..., :h]), dim=-1) * sin


def unrotate_mean(C: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """mean_t R_tᵀ C R_t for C [heads, d, d] and cos/sin [T, d], exactly, via position-averaged outer products."""
    cos, sin = cos.double(), sin.double()
    T = cos.shape[0]
    Mcc, Mcs, Mss = cos.T @ cos / T, cos.T @ sin / T, sin.T @ sin / T   # [d, d]: mean_t a_t,i b_t,j
    P = rotate_half_matrix(C.shape[-1], torch.float64)
    C = C.double()
    G = C * Mcc + (C * Mcs) @ P + P.T @ (C * Mcs.T) + P.T @ (C * Mss) @ P
    return G.float()


class QKMoments:
    """Accumulates the per-head second moments of q_proj and k_proj outputs over calibration tokens."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None):
        self.heads, self.kv_heads, self.d = heads, kv_heads, head_dim
        self.cos = None if cos is None else cos.reshape(-1, head_dim).float()
        self.sin = None if sin is None else sin.reshape(-1, head_dim).float()
        self.C = {"q": torch.zeros(heads, head_dim, head_dim), "k": torch.zeros(kv_heads, head_dim, head_dim)}
        self.n = {"q": 0, "k": 0}

    def add(self, which: str, y: torch.Tensor) -> None:
        """`y` [1, T, heads * head_dim]: one window's q_proj (which='q') or k_proj ('k') output."""
        n_heads = self.heads if which == "q" else self.kv_heads
        y = y.detach().float().reshape(-1, n_heads, self.d).transpose(0, 1)      # [heads, T, d]
        if self.cos is not None:
            y = rotate(y, self.cos[-y.shape[1]:], self.sin[-y.shape[1]:])
        self.C[which] += torch.einsum("hti,htj->hij", y, y)
        self.n[which] += y.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_q [heads, d, d], G_k [kv_heads, d, d]) in the projections' output spaces."""
        Cq = 2 * self.C["q"] / max(self.n["q"], 1)
        Ck = 2 * self.C["k"] / max(self.n["k"], 1)
        group = self.heads // self.kv_heads
        Gq = Ck.repeat_interleave(group, dim=0)                      # each query head sees its group's keys
        Gk = Cq.reshape(self.kv_heads, group, self.d, self.d).mean(1)  # each key head serves a group of queries
        if self.cos is not None:
            Gq, Gk = unrotate_mean(Gq, self.cos, self.sin), unrotate_mean(Gk, self.cos, self.sin)
        return Gq, Gk


class AttentionObserver:
    """Hooks on a block's q/k projections that gather QKMoments during the statistics pass; `factors()` then
    gives {full site name: G} for the two projections. `attention`: the adapter's `AttentionSites`; `modules`:
    {site name: module} of the block."""

    def __init__(self, attention, modules: dict):
        self.attention = attention
        self.moments = QKMoments(attention.heads, attention.kv_heads, attention.head_dim, attention.cos, attention.sin)
        self.modules = {"q": modules[attention.query], "k": modules[attention.key]}

    def hooks(self) -> list:
        """[(module, forward hook)] to register for the pass over the calibration windows."""
        def observe(which):
            def hook(_m, _args, out):
                self.moments.add(which, out)
            return hook
        return [(self.modules[w], observe(w)) for w in ("q", "k")]

    def factors(self) -> dict[str, torch.Tensor]:
        Gq, Gk = self.moments.factors()
        return {self.attention.query: Gq, self.attention.key: Gk}
