"""Attention-aware factors: the closed-form position average equals the brute-force one, the rotation is the
Hugging Face one, and grouped-query heads are mapped as in the original."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from logart import api
from logart.calib.attention import AttentionObserver, QKMoments, rotate, unrotate_mean
from logart.calib.stats import block_hessians
from logart.models.hf_causal import HFCausalLM
from logart.models import decoder_layers, tiny_causal_lm
from logart.models.decoder import capture_block_inputs
from logart.models.roles import attention_layout
from logart.errors import LogartError
from logart.quant import QuantSpec, make_codebook
from logart.rounding import LLRConfig, QuadraticLoss, learned_rounding, rtn
from logart.search import HessianScore, default_k_values, default_s_values, search


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


# --- wiring: layout discovery, the observer in the Hessian pass, LLR with G ------------------------------------


def _windows(n, length=48, seed=0):
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "opt"])
def test_layout_matches_the_config(arch):
    model = tiny_causal_lm(arch)
    cfg = model.config
    layout = attention_layout(decoder_layers(model)[0])
    assert layout.query.endswith("q_proj") and layout.key.endswith("k_proj")
    assert layout.heads == cfg.num_attention_heads
    assert layout.kv_heads == (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    assert layout.heads * layout.head_dim == decoder_layers(model)[0].get_submodule(layout.query).out_features


def test_gpt2_fused_attention_has_no_layout():
    assert attention_layout(decoder_layers(tiny_causal_lm("gpt2"))[0]) is None


def _block_statistics(arch, windows=4):
    """The first block of a tiny `arch` model, its layout, captured inputs, Hessians and attention factors."""
    model = tiny_causal_lm(arch)
    adapter = HFCausalLM()
    plan_block = adapter.plan(model)[0]
    block = plan_block.module
    captured = capture_block_inputs(model, _windows(windows))
    layout = attention_layout(block)
    observer = AttentionObserver(adapter.attention(plan_block, captured.kwargs),
                                 {s.name: s.module for s in plan_block.sites})
    sites = {s.name[len(plan_block.name) + 1:]: s for s in plan_block.sites}
    hessians = block_hessians(lambda x: adapter.run(plan_block, x, captured.kwargs), sites, captured.hidden,
                              observer.hooks())
    factors = {k[len(plan_block.name) + 1:]: v for k, v in observer.factors().items()}
    return block, layout, captured, hessians, factors


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_observer_factors_are_the_moments_of_the_other_projection(arch):
    """Brute force on the block's own q/k outputs: G_q is the mean over positions of R_tᵀ C_K R_t (no rotation
    for OPT), per head, with each query head seeing its group's key head."""
    block, layout, captured, _, factors = _block_statistics(arch, windows=3)
    Gq = factors[layout.query]
    # the keys from a second, independent pass over the same windows
    seen = []
    h = block.get_submodule(layout.key).register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    with torch.no_grad():
        for x in captured.hidden:
            block(x[None], **captured.kwargs)
    h.remove()
    k = torch.cat(seen).reshape(-1, layout.kv_heads, layout.head_dim)          # [N, kv_heads, d]
    T = captured.hidden.shape[1]
    pe = captured.kwargs.get("position_embeddings")
    if pe is not None:
        cos, sin = (t.reshape(-1, layout.head_dim).repeat(len(captured.hidden), 1) for t in pe)
        R = torch.stack([rotate(torch.eye(layout.head_dim), c, s).T for c, s in zip(cos, sin)])  # [N, d, d]
        k_rot = torch.einsum("nij,nhj->nhi", R, k)
        # mean_t R_tᵀ C R_t with C the mean of rotated outer products: average over (t, t') pairs
        C = 2 * torch.einsum("nhi,nhj->hij", k_rot, k_rot) / k.shape[0]
        expect = torch.einsum("nji,hjk,nkl->hil", R[:T], C, R[:T]) / T
    else:
        expect = 2 * torch.einsum("nhi,nhj->hij", k, k) / k.shape[0]
    expect = expect.repeat_interleave(layout.heads // layout.kv_heads, dim=0)
    torch.testing.assert_close(Gq, expect, rtol=1e-4, atol=1e-5)


def test_llr_with_factors_lowers_the_attention_loss():
    """On a real q_proj with its real H and G: LLR that sees G ends lower on the G-weighted loss than LLR
    that does not (it optimises that loss), and both end below round-to-nearest."""
    block, layout, _, hessians, factors = _block_statistics("llama")
    W = block.get_submodule(layout.query).weight.detach().float().clone()
    H, _ = hessians[layout.query].finalize()
    G = factors[layout.query]
    cb = make_codebook(QuantSpec(method="log_dynamic", bits=3))
    params = search(cb, cb.rows(W), HessianScore(H), default_k_values(cb, True), default_s_values(cb, True)).params
    attention = QuadraticLoss(H, *W.shape, W.device, G)
    cfg = LLRConfig(iters=300)
    plain = attention.value(learned_rounding(W, H, cb, params, config=cfg).weight - W)
    aware = attention.value(learned_rounding(W, H, cb, params, G=G, config=cfg).weight - W)
    nearest = attention.value(rtn(W, cb, params).weight - W)
    assert aware < plain
    assert aware < nearest


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_attention_aware_recipe_end_to_end(arch):
    model = tiny_causal_lm(arch)
    result = api.quantize(model, "logart", _windows(4), bits=3, attention_aware=True, llr_iters=20,
                          progress=False, log=None)
    flagged = {r.name.rsplit(".", 1)[-1] for r in result.layers if r.extra.get("attention_aware")}
    assert flagged == {"q_proj", "k_proj"}
    for name, (cb, p) in result.params.items():
        w = result.model.get_submodule(name).weight.detach().float()
        assert torch.equal(cb.fake_quant(w, p), w), name


def test_partial_rotary_is_refused_clearly():
    from logart.models.roles import block_rope
    cos = torch.ones(1, 8, 4)
    with pytest.raises(LogartError, match="partial rotary"):
        block_rope({"position_embeddings": (cos, cos)}, head_dim=8)


def test_per_head_qk_norms_are_refused_clearly():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, head_dim=16, eos_token_id=1,
                                  bos_token_id=0, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert attention_layout(decoder_layers(model)[0]).qk_norm
    with pytest.raises(LogartError, match="q_norm"):
        api.quantize(model, "logart", _windows(2), bits=3, attention_aware=True, llr_iters=5, progress=False, log=None)


def test_attention_aware_needs_learned_rounding():
    from logart.recipes import make_recipe

    with pytest.raises(LogartError, match="attention-aware"):
        make_recipe("logart-fast", bits=3, attention_aware=True)
    # enough that one rule learns rounding: it inherits the switch (a rule's preset starts from its defaults)
    r = make_recipe("logart-fast", bits=3, attention_aware=True, overrides=["self_attn:recipe=logart"])
    assert r.for_module("model.layers.0.self_attn.q_proj").rounding.attention_aware
