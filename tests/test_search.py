"""The DBS x SFS parameter search: exhaustive = the original's loop, grouped = per-group, fast ~ exhaustive."""

import math

import pytest
import torch

from logart.quant import QuantSpec, make_codebook
from logart.search import (FastConfig, HessianScore, SortedRows, WeightSSE, default_k_values, default_s_values,
                           fpcs, search)
from logart.search.grid import Grid, row_extremes, scale_equivariant


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds fork/join waits (seconds on a busy shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer(out, cin, seed=0, massive=2):
    """Heavy-tailed weight rows and an H shaped like an LLM input Gram: a power-law spectrum, correlated
    channels and a few 'massive activation' channels (large, nearly constant), damped by 1% of the mean diag."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cin, generator=g) * torch.exp(0.7 * torch.randn(out, cin, generator=g)) * 0.02
    spectrum = torch.arange(1, cin + 1, dtype=torch.float32).pow(-0.8)
    mix = torch.linalg.qr(torch.randn(cin, cin, generator=g))[0] * spectrum.sqrt()
    X = torch.randn(4 * cin, cin, generator=g) @ mix.T
    X[:, :massive] += 8 * spectrum[0].sqrt() * (1 + 0.1 * torch.randn(4 * cin, massive, generator=g))
    H = 2 * X.T @ X / X.shape[0]
    return W, H + 0.01 * H.diagonal().mean() * torch.eye(cin)


def naive_search(cb, rows, score, k_values, s_values):
    """The original loop (LLM order): outer k descending, inner s descending, best = +inf, strict '<'.
    Vectorised over rows only, like the original; fitted from the actual rows, not from their extremes."""
    best = torch.full((rows.shape[0],), math.inf)
    best_k = torch.zeros(rows.shape[0], dtype=torch.int64)
    best_s = torch.ones(rows.shape[0])
    for k in (k_values or [None]):
        for s in s_values.tolist():
            p = cb.fit_rows(rows, s=s) if k is None else cb.fit_rows(rows, k=k, s=s)
            sc = score((cb.fake_quant_rows(rows, p) - rows)[None])[0]
            better = sc < best
            best = torch.where(better, sc, best)
            best_k = torch.where(better, torch.full_like(best_k, k or 0), best_k)
            best_s = torch.where(better, torch.full_like(best_s, s), best_s)
    return best, best_k, best_s


CASES = [("log_dynamic", 3, "strict"), ("log_dynamic", 4, "reference"), ("log2", 4, "strict"),
         ("log_sqrt2", 3, "reference"), ("uniform", 4, "strict"), ("uniform", 3, "reference")]


@pytest.mark.parametrize("method,bits,mode", CASES)
@pytest.mark.parametrize("hessian", [False, True])
def test_exhaustive_equals_the_original_loop(method, bits, mode, hessian):
    cb = make_codebook(QuantSpec(method, bits, mode=mode))
    W, H = layer(8, 32, seed=bits)
    score = HessianScore(H) if hessian else WeightSSE()
    ks, ss = default_k_values(cb), default_s_values(cb)
    res = search(cb, W, score, ks, ss, strategy="exhaustive")
    best, best_k, best_s = naive_search(cb, W, score, ks, ss)
    torch.testing.assert_close(res.score, best, rtol=1e-5, atol=0)
    if not hessian:  # sums of squares do not depend on batching: the very same candidate wins
        assert torch.equal(res.s, best_s)
        if ks is not None:
            assert torch.equal(res.k, best_k)
    # the returned parameters reproduce the reported score
    dw = cb.fake_quant_rows(W, res.params) - W
    torch.testing.assert_close(score(dw[None])[0], res.score, rtol=1e-5, atol=0)


@pytest.mark.parametrize("strategy", ["exhaustive", "fast"])
def test_group_blocks_equal_searching_each_group_alone(strategy):
    cb = make_codebook(QuantSpec("log_dynamic", 3, group_size=16))
    W, H = layer(6, 64, seed=1)
    rows = cb.rows(W)                                # [6 * 4, 16]; row r is group r % 4
    res = search(cb, rows, HessianScore(H), strategy=strategy)
    for g in range(4):
        block = H[16 * g:16 * (g + 1), 16 * g:16 * (g + 1)]
        alone = search(cb, rows[g::4], HessianScore(block), strategy=strategy)
        torch.testing.assert_close(res.score[g::4], alone.score, rtol=1e-5, atol=0)
        assert torch.equal(res.k[g::4], alone.k) and torch.equal(res.s[g::4], alone.s)


def test_hessian_score_shapes():
    W, H = layer(4, 32, seed=2)
    dw = torch.randn(3, 4, 32)
    ref = torch.einsum("nrc,cd,nrd->nr", dw, H, dw)
    torch.testing.assert_close(HessianScore(H)(dw), ref, rtol=1e-4, atol=1e-6)
    grouped = dw.reshape(3, 16, 8)                   # 4 groups of 8 per output channel
    blocks = torch.stack([H[8 * g:8 * (g + 1), 8 * g:8 * (g + 1)] for g in range(4)])
    ref = torch.einsum("nogc,gcd,nogd->nog", dw.view(3, 4, 4, 8), blocks, dw.view(3, 4, 4, 8)).reshape(3, 16)
    torch.testing.assert_close(HessianScore(H)(grouped), ref, rtol=1e-4, atol=1e-6)
    tensor_rows = dw.reshape(3, 1, 128)              # per-tensor: one row holding all output channels
    torch.testing.assert_close(HessianScore(H)(tensor_rows)[:, 0], HessianScore(H)(dw).sum(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
def test_fast_is_close_to_exhaustive_and_never_worse_than_the_baseline(bits):
    """Tolerance: total Hessian score within 3% of exhaustive by default and 0.5% with dense cells, on this
    synthetic layer of only 48 rows, where one row whose needle-like optimum falls in a pruned cell costs 1-3%
    (measured over 10 cases: default 0-1.5%, dense 0-0.16%; on real SmolLM2 layers 0.1-0.2% either way,
    see bench/search_speed.py)."""
    cb = make_codebook(QuantSpec("log_dynamic", bits))
    W, H = layer(48, 128, seed=bits)
    exh = search(cb, W, HessianScore(H), strategy="exhaustive")
    fast = search(cb, W, HessianScore(H), strategy="fast")
    assert fast.strategy == "fast" and fast.exact_evals < 10 and fast.proxy_evals < 400
    assert fast.loss <= exh.loss * 1.03
    assert search(cb, W, HessianScore(H), config=FastConfig(cells=0)).loss <= exh.loss * 1.005
    assert bool((fast.score >= exh.score * (1 - 1e-5)).all())      # exhaustive is the optimum
    assert bool((fast.score <= fast.baseline_score).all())          # the baseline is always a candidate
    torch.testing.assert_close(fast.baseline_score, exh.baseline_score, rtol=1e-5, atol=0)
    dw = cb.fake_quant_rows(W, fast.params) - W                     # the reported score is the real one
    torch.testing.assert_close(HessianScore(H)(dw[None])[0], fast.score, rtol=1e-4, atol=0)


@pytest.mark.parametrize("method,bits,mode", [("log_dynamic", 3, "strict"), ("log2", 4, "reference"), ("uniform", 4, "strict")])
def test_fast_with_an_exact_proxy_finds_the_exhaustive_optimum(method, bits, mode):
    cb = make_codebook(QuantSpec(method, bits, mode=mode))
    W, _ = layer(16, 64, seed=3)
    exh = search(cb, W, WeightSSE(), strategy="exhaustive")
    fast = search(cb, W, WeightSSE(), strategy="fast", config=FastConfig(stride=1))
    torch.testing.assert_close(fast.score, exh.score, rtol=1e-5, atol=0)


def test_infinite_initial_best_handles_huge_scores():
    """The original starts from 1e10 and so never updates once every score exceeds it; +inf does."""
    cb = make_codebook(QuantSpec("log_dynamic", 3))
    W, _ = layer(8, 32, seed=4)
    W = W * 1e8
    res = search(cb, W, WeightSSE(), strategy="exhaustive")
    assert bool((res.score > 1e10).all()) and bool(torch.isfinite(res.score).all())
    best, _, best_s = naive_search(cb, W, WeightSSE(), default_k_values(cb), default_s_values(cb))
    torch.testing.assert_close(res.score, best, rtol=1e-6, atol=0)
    assert torch.equal(res.s, best_s) and bool((res.s < 1).any())
    assert bool((res.score < res.baseline_score).any())


class Const:
    """A score that is the same for every candidate (value v): a tie everywhere."""

    def __init__(self, v):
        self.v = v

    def __call__(self, dw):
        return torch.full(dw.shape[:-1], self.v)


@pytest.mark.parametrize("strategy", ["exhaustive", "fast"])
@pytest.mark.parametrize("value", [0.0, math.inf, math.nan])
def test_ties_and_unusable_scores_keep_the_first_candidate(strategy, value):
    cb = make_codebook(QuantSpec("log_dynamic", 4))
    W, _ = layer(6, 32, seed=5)
    res = search(cb, W, Const(value), strategy=strategy)
    assert bool((res.k == 8).all()) and bool((res.s == 1.0).all())


@pytest.mark.parametrize("strategy", ["exhaustive", "fast"])
def test_tie_break_order_is_k_then_s_as_given(strategy):
    """Duplicate candidates tie exactly: the first in (outer k, inner s) order must win."""
    cb = make_codebook(QuantSpec("log_dynamic", 3))
    W, H = layer(12, 64, seed=6)
    s_values = torch.tensor([1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6])
    res = search(cb, W, HessianScore(H), k_values=[2, 2, 4], s_values=s_values, strategy=strategy)
    grid = Grid.make(cb, [2, 2, 4], s_values)
    assert res.index.tolist() == [grid.index(int(k), float(s)) for k, s in zip(res.k, res.s)]  # first occurrences
    assert bool((res.k == 2).any())


def test_defaults_follow_the_original_grid():
    dyn, log2, sq2, uni = (make_codebook(QuantSpec(m, 4)) for m in ("log_dynamic", "log2", "log_sqrt2", "uniform"))
    assert default_k_values(dyn) == [8, 6, 4, 2, 0] and default_k_values(dyn, dbs=False) == [8]
    assert default_k_values(log2) == [8] and default_k_values(sq2) == [0] and default_k_values(uni) is None
    s = default_s_values(dyn)
    assert s.dtype == torch.float32 and s.numel() == 100 and s[0] == 1.0 and torch.equal(s, torch.arange(1.0, 0.0, -0.01))
    assert torch.equal(default_s_values(dyn, sfs=False), torch.ones(1))
    assert default_s_values(uni).numel() == 80 and abs(float(default_s_values(uni)[-1]) - 0.21) < 1e-6


@pytest.mark.parametrize("method,mode", [("log_dynamic", "strict"), ("log_dynamic", "reference"), ("log_sqrt2", "strict"),
                                         ("uniform", "strict")])
def test_parameters_depend_on_row_extremes_only(method, mode):
    """The search fits candidates from each row's (min, max); the codebooks must not look further."""
    cb = make_codebook(QuantSpec(method, 4, mode=mode, symmetric=(mode == "reference")))
    W, _ = layer(10, 32, seed=7)
    W[0] = W[0].abs()                                               # one-signed and all-zero rows too
    W[1] = 0
    s = torch.linspace(1.0, 0.3, 10)
    kw = {"s": s} if method == "uniform" else {"k": torch.tensor([8, 6, 4, 2, 0] * 2), "s": s}
    a, b = cb.fit_rows(W, **kw), cb.fit_rows(row_extremes(W), **kw)
    for name in a.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("bits,hw", [(3, False), (4, False), (4, True)])
def test_strict_log_tables_scale_with_s(bits, hw):
    cb = make_codebook(QuantSpec("log_dynamic", bits, hardware_approx=hw))
    assert scale_equivariant(cb) and not scale_equivariant(make_codebook(QuantSpec("log_dynamic", bits, mode="reference")))
    W, _ = layer(20, 32, seed=8)
    ks = torch.tensor(cb.k_candidates()).repeat(7)[:20]
    p = cb.fit_rows(W, k=ks, s=torch.linspace(1.0, 0.05, 20))
    unit = type(p)(torch.ones(20), p.k, p.top, p.asym)
    (lv, bd), (lv1, bd1) = cb.tables(p), cb.tables(unit)
    assert torch.equal(lv, lv1 * p.s[:, None])
    torch.testing.assert_close(bd, bd1 * p.s[:, None], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method,mode", [("log_dynamic", "strict"), ("log_dynamic", "reference"), ("uniform", "strict")])
def test_sorted_rows_proxy_and_fake_quant(method, mode):
    cb = make_codebook(QuantSpec(method, 4, mode=mode))
    W, H = layer(12, 48, seed=9)
    W[:, 5] = 0                                                     # exact zeros and ties
    W[:, 6] = W[:, 7]
    grid = Grid.make(cb)
    flat = torch.randint(0, grid.shape[0] * grid.shape[1], (12, 7), generator=torch.Generator().manual_seed(0))
    levels, bounds = grid.tables(cb, row_extremes(W), flat)
    proxy = HessianScore(H).proxy(48, rank=4)
    sr = SortedRows(W, proxy)
    p = grid.fit_flat(cb, row_extremes(W).repeat_interleave(7, 0), flat.reshape(-1))
    big = W.repeat_interleave(7, 0)
    q = cb.fake_quant_rows(big, p).view(12, 7, 48)
    if type(cb).fake_quant_rows is type(cb).__mro__[1].fake_quant_rows:   # the table path: identical codes
        lv, bd = cb.tables(p)
        assert torch.equal(sr.fake_quant(lv.view(12, 7, -1), bd.view(12, 7, -1)), q)
    dw = q - W[:, None]
    direct = (proxy.diag[0] * dw * dw).sum(-1) + ((dw[None] * proxy.lowrank[:, 0, None, None]).sum(-1) ** 2).sum(0)
    torch.testing.assert_close(sr(levels, bounds), direct, rtol=1e-4, atol=1e-9)


def test_fpcs_finds_the_minimum_of_a_smooth_grid():
    target = torch.tensor([[1, 37], [2, 80], [0, 3]])               # (k index, s index) of each row's minimum

    def evaluate(ki, si):
        return (ki - target[:, :1]).abs() * 10.0 + (si - target[:, 1:]).float().pow(2)

    for kwargs in [{}, {"beam": 2, "expand": 2}, {"stride": 1}]:
        table = fpcs(evaluate, 3, (3, 100), **kwargs)
        best = table.view(3, -1).argmin(1)
        assert (best // 100).tolist() == target[:, 0].tolist() and (best % 100).tolist() == target[:, 1].tolist()
    dense = fpcs(evaluate, 3, (3, 100), stride=4, keep_k=2, cells=0)
    assert int(torch.isfinite(dense[0]).sum()) == 3 * 25 + 2 * 75
    some = fpcs(evaluate, 3, (3, 100), stride=4, keep_k=2, cells=10)
    assert int(torch.isfinite(some[0]).sum()) == 3 * 25 + 10 * 3


def test_result_line_and_errors():
    cb = make_codebook(QuantSpec("log_dynamic", 3))
    W, H = layer(8, 32, seed=10)
    res = search(cb, W, HessianScore(H))
    assert "->" in res.line() and sum(res.k_hist.values()) == 8 and res.loss <= res.baseline_loss
    with pytest.raises(ValueError, match="unknown search strategy"):
        search(cb, W, strategy="grid")
    with pytest.raises(ValueError, match="square"):
        HessianScore(torch.ones(3, 4))


def test_fast_in_row_chunks_and_without_s_one(monkeypatch):
    import sys
    grid_module = sys.modules["logart.search.grid"]
    cb = make_codebook(QuantSpec("log_dynamic", 3, group_size=16))
    W, H = layer(8, 64, seed=11)
    rows = cb.rows(W)
    whole = search(cb, rows, HessianScore(H))
    monkeypatch.setattr(grid_module, "FAST_CHUNK_ELEMS", 4 * 16 * 11)     # 4 rows (one channel) per chunk
    chunked = search(cb, rows, HessianScore(H))
    torch.testing.assert_close(chunked.score, whole.score, rtol=1e-5, atol=0)
    assert torch.equal(chunked.index, whole.index)
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])    # no s = 1: the baseline is scored on its own
    res = search(cb, rows, HessianScore(H), s_values=s)
    torch.testing.assert_close(res.baseline_score, whole.baseline_score, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["log_dynamic", "log2"])
def test_per_row_best_of_asymmetric_and_symmetric_tables(method):
    """The merged choice scores each row at the lower of the two searches, and its parameters, read by the
    asymmetric codebook, reproduce exactly the symmetric search's weights on the rows that took it."""
    from dataclasses import replace

    from logart.search.per_row import per_row_best

    W, H = layer(48, 64, seed=3)
    W[::3] = W[::3].abs()                        # rows with one sign much smaller: ABS shifts their window
    asym = make_codebook(QuantSpec(method=method, bits=3))
    sym = make_codebook(replace(asym.spec, symmetric=True))
    score = HessianScore(H)
    ks = default_k_values(asym, True)
    a = search(asym, asym.rows(W), score, ks, default_s_values(asym, True))
    b = search(sym, sym.rows(W), score, ks, default_s_values(sym, True))
    merged, pick = per_row_best([a, b])
    torch.testing.assert_close(merged.score, torch.minimum(a.score, b.score))
    assert 0 < int(pick.sum()) < W.shape[0]     # both tables win somewhere on this layer
    w_mixed = asym.fake_quant(W, merged.params)
    w_sym, w_asym = sym.fake_quant(W, b.params), asym.fake_quant(W, a.params)
    assert torch.equal(w_mixed[pick == 1], w_sym[pick == 1]) and torch.equal(w_mixed[pick == 0], w_asym[pick == 0])
    assert sum(merged.k_hist.values()) == W.shape[0]
