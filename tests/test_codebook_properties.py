"""Properties every codebook must have, on randomly drawn weights (hypothesis draws the shapes and options;
torch draws the values from the seed)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logart.quant import QuantSpec, make_codebook, pack, unpack

LOG_METHODS = ["log2", "log_sqrt2", "log_dynamic"]


@st.composite
def weights(draw):
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rows = draw(st.integers(1, 12))
    groups = draw(st.integers(1, 3))
    group = draw(st.sampled_from([4, 8, 16, 32]))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "heavy", "one_signed", "sparse", "tiny", "zero_row"]))
    w = torch.randn(rows, groups * group, generator=g) * 10 ** draw(st.floats(-4, 2))
    if kind == "heavy":
        w = w * torch.rand(rows, groups * group, generator=g).pow(-1.5)
    elif kind == "one_signed":
        w = w.abs() * (1 if seed % 2 else -1)
    elif kind == "sparse":
        w = w * (torch.rand(rows, groups * group, generator=g) > 0.6)
    elif kind == "tiny":
        w = w * 1e-20
    elif kind == "zero_row":
        w[0] = 0
    group_size = draw(st.sampled_from([-1, 0, group]))
    return w, group_size


@st.composite
def specs(draw, methods=LOG_METHODS + ["uniform"], modes=("strict", "reference")):
    method = draw(st.sampled_from(methods))
    bits = draw(st.sampled_from([2, 3, 4, 8] if method == "uniform" else [2, 3, 4]))
    return dict(method=method, bits=bits, symmetric=draw(st.booleans()),
                hardware_approx=method != "uniform" and draw(st.booleans()), mode=draw(st.sampled_from(modes)))


@st.composite
def choices(draw, spec):
    """A search choice (k, s) for log codebooks, a clip ratio for uniform ones."""
    s = draw(st.sampled_from([1.0, 0.99, 0.8, 0.71, 0.5, 0.3, 0.01]))
    if spec["method"] == "uniform":
        return dict(s=s)
    L = 2 ** (spec["bits"] - 1)
    if spec["method"] == "log_dynamic":
        return dict(k=draw(st.sampled_from(list(range(L, -1, -2)))), s=s)
    return dict(k=L if spec["method"] == "log2" else 0, s=s)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_decode_encode_equals_fake_quant(data):
    w, gs = data.draw(weights())
    spec = data.draw(specs())
    cb = make_codebook(QuantSpec(group_size=gs, **spec))
    p = cb.fit(w, **data.draw(choices(spec)))
    codes, _ = cb.encode(w, p)
    assert codes.shape == w.shape
    assert torch.equal(cb.decode(codes, p), cb.fake_quant(w, p))
    # codes index the row table; the fake-quant weight lies on the codebook
    assert int(codes.min()) >= 0 and int(codes.max()) < cb.table_size()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_strict_rows_fit_n_bits(data):
    w, gs = data.draw(weights())
    spec = data.draw(specs(modes=("strict",)))
    cb = make_codebook(QuantSpec(group_size=gs, **spec))
    p = cb.fit(w, **data.draw(choices(spec)))
    codes, _ = cb.encode(w, p)
    assert int(codes.max()) < 2 ** spec["bits"]
    levels, _ = cb.tables(p)
    assert levels.shape[1] <= 2 ** spec["bits"]
    rows = cb.rows(cb.fake_quant(w, p))
    for r in rows:  # at most 2^n distinct values in every row (or group)
        assert len(r.unique()) <= 2 ** spec["bits"]
    assert bool((levels[:, 1:] >= levels[:, :-1]).all())


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_fake_quant_is_idempotent(data):
    """Re-quantizing a quantized weight with the same parameters changes nothing. Reference mode is checked
    at s = 1 only: for s < 1 its base switch on the unscaled |w| (quirk Q7) can move a level's own value."""
    w, gs = data.draw(weights())
    spec = data.draw(specs())
    choice = data.draw(choices(spec))
    if spec["mode"] == "reference" and spec["method"] == "log_dynamic":
        choice["s"] = 1.0
    cb = make_codebook(QuantSpec(group_size=gs, **spec))
    p = cb.fit(w, **choice)
    q = cb.fake_quant(w, p)
    assert torch.equal(cb.fake_quant(q, p), q)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_sign_symmetry(data):
    """Symmetric codebooks treat -w as w. Reference mode is exactly symmetric; strict mode is symmetric except
    that the negative sign's lowest slot holds the zero code (2^n values cannot be symmetric around 0), so
    there the check covers the weights at or above the lowest level both signs have."""
    w, gs = data.draw(weights())
    spec = data.draw(specs(methods=LOG_METHODS))
    spec["symmetric"] = True
    cb = make_codebook(QuantSpec(group_size=gs, **spec))
    choice = data.draw(choices(spec))
    p = cb.fit(w, **choice)
    assert bool((p.asym == 0).all())
    assert torch.equal(cb.fit(-w, **choice).top, p.top)
    q_pos, q_neg = cb.fake_quant(w, p), cb.fake_quant(-w, p)
    if spec["mode"] == "reference":
        assert torch.equal(q_neg, -q_pos)
    else:
        levels, _ = cb.tables(p)
        L = 2 ** (spec["bits"] - 1)
        second_level = levels[:, L + 1:L + 2]  # the lowest level both signs have
        keep = cb.rows(w).abs() >= second_level
        assert torch.equal(cb.rows(q_neg)[keep], -cb.rows(q_pos)[keep])


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), shape=st.tuples(st.integers(1, 5), st.integers(1, 100)),
       seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, shape, generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape[-1] == (shape[-1] + 31) // 32 * bits
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


def test_all_zero_rows_quantize_to_zero():
    w = torch.zeros(3, 16)
    w[1] = torch.linspace(-1, 1, 16)
    for method in LOG_METHODS + ["uniform"]:
        for mode in ("strict", "reference"):
            cb = make_codebook(QuantSpec(method, 3, mode=mode))
            q = cb.fake_quant(w)
            assert torch.equal(q[0], torch.zeros(16)) and torch.equal(q[2], torch.zeros(16))
            assert torch.isfinite(q).all()


@pytest.mark.parametrize("mode", ["strict", "reference"])
def test_group_wise_equals_per_channel_on_the_split_matrix(mode):
    """Groups are independent rows: quantizing [O, G*g] with group g equals quantizing [O*G, g] per channel."""
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    for method in LOG_METHODS + ["uniform"]:
        grouped = make_codebook(QuantSpec(method, 4, group_size=16, mode=mode)).fake_quant(w)
        split = make_codebook(QuantSpec(method, 4, group_size=-1, mode=mode)).fake_quant(w.reshape(-1, 16))
        assert torch.equal(grouped.reshape(-1, 16), split)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_tables_factor_exactly(data):
    """levels == row_scale * rel bit for bit: the packed runtime dequantizes to the fake-quant weights."""
    w, gs = data.draw(weights())
    spec = data.draw(specs())
    cb = make_codebook(QuantSpec(group_size=gs, **spec))
    p = cb.fit(w, **data.draw(choices(spec)))
    levels, _ = cb.tables(p)
    row_scale, rel = cb.factored_tables(p)
    assert torch.equal(row_scale[:, None] * rel, levels)


def test_idempotent_on_rows_of_tiny_weights():
    """The case hypothesis found: levels ~1e-23, whose product underflows float32 (the bounds must not use it)."""
    w = torch.tensor([[1.5410e-22, -2.9343e-23, -2.1788e-22, 5.6843e-23]])
    cb = make_codebook(QuantSpec(method="log_sqrt2", bits=4, hardware_approx=True, group_size=-1))
    p = cb.fit(w, k=0, s=1.0)
    q = cb.fake_quant(w, p)
    assert torch.equal(cb.fake_quant(q, p), q)
