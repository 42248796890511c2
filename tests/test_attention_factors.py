"""Attention-aware factors: the closed-form position average equals the brute-force one, the rotation is the
Hugging Face one, and grouped-query heads are mapped as in the original."""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from logart.calib.attention import QKMoments, rotate, unrotate_mean


def _cos_sin(T, d, base=10000.0, scale=1.0):
    inv = 1.0 / (base ** (torch.arange(0, d, 2).float() / d)) / scale
    ang = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos(), emb.sin()


def _rotation_matrices(cos, sin):
    d = cos.shape[1]
    eye = torch.eye(d)
    return torch.stack([rotate(eye, c, s).T for c, s in zip(cos, sin)])  # R_t with R_t @ v == rotate(v)


def test_rotation_is_hugging_faces():
    g = torch.Generator().manual_seed(0)
    T, d = 7, 8
    cos, sin = _cos_sin(T, d)
    q, k = torch.randn(1, 2, T, d, generator=g), torch.randn(1, 2, T, d, generator=g)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.allclose(rotate(q, cos, sin), q_hf, atol=1e-6)
    R = _rotation_matrices(cos, sin)
    assert torch.allclose(torch.einsum("tij,htj->hti", R, q[0]), q_hf[0], atol=1e-5)


def test_closed_form_average_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    T, d = 33, 8
    cos, sin = _cos_sin(T, d, scale=4.0)   # a scaled RoPE: the formula does not care where cos/sin come from
    A = torch.randn(3, d, d, generator=g)
    C = A @ A.transpose(1, 2)
    R = _rotation_matrices(cos, sin).double()
    brute = torch.einsum("tji,hjk,tkl->hil", R, C.double(), R) / T   # mean_t R_tᵀ C R_t, one [d, d] per head
    assert torch.allclose(unrotate_mean(C, cos, sin).double(), brute, atol=1e-4)


def test_factors_weight_the_score_error():
    """For a fixed error e in the query projection output, Σ_h eᵀ G_q,h e averaged over positions equals the
    mean squared change of the rotated scores against the rotated keys: what the factor is for."""
    g = torch.Generator().manual_seed(2)
    heads, kv, d, T = 4, 2, 8, 16
    cos, sin = _cos_sin(T, d)
    m = QKMoments(heads, kv, d, cos, sin)
    q, k = torch.randn(1, T, heads * d, generator=g), torch.randn(1, T, kv * d, generator=g)
    m.add("q", q)
    m.add("k", k)
    Gq, Gk = m.factors()
    assert Gq.shape == (heads, d, d) and Gk.shape == (kv, d, d)
    e = torch.randn(heads, d, generator=g)                       # the same output error at every position
    k_rot = rotate(k.reshape(T, kv, d).transpose(0, 1), cos, sin)  # [kv, T, d]
    e_rot = rotate(e[:, None, :].expand(heads, T, d), cos, sin)    # [heads, T, d]: R_t e at each position t
    keys = k_rot.repeat_interleave(heads // kv, dim=0)             # each query head's key head
    # mean over query positions t and key positions s of (R_t e · R_s k_s)², times 2 (H's convention)
    direct = 2 * torch.einsum("htd,hsd->hts", e_rot, keys).pow(2).mean(dim=(1, 2)).sum()
    via_G = torch.einsum("hi,hij,hj->", e, Gq, e)
    assert torch.allclose(direct, via_G, rtol=1e-4)


def test_without_rope_the_factors_are_the_other_projections_moments():
    g = torch.Generator().manual_seed(3)
    m = QKMoments(4, 2, 8)
    q, k = torch.randn(1, 10, 32, generator=g), torch.randn(1, 10, 16, generator=g)
    m.add("q", q)
    m.add("k", k)
    Gq, Gk = m.factors()
    kh = k[0].reshape(10, 2, 8).transpose(0, 1)
    Ck = 2 * torch.einsum("hti,htj->hij", kh, kh) / 10
    assert torch.allclose(Gq[0], Ck[0]) and torch.allclose(Gq[1], Ck[0]) and torch.allclose(Gq[2], Ck[1])
    qh = q[0].reshape(10, 4, 8).transpose(0, 1)
    Cq = 2 * torch.einsum("hti,htj->hij", qh, qh) / 10
    assert torch.allclose(Gk[1], (Cq[2] + Cq[3]) / 2, atol=1e-6)
