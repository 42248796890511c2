"""One engine for every family: weight sites, the CNN and timm ViT adapters, and block reconstruction, through the
same driver as the LLM path."""

import pytest
import torch
from torch import nn

import logart
from logart.errors import LogartError
from logart.calib.reconstruct import BlockReconstruction, ReconstructConfig
from logart.models.cnn import CNN, find_blocks, fold_batchnorm
from logart.models.sites import WeightSite
from logart.models.vit import TimmViT
from logart.quant import QuantSpec, make_codebook
from logart.rounding import gptq, rtn
from logart.search import WeightSSE, default_k_values, default_s_values, search


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ToyCNN(nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block = Residual(c)
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6())
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.dw(self.block(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def _toy_cnn(seed=0):
    torch.manual_seed(seed)
    model = ToyCNN()
    for m in model.modules():   # non-trivial running statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _images(n=8, seed=1, shape=(1, 12, 12)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_batchnorm_folding_leaves_fp32_outputs_unchanged():
    model = _toy_cnn()
    x = _images()
    with torch.no_grad():
        before = model(x)
    folded = fold_batchnorm(model, x[:2])
    assert folded == ["stem.0", "block.conv1", "block.conv2", "dw.0"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_cnn_blocks_are_found_generically():
    names = [n for n, _ in find_blocks(_toy_cnn())]
    assert names == ["stem", "block", "dw", "fc"]   # conv-BN-ReLU Sequentials are one block, activation included


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, padding=1, stride=2), nn.Conv2d(4, 6, (3, 1), dilation=2),
                                  nn.Conv2d(4, 8, 3, padding=1, groups=2)])
def test_conv_site_rows_reproduce_the_convolution(conv):
    """rows(x) @ Wᵀ is the convolution itself (for groups > 1: per group), so H of the rows is the layer's H."""
    site = WeightSite("conv", conv)
    x = torch.randn(2, conv.in_channels, 9, 9)
    rows = site.rows(x)
    W = site.matrix()
    with torch.no_grad():
        y = conv(x) - conv.bias[None, :, None, None]
    g = conv.groups
    out_per = conv.out_channels // g
    per_group = rows.reshape(g, -1, site.columns)
    for k in range(g):
        yk = per_group[k] @ W[k * out_per:(k + 1) * out_per].T          # [B*L, out/g]
        expected = y[:, k * out_per:(k + 1) * out_per].flatten(2).transpose(1, 2).reshape(-1, out_per)
        torch.testing.assert_close(yk, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["log_dynamic", "uniform"])
def test_gptq_on_a_conv_weight_with_identity_statistics_equals_rtn(method):
    conv = nn.Conv2d(4, 6, 3)
    site = WeightSite("conv", conv)
    W = site.matrix()
    cb = make_codebook(QuantSpec(method, 3))
    params = search(cb, cb.rows(W), WeightSSE(), default_k_values(cb), default_s_values(cb)).params
    H = torch.eye(W.shape[1])
    assert torch.equal(gptq(W, H, cb, params).weight, rtn(W, cb, params).weight)


def _on_codebook(result):
    for name, (cb, p) in result.params.items():
        w = result.model.get_submodule(name).weight.detach().float()
        assert torch.equal(cb.fake_quant(w.reshape(w.shape[0], -1), p), w.reshape(w.shape[0], -1)), name


@pytest.mark.parametrize("rounding", ["gptq", "llr"])
def test_toy_cnn_goes_through_the_driver(rounding):
    model, x = _toy_cnn(), _images(16)
    with torch.no_grad():
        reference = model(x)
    result = logart.quantize(model, "logart-fast", x, bits=4, rounding=rounding, llr_iters=30, progress=False,
                             log=None, adapter=CNN(example=x[:2]))
    assert sorted(result.params) == ["block.conv1", "block.conv2", "dw.0", "fc", "stem.0"]
    _on_codebook(result)
    with torch.no_grad():
        out = model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.9


def _toy_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()


@pytest.mark.parametrize("rounding", ["gptq", "llr"])
def test_toy_timm_vit_goes_through_the_driver(rounding):
    model, x = _toy_vit(), _images(8, shape=(1, 16, 16))
    with torch.no_grad():
        reference = model(x)
    result = logart.quantize(model, "logart-fast", x, bits=4, rounding=rounding, llr_iters=30, progress=False,
                             log=None, adapter=TimmViT())
    names = set(result.params)
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"} <= names
    _on_codebook(result)
    with torch.no_grad():
        out = model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.9


def test_vit_adapter_lists_the_activation_sites():
    model = _toy_vit()
    TimmViT().prepare(model)
    block = TimmViT().plan(model)[1]
    kinds = {a.kind for a in block.act_sites}
    assert {"post-layernorm", "post-softmax", "post-gelu", "matmul"} <= kinds
    seen = []
    post_softmax = next(a for a in block.act_sites if a.kind == "post-softmax")
    post_softmax.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(_images(2, shape=(1, 16, 16)))
    torch.testing.assert_close(seen[0].sum(-1), torch.ones_like(seen[0].sum(-1)))   # rows of a softmax


class MLPBlock(nn.Module):
    def __init__(self, d=16, hidden=48):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize("hard_forward", [True, False])
def test_block_reconstruction_beats_layerwise_llr_on_the_block_output(hard_forward):
    torch.manual_seed(0)
    model = nn.Sequential(MLPBlock()).eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    engine = BlockReconstruction(ReconstructConfig(iters=300, batch=16, seed=0, hard_forward=hard_forward),
                                 progress=False)
    result = logart.quantize(model, "logart-fast", x, bits=3, rounding="llr", llr_iters=200, progress=False,
                             log=None, adapter=CNN(example=x[:2]), reconstruction=engine)
    info = next(r.extra["reconstruct"] for r in result.layers if "reconstruct" in r.extra)
    assert info["block_error_reconstructed"] < info["block_error_layerwise"]
    assert info["kept"] == "reconstruction"
    _on_codebook(result)


@pytest.mark.parametrize("loss,qdrop", [("nlc", 0.0), ("mse", 0.5)])
def test_block_reconstruction_runs_on_a_tiny_decoder(loss, qdrop):
    from logart.models import tiny_causal_lm

    model = tiny_causal_lm("llama")
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    engine = BlockReconstruction(ReconstructConfig(iters=20, loss=loss, qdrop=qdrop), progress=False)
    result = logart.quantize(model, "logart-fast", calib, bits=3, progress=False, log=None, nsamples=4, seqlen=32,
                             reconstruction=engine)
    infos = [r.extra["reconstruct"] for r in result.layers if "reconstruct" in r.extra]
    assert len(infos) == 14   # every site of the two blocks
    assert all(i["block_error_reconstructed"] >= 0 for i in infos)
    _on_codebook(result)


def test_the_recipe_option_turns_block_reconstruction_on():
    from logart.models import tiny_causal_lm

    model = tiny_causal_lm("llama")
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    result = logart.quantize(model, "log2-rtn", calib, bits=3, progress=False, log=None, nsamples=4, seqlen=32,
                             reconstruct="block", recon_iters=10)
    assert result.recipe.needs_calibration
    assert all("reconstruct" in r.extra for r in result.layers)
    with pytest.raises(LogartError, match="reconstruction"):
        logart.make_recipe("logart-fast", reconstruct="layer")


def test_position_reduction_is_the_mean_over_positions_of_the_channel_sum():
    from logart.calib.reconstruct import output_loss

    g = torch.Generator().manual_seed(0)
    y, t = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    per_position = (y - t).pow(2).sum(1).mean()          # BRECQ's lp_loss: Σ channels, mean over batch and positions
    assert torch.allclose(output_loss(y, t, "mse", reduce="position"), per_position)
    assert torch.allclose(output_loss(y, t, "mse"), per_position * 30)
    flat_y, flat_t = y.flatten(1), t.flatten(1)          # no positions: both reductions agree
    assert torch.equal(output_loss(flat_y, flat_t, "mse", reduce="position"), output_loss(flat_y, flat_t, "mse"))
    assert logart.make_recipe("brecq", recon_reduce="position").reconstruction.reduce == "position"
    with pytest.raises(LogartError, match="reduction"):
        logart.make_recipe("brecq", recon_reduce="pixels")
    with pytest.raises(LogartError, match="reduction"):
        ReconstructConfig(reduce="pixels")
