"""HessianAccumulator: H = (2/N) Σ x xᵀ as a running average, dead inputs, damping."""

import pytest
import torch

from logart.calib.hessian import DEAD_VALUE, HessianAccumulator
from logart.errors import LogartError


def direct(X: torch.Tensor) -> torch.Tensor:
    X = X.reshape(-1, X.shape[-1]).double()
    return 2 * X.T @ X / X.shape[0]


def accumulate(batches, columns):
    acc = HessianAccumulator(columns)
    for x in batches:
        acc.add_batch(x)
    return acc


def test_equals_direct_gram_over_uneven_batches_and_shapes():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 24, generator=g) @ torch.randn(24, 24, generator=g)
    batches = [X[:7].reshape(7, 24), X[7:107].reshape(4, 25, 24), X[107:108], X[108:].reshape(2, 96, 24)]
    acc = accumulate(batches, 24)
    assert acc.count == 300
    torch.testing.assert_close(acc.H.double(), direct(X), rtol=1e-5, atol=1e-5)


def test_batch_order_does_not_matter():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 16, generator=g) * torch.linspace(0.1, 10, 16)
    chunks = list(X.split(32))
    a = accumulate(chunks, 16).H
    b = accumulate(chunks[::-1], 16).H
    c = accumulate([X], 16).H
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_running_average_is_accurate_for_65536_tokens():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(65536, 16, generator=g) * 30 + 5      # large mean and scale: where plain fp32 sums drift
    acc = accumulate(X.split(512), 16)
    ref = direct(X)
    assert float((acc.H.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_finalize_damps_and_reports_dead_inputs():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 8, generator=g)
    X[:, [2, 5]] = 0
    acc = accumulate([X], 8)
    before = acc.H.clone()
    H, dead = acc.finalize(damp=0.01)
    assert dead.tolist() == [False, False, True, False, False, True, False, False]
    raw = before.diagonal().clone()
    raw[dead] = DEAD_VALUE
    torch.testing.assert_close(H.diagonal(), raw + 0.01 * raw.mean())
    off = ~torch.eye(8, dtype=torch.bool)
    torch.testing.assert_close(H[off], before[off])
    assert torch.equal(acc.H, before)                     # finalize leaves the accumulator as it was
    assert torch.equal(H, H.T)
    H2, _ = acc.finalize(damp=0.0, dead_value=1.0)
    assert H2[2, 2] == 1.0 and H2[5, 5] == 1.0


def test_errors_name_the_fix():
    acc = HessianAccumulator(4)
    with pytest.raises(LogartError, match="no calibration inputs"):
        acc.finalize()
    with pytest.raises(LogartError, match="4 features"):
        acc.add_batch(torch.zeros(3, 5))
    acc.add_batch(torch.full((2, 4), float("nan")))
    with pytest.raises(LogartError, match="NaN"):
        acc.finalize()


def test_empty_batch_and_half_precision_inputs():
    acc = HessianAccumulator(4)
    acc.add_batch(torch.zeros(0, 4))
    assert acc.count == 0
    x = torch.randn(10, 4).half()
    acc.add_batch(x)
    torch.testing.assert_close(acc.H.double(), direct(x.float()), rtol=1e-5, atol=1e-5)
