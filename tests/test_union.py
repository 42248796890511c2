"""The `log_or_uniform` codebook: per row LogART's mixed-base table or a uniform grid (quant/union.py)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import logart
from logart.errors import LogartError
from logart.models.cnn import CNN
from logart.quant import QuantSpec, make_codebook
from logart.rounding.soft import SoftRounding
from logart.rounding.tables import LayerTables
from logart.search import search
from logart.vision_pipeline import uniform_row_share, vision_recipe


def _mixed_rows(seed: int = 0) -> torch.Tensor:
    """Half the rows Gaussian (a uniform grid fits them better), half heavy-tailed (a log table does)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 40, generator=g)
    W[24:] = torch.randn(24, 40, generator=g).pow(3)
    return W


def _err(cb, W, params) -> torch.Tensor:
    return (cb.fake_quant(W, params) - W).pow(2).sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_each_row_fits_at_least_as_well_as_either_part(bits):
    W = _mixed_rows()
    cb = make_codebook(QuantSpec("log_or_uniform", bits))
    p = cb.fit(W)
    union, log, grid = _err(cb, W, p), _err(cb.log, W, cb.log.fit(W)), _err(cb.grid, W, cb.grid.fit(W))
    assert torch.all(union <= torch.minimum(log, grid) * (1 + 1e-6))
    assert 0 < int(p.uniform.sum()) < W.shape[0]                    # both kinds are chosen on these rows
    assert bool(p.uniform[:24].float().mean() > p.uniform[24:].float().mean())


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 10_000))
def test_codes_are_n_bit_and_the_packed_factorisation_is_exact(bits, seed):
    W = _mixed_rows(seed)
    cb = make_codebook(QuantSpec("log_or_uniform", bits))
    p = cb.fit(W)
    codes, _ = cb.encode(W, p)
    assert int(codes.max()) < 2 ** bits and cb.table_size() == 2 ** bits
    assert torch.equal(cb.decode(codes, p), cb.fake_quant(W, p))
    scale, rel = cb.factored_tables(p)
    assert torch.equal(scale[:, None] * rel, cb.tables(p)[0])


def test_the_search_keeps_per_row_the_part_of_lower_score():
    from logart.quant.union import merge

    W = _mixed_rows(1)
    cb = make_codebook(QuantSpec("log_or_uniform", 3))
    log, grid = search(cb.log, cb.log.rows(W)), search(cb.grid, cb.grid.rows(W))
    found = merge(log, grid)
    assert torch.equal(found.score, torch.minimum(log.score, grid.score))
    assert torch.equal(found.params.uniform, grid.score < log.score)
    assert torch.allclose(_err(cb, W, found.params), found.score)
    assert sum(found.k_hist.values()) == int((~found.params.uniform).sum())


def test_soft_rounding_treats_each_row_as_its_own_codebook_does():
    """Uniform rows move linearly between their two levels (AdaRound), log rows in the exponent (LLR): the union's
    soft weights and hard codes are, row for row, those of the pure codebook with the same parameters."""
    W = _mixed_rows(2)
    cb = make_codebook(QuantSpec("log_or_uniform", 3))
    p = cb.fit(W)
    u = p.uniform
    union = SoftRounding(LayerTables(W, cb, p), W, cb.log_rows(p)).start()
    V = torch.randn(W.shape, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        union.V.copy_(V)
        soft, soft_fast = union(), union.soft(union.h(union.V)[0])[0]
    torch.testing.assert_close(soft, soft_fast)
    for rows, part, params in ((u, cb.grid, p.grid().select(u)), (~u, cb.log, p.log().select(~u))):
        pure = SoftRounding(LayerTables(W[rows], part, params), W[rows], part.spec.is_log).start()
        with torch.no_grad():
            pure.V.copy_(V[rows])
            torch.testing.assert_close(soft[rows], pure(), rtol=1e-6, atol=1e-7)
        assert torch.equal(union.hard_codes()[rows], pure.hard_codes())


def test_a_single_searched_choice_is_refused_by_the_mixed_codebook():
    cb = make_codebook(QuantSpec("log_or_uniform", 4))
    with pytest.raises(LogartError, match="takes no single choice"):
        cb.fit(_mixed_rows(), k=2, s=0.9)


def test_log_or_uniform_is_strict_mode_only():
    with pytest.raises(LogartError, match="strict mode only"):
        QuantSpec("log_or_uniform", 4, mode="reference")


def test_a_tiny_cnn_quantizes_packs_and_reloads_with_log_or_uniform(tmp_path):
    from torchvision.models import mobilenet_v2

    from logart.io.checkpoint import load_quantized, save_quantized
    from logart.models.vision import VisionModel, checkpoint_config

    torch.manual_seed(0)
    model = mobilenet_v2(width_mult=0.25).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    recipe = vision_recipe("logart", bits=3, method="log_or_uniform", recon_iters=10, recon_batch=4)
    result = logart.quantize(model, recipe, x, progress=False, log=None, adapter=CNN(example=x[:2]))
    uniform = [rec.extra["uniform_rows"] for rec in result.layers]
    assert all(u is not None for u in uniform) and 0 < sum(uniform) < sum(rec.shape[0] for rec in result.layers)
    share = uniform_row_share(result.params)["uniform_row_share"]
    assert share == round(sum(uniform) / sum(rec.shape[0] for rec in result.layers), 4)
    assert uniform_row_share({}) == {}
    with torch.no_grad():
        expected = model(x)
    vm = VisionModel("mobilenetv2", model, None, "imagenet-photos")
    config = checkpoint_config(vm, x.shape[1:], result.activation_quantizers)
    config["logart_vision"]["options"] = {"width_mult": 0.25}
    save_quantized(model, tmp_path / "ck", result.params, result.recipe, config=config)
    reloaded, _ = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)
