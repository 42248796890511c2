"""Group sizes that do not divide the input size (SmolLM2: 576 inputs, groups of 128): the last, shorter group
is quantized as a group of its own, packed, reloaded and run by the kernel like any other."""

import math

import pytest
import torch

from logart import api
from logart.eval.perplexity import perplexity
from logart.io import kernel
from logart.io.checkpoint import load_quantized, save_quantized
from logart.io.linear import LogLinear
from logart.models import tiny_causal_lm
from logart.quant import QuantSpec, make_codebook


@pytest.mark.parametrize("method", ["uniform", "log2", "log_dynamic"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_last_group_is_quantized_on_its_own(method, bits):
    W = torch.randn(8, 96, generator=torch.Generator().manual_seed(bits))
    grouped, per_channel = make_codebook(QuantSpec(method, bits, 64)), make_codebook(QuantSpec(method, bits, -1))
    q = grouped.fake_quant(W, grouped.fit(W))
    head, tail = W[:, :64], W[:, 64:]
    expected = torch.cat([grouped.fake_quant(head, grouped.fit(head)), per_channel.fake_quant(tail, per_channel.fit(tail))], 1)
    assert q.shape == W.shape and torch.equal(q, expected)


@pytest.mark.parametrize("bits", [3, 4])
def test_packed_layer_with_a_short_last_group(bits):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 96, generator=g))
    cb = make_codebook(QuantSpec("log_dynamic", bits, 64))
    params = cb.fit(linear.weight)
    with torch.no_grad():
        linear.weight.copy_(cb.fake_quant(linear.weight, params))
    packed = LogLinear.from_linear(linear, cb, params)
    assert torch.equal(packed.dequantize(), linear.weight)
    for batch in (1, 16):
        x = torch.randn(batch, 96, generator=g)
        reference = linear(x)
        assert torch.allclose(packed(x), reference, atol=1e-5)
        if kernel.load() is not None:
            packed.kernel = kernel.lut_forward
            assert torch.allclose(packed(x), reference, atol=1e-4)
            packed.kernel = None


@pytest.mark.parametrize("recipe", ["gptq", "logart"])
def test_pipeline_with_groups_that_do_not_divide(recipe, tmp_path):
    model = tiny_causal_lm("llama")  # 64 and 128 inputs: groups of 48 leave 16 and 32
    calib = torch.randint(0, 250, (4, 48), generator=torch.Generator().manual_seed(0))
    result = api.quantize(model, recipe, calib, bits=3, group_size=48, progress=False, log=None, llr_iters=10)
    for name, (cb, p) in result.params.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(cb.fake_quant(w, p), w), name
    # records carry the layer's own shape, not the zero-padded one the groups were searched on
    assert all(tuple(r.shape) == tuple(model.get_submodule(r.name).weight.shape) for r in result.layers)
    ev = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(1))
    ppl = perplexity(model, ev, progress=False)
    assert math.isfinite(ppl)
    save_quantized(model, tmp_path / "q", result.params, result.recipe)
    reloaded, _ = load_quantized(tmp_path / "q")
    assert perplexity(reloaded, ev, progress=False) == pytest.approx(ppl, rel=1e-5)
    kernel.enable(reloaded)
    assert perplexity(reloaded, ev, progress=False) == pytest.approx(ppl, rel=1e-4)
