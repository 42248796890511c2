"""Rounding algorithms on every codebook: RTN, GPTQ error feedback, learned rounding (LLR). Small and fast."""

import pytest
import torch

from logart.errors import LogartError
from logart.quant import QuantSpec, make_codebook
from logart.rounding import LayerTables, LLRConfig, gptq, hessian_loss, inverse_cholesky, learned_rounding, rtn

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The problems are tiny: one thread avoids OpenMP spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


O, I = 16, 64

SPECS = {
    "dyn3_strict": QuantSpec("log_dynamic", 3, mode="strict"),
    "dyn3_ref": QuantSpec("log_dynamic", 3, mode="reference"),
    "dyn4_ref_hw_sym": QuantSpec("log_dynamic", 4, mode="reference", hardware_approx=True, symmetric=True),
    "log2_g16": QuantSpec("log2", 3, group_size=16),
    "sqrt2_ref_g32": QuantSpec("log_sqrt2", 3, mode="reference", group_size=32),
    "dyn3_strict_g16_hw": QuantSpec("log_dynamic", 3, group_size=16, hardware_approx=True),
    "uniform3": QuantSpec("uniform", 3),
    "uniform4_sym_g16": QuantSpec("uniform", 4, symmetric=True, group_size=16),
    "dyn3_per_tensor": QuantSpec("log_dynamic", 3, group_size=0),
}


def problem(seed=0, o=O, i=I):
    """Weights and a damped Hessian of strongly correlated inputs (a few shared factors plus outlier columns)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(2048, 6, generator=g)
    X = factors @ torch.randn(6, i, generator=g) + 0.3 * torch.randn(2048, i, generator=g)
    X[:, :3] *= 4
    H = 2 * X.T @ X / X.shape[0]
    H += 0.01 * H.diagonal().mean() * torch.eye(i)
    W = torch.randn(o, i, generator=g) * 0.05
    W[0, 5] = 0.0                                          # an exact zero stays zero
    return W, H


def params_for(cb, W, **choice):
    return cb.fit(W, **choice) if choice else cb.fit(W)


def assert_on_codebook(cb, params, W, r, fixed_point=True):
    assert r.weight.shape == W.shape and r.codes.shape == W.shape
    assert torch.equal(cb.decode(r.codes, params), r.weight)
    levels = LayerTables(W, cb, params)
    tab = levels.to_table(r.weight)
    assert bool((tab[:, :, None] == levels.levels[:, None, :]).any(-1).all()), "a weight is not a table level"
    if fixed_point:  # the codes re-encode to themselves
        assert torch.equal(cb.encode(r.weight, params)[0], r.codes)


def loss(W, r, H):
    return hessian_loss(r.weight - W, H)


# --- GPTQ ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SPECS)
def test_gptq_lies_on_the_codebook_and_beats_rtn(name):
    cb = make_codebook(SPECS[name])
    W, H = problem()
    p = params_for(cb, W)
    r0, r1 = rtn(W, cb, p), gptq(W, H, cb, p, block_size=16)
    assert_on_codebook(cb, p, W, r0)
    assert_on_codebook(cb, p, W, r1)
    assert r1.weight[0, 5] == 0
    assert loss(W, r1, H) < 0.8 * loss(W, r0, H)


def test_gptq_reference_mode_with_scale_keeps_codes_consistent():
    """Reference mode at s < 1 (quirk Q7): a sqrt(2) level can lie outside its own interval, so re-encoding the
    output may pick another code; the codes still decode to the weights and every weight is a table level."""
    cb = make_codebook(QuantSpec("log_dynamic", 3, mode="reference"))
    W, H = problem(1)
    p = cb.fit(W, k=2, s=0.8)
    assert_on_codebook(cb, p, W, gptq(W, H, cb, p), fixed_point=False)


@pytest.mark.parametrize("name", ["dyn3_strict", "log2_g16", "uniform3", "dyn3_per_tensor"])
def test_gptq_with_identity_hessian_is_rtn(name):
    cb = make_codebook(SPECS[name])
    W, _ = problem(2)
    p = params_for(cb, W)
    r = gptq(W, torch.eye(I), cb, p)
    assert torch.equal(r.weight, rtn(W, cb, p).weight)
    assert torch.equal(r.source, W)


@pytest.mark.parametrize("name", ["dyn3_strict_g16_hw", "uniform4_sym_g16"])
def test_act_order_permutes_back(name):
    """With a diagonal H there is no feedback, so act-order must reproduce RTN in the original column order
    (and use each column's own group table although columns are visited out of order)."""
    cb = make_codebook(SPECS[name])
    W, _ = problem(3)
    p = params_for(cb, W)
    H = torch.diag(torch.rand(I, generator=torch.Generator().manual_seed(0)) + 0.1)
    r = gptq(W, H, cb, p, act_order=True)
    assert torch.equal(r.weight, rtn(W, cb, p).weight)


def test_act_order_equals_gptq_on_permuted_columns():
    cb = make_codebook(SPECS["dyn3_strict"])
    W, H = problem(4)
    p = cb.fit(W)
    r = gptq(W, H, cb, p, act_order=True)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    manual = gptq(W[:, perm], H[perm][:, perm], cb, p)
    inv = torch.argsort(perm)
    torch.testing.assert_close(r.weight, manual.weight[:, inv])
    assert loss(W, r, H) < loss(W, rtn(W, cb, p), H)


def test_gptq_zeroes_dead_inputs():
    cb = make_codebook(SPECS["dyn3_strict"])
    W, H = problem(5)
    H[:, 7] = 0
    H[7, :] = 0
    p = cb.fit(W)
    r = gptq(W, H, cb, p)
    assert r.info["dead_inputs"] == 1
    assert bool((r.weight[:, 7] == 0).all())


def test_gptq_recovers_from_an_indefinite_hessian():
    cb = make_codebook(SPECS["dyn3_strict"])
    W, H = problem(6)
    H = H - 1.2 * torch.linalg.eigvalsh(H)[0].abs() * torch.eye(I) - 1e-3 * torch.eye(I)  # smallest eigenvalue < 0
    p = cb.fit(W)
    with pytest.warns(UserWarning, match="not positive definite"):
        r = gptq(W, H, cb, p)
    assert r.info["extra_damp"] > 0
    assert_on_codebook(cb, p, W, r)


def test_gptq_rejects_bad_inputs():
    cb = make_codebook(SPECS["dyn3_strict"])
    W, H = problem(7)
    p = cb.fit(W)
    with pytest.raises(LogartError, match="input columns"):
        gptq(W, H[:10, :10], cb, p)
    with pytest.raises(LogartError, match="NaN"):
        gptq(W, H * float("nan"), cb, p)
    with pytest.raises(LogartError, match="not positive definite"):
        inverse_cholesky(-torch.eye(4), max_retries=1)
    with pytest.raises(LogartError, match="rows"):
        gptq(W, H, cb, cb.fit(W[:4]))


# --- learned rounding (LLR) --------------------------------------------------------------------------------

FAST = LLRConfig(iters=150, record_every=25)


@pytest.mark.parametrize("name", ["dyn3_strict", "dyn3_ref", "dyn4_ref_hw_sym", "sqrt2_ref_g32",
                                  "dyn3_strict_g16_hw", "uniform3", "dyn3_per_tensor"])
def test_llr_starts_at_rtn(name):
    """Zero iterations: the hard rounding of the starting point is the codebook's own round-to-nearest."""
    cb = make_codebook(SPECS[name])
    W, H = problem(8)
    p = params_for(cb, W)
    r = learned_rounding(W, H, cb, p, config=LLRConfig(iters=0))
    assert torch.equal(r.weight, rtn(W, cb, p).weight)


def test_llr_starts_at_rtn_on_ties_and_scaled_reference_rows():
    cb = make_codebook(QuantSpec("log_dynamic", 3, mode="reference"))
    W, H = problem(9)
    W[1, :8] = torch.tensor([2 ** -4.5, -2 ** -4.5, 2 ** -2.5, 2 ** -1.5, 0.03125, 0.75, -0.375, 0.5])  # ties
    p = cb.fit(W, k=2, s=0.9)
    r = learned_rounding(W, H, cb, p, config=LLRConfig(iters=0))
    assert torch.equal(r.weight, rtn(W, cb, p).weight)


@pytest.mark.parametrize("name", ["dyn3_strict", "dyn3_ref", "log2_g16", "uniform3"])
def test_llr_improves_on_rtn_and_lies_on_the_codebook(name):
    cb = make_codebook(SPECS[name])
    W, H = problem(10)
    p = params_for(cb, W)
    r = learned_rounding(W, H, cb, p, config=FAST)
    assert_on_codebook(cb, p, W, r)
    hard = [h[3] for h in r.history]
    assert hard[0] == pytest.approx(loss(W, rtn(W, cb, p), H), rel=1e-4)   # starts at RTN
    assert hard[-1] == pytest.approx(r.info["loss"]) == pytest.approx(loss(W, r, H), rel=1e-4)
    assert hard[-1] < 0.9 * hard[0]
    assert r.weight[0, 5] == 0


def test_llr_loss_goes_down_after_warmup():
    """The regularised objective falls while β is annealed, and the hard loss ends below where it started."""
    cb = make_codebook(SPECS["dyn3_strict"])
    W, H = problem(11)
    r = learned_rounding(W, H, cb, cb.fit(W), config=LLRConfig(iters=200, record_every=10))
    warm = [h for h in r.history[:-1] if h[0] < 40]
    assert warm[-1][1] < warm[0][1] + 1e-6 or warm[0][1] < 1e-6   # warm-up: the soft loss does not grow from W
    regs = [h[2] for h in r.history[:-1] if h[0] >= 40]
    assert regs[-1] < 0.5 * regs[0]
    assert r.history[-1][3] < r.history[0][3]


def test_llr_after_gptq_and_determinism():
    cb = make_codebook(SPECS["dyn3_strict"])
    W, H = problem(12)
    p = cb.fit(W)
    g = gptq(W, H, cb, p)
    a = learned_rounding(W, H, cb, p, source=g.source, config=FAST)
    b = learned_rounding(W, H, cb, p, source=g.source, config=FAST)
    assert torch.equal(a.weight, b.weight)
    assert_on_codebook(cb, p, W, a)
    assert a.history[0][3] == pytest.approx(loss(W, g, H), rel=1e-4)     # starts at the GPTQ solution


def test_llr_attention_aware_loss():
    cb = make_codebook(SPECS["dyn3_strict"])
    W, H = problem(13)
    p = cb.fit(W)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, 4, generator=gen)
    G = A @ A.transpose(1, 2) + 0.1 * torch.eye(4)
    r = learned_rounding(W, H, cb, p, G=G, config=FAST)
    assert_on_codebook(cb, p, W, r)

    def g_loss(w_hat):
        d = (w_hat - W).view(4, 4, I)
        return float((G * (d @ H @ d.transpose(1, 2))).sum())
    assert r.info["loss"] == pytest.approx(g_loss(r.weight), rel=1e-4)
    assert g_loss(r.weight) < g_loss(rtn(W, cb, p).weight)
    with pytest.raises(LogartError, match="head_dim"):
        learned_rounding(W, H, cb, p, G=torch.eye(3)[None].expand(5, 3, 3))


def test_llr_never_invents_a_zero_in_a_book_without_one():
    """Reference log_dynamic with k = 0 (pure sqrt 2) has no zero code: small weights keep the smallest level."""
    cb = make_codebook(QuantSpec("log_dynamic", 3, mode="reference", symmetric=True))
    W, H = problem(15)
    p = cb.fit(W, k=0)
    r = learned_rounding(W, H, cb, p, config=FAST)
    assert bool(((r.weight == 0) == (W == 0)).all())
    assert_on_codebook(cb, p, W, r)


def test_conv_weight_shape():
    cb = make_codebook(QuantSpec("log_dynamic", 4))
    W, H = problem(16, o=8, i=36)
    w4 = W.reshape(8, 4, 3, 3)
    p = cb.fit(w4)
    for r in (rtn(w4, cb, p), gptq(w4, H, cb, p), learned_rounding(w4, H, cb, p, config=LLRConfig(iters=20))):
        assert r.weight.shape == w4.shape
        assert torch.equal(cb.decode(r.codes, p), r.weight)


def test_llr_per_head_hessian_matches_shared_hessian():
    cb = make_codebook(SPECS["dyn3_ref"])
    W, H = problem(17)
    p = cb.fit(W)
    cfg = LLRConfig(iters=40, record_every=0)
    shared = learned_rounding(W, H, cb, p, config=cfg)
    per_head = learned_rounding(W, H.expand(4, I, I), cb, p, config=cfg)
    assert float((shared.weight != per_head.weight).float().mean()) < 0.01   # bmm and mm may round differently
    assert per_head.info["loss"] == pytest.approx(shared.info["loss"], rel=1e-2)
