"""The CNN pipeline on random-weight architectures and tiny data: blocks of torchvision / EfficientNet-Lite
models, activation fusion, data readers, metrics, and one tiny run through the whole pipeline."""

import gzip
import json

import numpy as np
import pytest
import torch
from torch import nn

import logart
from logart.data.images import Preprocess, _read_idx, fashion_mnist, views
from logart.errors import LogartError
from logart.eval.classify import agreement, kl, scores
from logart.models.cnn import CNN, fold_batchnorm
from logart.vision_pipeline import first_last_overrides, vision_recipe


def _plan(model, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    adapter = CNN(example=x)
    adapter.prepare(model.eval())
    return adapter.plan(model)


def test_resnet18_blocks_and_the_fused_stem_activation():
    from torchvision.models import resnet18

    blocks = _plan(resnet18())
    names = [b.name for b in blocks]
    assert names == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                     "layer4.1", "fc"]
    assert isinstance(blocks[0].output_act, nn.ReLU) and blocks[-1].output_act is None
    assert [s.name for s in blocks[3].sites] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]


def test_resnet50_has_bottleneck_blocks():
    from torchvision.models import resnet50

    blocks = _plan(resnet50())
    assert len(blocks) == 1 + 16 + 1
    assert len(blocks[1].sites) == 4   # conv1..3 and the downsample of the first bottleneck


def test_mobilenetv2_blocks_keep_conv_bn_relu6_together():
    from torchvision.models import mobilenet_v2

    blocks = _plan(mobilenet_v2())
    assert [b.name for b in blocks][:3] == ["features.0", "features.1", "features.2"]
    assert blocks[0].sites[0].name == "features.0.0" and blocks[-1].name == "classifier"
    depthwise = blocks[2].sites[1].module
    assert depthwise.groups == depthwise.in_channels > 1
    assert len(blocks) == 20


def test_efficientnet_lite0_blocks():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    blocks = _plan(EfficientNet.from_name("efficientnet-lite0"))
    names = [b.name for b in blocks]
    assert names[0] == "_conv_stem" and names[-2:] == ["_conv_head", "_fc"] and len(names) == 19
    assert isinstance(blocks[0].output_act, nn.ReLU6) and isinstance(blocks[-2].output_act, nn.ReLU6)


def test_batchnorm_folding_is_exact_on_mobilenetv2():
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        fold_batchnorm(model, x)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                                  nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(self.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


def _quantize_tiny(recipe, n: int = 32):
    """(result, top-1 agreement with the fp32 TinyNet) of `recipe` on n random inputs."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    result = logart.quantize(model, recipe, x, progress=False, log=None, adapter=CNN(example=x[:2]))
    with torch.no_grad():
        return result, agreement(reference, model(x))


@pytest.mark.parametrize("recipe", ["logart", "brecq"])
def test_a_tiny_cnn_runs_search_and_reconstruction(recipe):
    r = vision_recipe(recipe, bits=3, recon_iters=20, recon_batch=8)
    assert r.reconstruction.kind == "block" and r.reconstruction.reg_weight == 1.0
    result, agree = _quantize_tiny(r)
    infos = [rec.extra["reconstruct"] for rec in result.layers if "reconstruct" in rec.extra]
    assert infos and all(i["block_error_reconstructed"] >= 0 for i in infos)
    assert agree > 50


def test_brecq_starts_from_a_searched_clipping_range():
    """The vision `brecq` baseline initialises its uniform grid as BRECQ does, by a per-channel clipping search on
    the weight error, not from min/max: before any reconstruction its weights are closer to the fp32 ones."""
    for family in ("cnn", "vit"):
        search = vision_recipe("brecq", family=family).search
        assert (search.sfs, search.dbs, search.score) == (True, False, "weight")

    def weight_error(recipe) -> float:
        torch.manual_seed(0)
        model = TinyNet().eval()
        x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(2))
        logart.quantize(model, recipe, x, progress=False, log=None, adapter=CNN(example=x[:2]))
        torch.manual_seed(0)
        folded = TinyNet().eval()
        fold_batchnorm(folded, x[:2])
        return sum(float((a.weight.detach() - b.weight.detach()).pow(2).sum()) for a, b in zip(
            (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))),
            (m for m in folded.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))))

    searched = weight_error(vision_recipe("brecq", bits=3, reconstruct="none"))
    min_max = weight_error(vision_recipe("brecq", bits=3, reconstruct="none", sfs=False))
    assert searched < min_max


def test_explicit_options_beat_the_cnn_defaults():
    assert vision_recipe("logart", recon_iters=7).reconstruction.iters == 7
    assert vision_recipe("logart").reconstruction.iters == 2000
    assert vision_recipe("logart", reconstruct="none").reconstruction.kind == "none"
    cnn, vit = vision_recipe("brecq").reconstruction, vision_recipe("brecq", family="vit").reconstruction
    assert (cnn.forward, cnn.reduce) == ("soft", "position")    # the original CNN pipeline's AdaRound
    assert (vit.forward, vit.reduce) == ("hard", "sample")
    assert vision_recipe("logart").search.score == vision_recipe("logart-fast").search.score == "output"
    assert vision_recipe("logart", family="vit").search.score == "hessian"
    assert vision_recipe("logart", recon_forward="hard").reconstruction.forward == "hard"


def test_first_and_last_layers_can_keep_8_bits():
    rules = first_last_overrides(TinyNet(), 8)
    r = vision_recipe("logart", bits=3).with_options(overrides=rules)
    first, last = r.for_module("conv1").codebook, r.for_module("fc").codebook
    assert (first.bits, first.method, last.bits, last.method) == (8, "uniform", 8, "uniform")
    assert r.for_module("body.0").codebook.bits == 3


def test_fashion_mnist_reader(tmp_path, monkeypatch, write_idx):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 9]))
    monkeypatch.setenv("LOGART_FASHION_MNIST", str(tmp_path))
    x, y = fashion_mnist("test")
    assert x.shape == (3, 28, 28) and torch.equal(x, torch.from_numpy(images.astype(np.uint8)))
    assert y.tolist() == [1, 2, 9]
    with pytest.raises(LogartError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(LogartError, match="truncated"):
        _read_idx(tmp_path / "bad.gz")


def test_views_are_seeded_crops_and_flips(tmp_path):
    from PIL import Image

    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    pre = Preprocess(resize=32, crop=24)
    v = views(tmp_path, pre, per_image=5, seed=3)
    assert v.shape == (5, 3, 24, 24)
    torch.testing.assert_close(v[1], v[0].flip(-1))
    assert torch.equal(v, views(tmp_path, pre, per_image=5, seed=3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogartError, match="no image files"):
        views(tmp_path / "empty", pre)


def test_metrics():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    assert agreement(ref, ref) == 100.0 and kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    other = torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    assert agreement(ref, other) == 50.0 and kl(ref, other) > 0
    row = scores(ref, other, torch.tensor([0, 2]))
    assert row["top1"] == 50.0 and row["top1_fp32"] == 100.0


def test_a_packed_cnn_checkpoint_reloads_with_the_same_logits(tmp_path):
    """Conv weights pack like linear ones (LogConv2d), activation quantizers are stored beside them; the reloaded
    network gives the same logits."""
    from logart.io.checkpoint import load_quantized, save_quantized
    from logart.io.conv import LogConv2d
    from logart.models.vision import VisionModel, checkpoint_config

    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2(width_mult=0.25).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = logart.quantize(model, vision_recipe("logart-fast", bits=3, act_bits=4), x, progress=False, log=None,
                             adapter=CNN(example=x[:2]))
    with torch.no_grad():
        expected = model(x)
    vm = VisionModel("mobilenetv2", model, None, "imagenet-photos")
    config = checkpoint_config(vm, x.shape[1:], result.activation_quantizers)   # W3A4: the steps are stored too
    assert len(config["logart_vision"]["activations"]) == len(result.activations) > 10
    config["logart_vision"]["options"] = {"width_mult": 0.25}
    save_quantized(model, tmp_path / "ck", result.params, result.recipe, config=config)
    assert isinstance(model.features[1].conv[0][0], LogConv2d)   # packed in place
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    reloaded, tok = load_quantized(tmp_path / "ck")
    assert tok is None and isinstance(reloaded.features[1].conv[0][0], LogConv2d)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)
    # a damaged network description is one clear error naming the folder
    cfg_path = tmp_path / "ck" / "config.json"
    for edit, message in ((lambda c: c["logart_vision"].update(model="vgg-99"), "unknown vision model"),
                          (lambda c: c["logart_vision"].update(options={"width": 3}), "do not fit"),
                          (lambda c: c["logart_vision"].pop("input_shape"), "input_shape"),
                          (lambda c: c["logart_vision"].update(activations={"a": {"module": "nope"}}),
                           "activation quantizers"),
                          (lambda c: c["logart_vision"].update(activations=[1]), "activation quantizers")):
        cfg = json.loads(cfg_path.read_text())
        edit(cfg)
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(LogartError, match=message) as e:
            load_quantized(tmp_path / "ck")
        assert str(tmp_path / "ck") in str(e.value)
        config["quantization_config"] = json.loads(json.dumps(cfg["quantization_config"]))
        cfg_path.write_text(json.dumps(config, default=str))


def test_fashion_training_works_under_no_grad(synthetic_fashion):
    """A caller that loads the Fashion-MNIST model inside torch.no_grad() (as a measuring script does) still gets
    a trained network: training turns autograd back on for itself."""
    from logart.models import fashion

    torch.manual_seed(0)
    untrained = fashion.ARCHS["fashion-resnet"]().state_dict()
    with torch.no_grad():
        model, acc = fashion.train("fashion-resnet", fashion.TrainConfig(epochs=1, batch=32, threads=1), log=None)
    assert 0.0 <= acc <= 100.0
    assert any(not torch.equal(v, untrained[k]) for k, v in model.state_dict().items() if v.is_floating_point())


def test_cli_quantizes_a_fashion_cnn_and_reloads_it(tmp_path, synthetic_fashion, capsys):
    """`logart quantize --model fashion-resnet` end to end on synthetic Fashion-MNIST files (an untrained,
    cached network: the path, not the accuracy), then `logart eval` on the packed checkpoint."""

    from logart.cli import main

    synthetic_fashion("fashion-resnet")
    out = tmp_path / "q"
    argv = ["quantize", "--model", "fashion-resnet", "--bits", "4", "--recipe", "logart", "--recon-iters", "5",
            "--nsamples", "32", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "fashion-resnet" and "top1" in report and report["recipe"]["name"] == "logart"
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"top1 {report['top1']}" in printed and "agreement" in printed
    assert main(["report", str(out), "--model", "fashion-resnet"]) == 0   # the fp32 weights under the levels
    summary = (out / "report" / "summary.md").read_text()
    assert "fashion-resnet" in summary and list((out / "report").glob("codebook_*.png"))


def test_an_interrupted_cli_run_on_a_cnn_resumes_to_the_same_checkpoint(tmp_path, synthetic_fashion, capsys,
                                                                        monkeypatch):
    """Ctrl-C after two blocks: the CLI says how to resume, the rerun restores those blocks and writes the bytes
    an uninterrupted run writes."""
    from logart.calib.driver import BlockDriver
    from logart.cli import main

    synthetic_fashion("fashion-resnet")
    argv = ["quantize", "--model", "fashion-resnet", "--bits", "3", "--recipe", "logart", "--recon-iters", "3",
            "--nsamples", "16", "--act-bits", "8", "--quiet"]
    assert main(argv + ["--output", str(tmp_path / "ref")]) == 0
    real = BlockDriver.commit

    def interrupted(self, index, block):
        real(self, index, block)
        if index == 1:
            raise KeyboardInterrupt

    out = tmp_path / "q"
    with monkeypatch.context() as m:
        m.setattr(BlockDriver, "commit", interrupted)
        capsys.readouterr()
        assert main(argv + ["--output", str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (tmp_path / "q.partial" / "state.json").is_file() and not out.exists()
    assert main(argv + ["--output", str(out)]) == 0
    assert "resuming: 2 blocks" in capsys.readouterr().out
    assert not (tmp_path / "q.partial").exists()
    files = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name != "report.json")   # dated
    assert "config.json" in files and files == sorted(p.name for p in out.iterdir() if p.name != "report.json")
    for name in files:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert json.loads((out / "report.json").read_text())["resumed_blocks"] == 2


def test_w4a4_installs_activation_quantizers_and_learns_their_steps():
    from logart.calib.activations import UniformActQuantizer

    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    r = vision_recipe("logart", bits=4, act_bits=4, recon_iters=30, recon_batch=8)
    result = logart.quantize(model, r, x, progress=False, log=None, adapter=CNN(example=x[:2]))
    acts = result.activations
    assert sorted(acts) == ["body.0", "body.3", "fc"]        # every site but the image input of conv1
    assert acts["body.3"]["signed"] is False                  # after a ReLU6: the unsigned grid
    seen = []
    hook = model.fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    step = acts["fc"]["step"]
    assert torch.allclose(seen[0] / step, torch.round(seen[0] / step), atol=1e-4)   # fc's input lies on its grid
    assert agreement(reference, out) > 50
    assert any(a["step"] != a["step_searched"] for a in acts.values())   # reconstruction trained the steps (LSQ)
    q = UniformActQuantizer(4, signed=True)
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert q.fit(values, "mse") < 0.05 and float(q.step.detach()) < float(values.abs().max()) / 7


def test_activation_bits_are_refused_for_causal_lms(tmp_path, capsys):
    from logart.cli import main

    assert main(["quantize", "--model", "smollm2-135m", "--act-bits", "4", "--output", str(tmp_path / "x")]) == 2
    assert "vision models so far" in capsys.readouterr().err


@pytest.mark.slow
def test_packaged_imagenet_weights_and_preprocessing_are_right():
    """Two independently trained ImageNet models (MobileNetV2, EfficientNet-Lite0), each with its own
    preprocessing, agree on most held-out photos only if both load their real weights and see proper inputs
    (random weights would agree about 0.1 % of the time)."""
    from logart.data.images import load_images
    from logart.eval.classify import logits
    from logart.models.vision import load_vision_model

    outs = []
    for name in ("mobilenetv2", "efficientnet-lite0"):
        vm = load_vision_model(name)
        outs.append(logits(vm.model, load_images("photos-eval", vm.preprocess, limit=40)))
    assert agreement(outs[0], outs[1]) >= 50


def test_tf_same_padding_convs_give_the_rows_they_convolve():
    """EfficientNet-Lite's convolutions pad inside their forward (TensorFlow 'same'): the site's rows must include
    that padding, so that rows @ Wᵀ is the convolution's output."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    from logart.models.sites import WeightSite

    conv = EfficientNet.from_name("efficientnet-lite0").eval()._conv_stem
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    site = WeightSite("_conv_stem", conv)
    with torch.no_grad():
        out = conv(x)
    got = (site.rows(x) @ site.matrix().T).T.reshape(out.shape[1:])
    torch.testing.assert_close(got, out[0], rtol=1e-4, atol=1e-4)
    hash(site.row_key)   # stride is a list in this port: the key must still be hashable


def test_keep_freed_memory_is_accepted_by_glibc_and_never_raises():
    import platform

    from logart.allocator import keep_freed_memory

    taken = keep_freed_memory()
    assert isinstance(taken, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert taken


def test_calibration_views_multiply_the_photos(tmp_path):
    from PIL import Image

    from logart.models.vision import VisionModel
    from logart.vision_pipeline import VisionOptions, calibration_images, evaluation_images

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    vm = VisionModel("mobilenetv2", nn.Identity(), Preprocess(resize=36, crop=32), "imagenet-photos")
    one = calibration_images(vm, VisionOptions(calib=str(tmp_path)))
    four = calibration_images(vm, VisionOptions(calib=str(tmp_path), calib_views=4))
    assert one.shape == (3, 3, 32, 32) and four.shape == (12, 3, 32, 32)
    torch.testing.assert_close(four[0], one[0])                       # the first view is the centre view
    torch.testing.assert_close(four[1], one[0].flip(-1))              # then its mirror
    # the seed draws other random crops for calibration, never other evaluation views
    other = calibration_images(vm, VisionOptions(calib=str(tmp_path), calib_views=4, seed=1))
    assert torch.equal(other[:2], four[:2]) and not torch.equal(other, four)
    evals = [evaluation_images(vm, VisionOptions(eval=str(tmp_path), seed=s))[0] for s in (0, 1)]
    assert torch.equal(*evals)


def test_sites_know_the_activation_they_feed():
    from torchvision.models import mobilenet_v2

    blocks = _plan(mobilenet_v2())
    sites = {s.name: s for b in blocks for s in b.sites}
    assert isinstance(sites["features.1.conv.0.0"].act, nn.ReLU6)      # depthwise conv -> BN (folded) -> ReLU6
    assert sites["features.1.conv.1"].act is None                      # the linear bottleneck projection
    assert sites["classifier.1"].act is None


def test_layer_output_score_of_a_linear_layer_is_its_gram_form():
    from logart.calib.layer import layer_forward
    from logart.models.sites import WeightSite
    from logart.search import HessianScore, LayerOutputScore

    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(12, 5)
    x = torch.randn(40, 12, generator=g)
    W = layer.weight.detach().clone()
    site = WeightSite("fc", layer)
    score = LayerOutputScore(layer_forward(site, x), W, layer(x).detach(), channel_dim=-1)
    dw = 0.1 * torch.randn(3, 5, 12, generator=g)
    gram = HessianScore(2 * x.T @ x)(dw) / 2            # Σ_n (x_n · dw_r)², HessianScore takes H = 2 XᵀX
    assert torch.allclose(score(dw), gram, rtol=1e-4, atol=1e-6)


def test_layer_output_score_of_a_depthwise_conv_is_each_channels_own_error():
    from logart.calib.layer import layer_forward
    from logart.models.sites import WeightSite
    from logart.search import LayerOutputScore

    g = torch.Generator().manual_seed(1)
    conv, act = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU6()
    x = 3 * torch.randn(6, 4, 7, 7, generator=g)
    site = WeightSite("dw", conv, act=act)
    W = site.matrix()
    target = act(conv(x)).detach()
    score = LayerOutputScore(layer_forward(site, x), W, target)
    dw = 0.3 * torch.randn(4, 9, generator=g)
    with torch.no_grad():
        moved = act(nn.functional.conv2d(x, (W + dw).view(4, 1, 3, 3), conv.bias, padding=1, groups=4))
    expected = (moved - target).pow(2).sum((0, 2, 3))
    assert torch.allclose(score(dw[None])[0], expected, rtol=1e-5)
    with pytest.raises(LogartError, match="whole output channels"):
        score(torch.zeros(1, 8, 9))


def test_the_layer_output_search_runs_on_a_tiny_cnn_and_exhaustive_finds_the_least_first_layer_error():
    runs = {}
    for strategy in ("fast", "exhaustive"):
        result, agree = _quantize_tiny(vision_recipe("logart-fast", bits=3, score="output", search=strategy), 40)
        assert len(result.layers) == 4 and all(r.extra["search_strategy"] == strategy for r in result.layers)
        assert agree > 50
        runs[strategy] = result.layers[0].extra["search_loss"]   # the first layer's inputs are the same in both
    assert runs["exhaustive"] <= runs["fast"] * (1 + 1e-6)


def test_the_layer_output_score_needs_whole_channels_and_a_full_precision_network():
    from logart.models import tiny_causal_lm

    model = TinyNet().eval()
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with pytest.raises(LogartError, match="group size"):
        logart.quantize(model, vision_recipe("logart-fast", bits=4, group_size=4, score="output"), x,
                        progress=False, log=None, adapter=CNN(example=x[:2]))
    with pytest.raises(LogartError, match="full-precision targets"):
        logart.make_recipe("logart-fast", score="output", fp_target=0.25)
    lm = tiny_causal_lm("llama")
    calib = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    result = logart.quantize(lm, "logart-fast", calib, bits=4, progress=False, log=None, nsamples=4, seqlen=16,
                             score="output")    # an LM carries its full-precision stream through block copies
    assert result.layers


def test_cli_flags_reach_the_cnn_recipe():
    import functools

    from logart.cli import _recipe_from, build_parser

    parser, make = build_parser(), functools.partial(vision_recipe, family="cnn")
    quantize = ["quantize", "--model", "mobilenetv2", "--bits", "4"]
    default = _recipe_from(parser.parse_args(quantize), make=make)
    assert (default.search.score, default.reconstruction.forward, default.reconstruction.reduce) == \
        ("output", "soft", "position")
    chosen = _recipe_from(parser.parse_args([*quantize, "--score", "hessian", "--recon-forward", "hard",
                                             "--recon-reduce", "sample"]), make=make)
    assert (chosen.search.score, chosen.reconstruction.forward, chosen.reconstruction.reduce) == \
        ("hessian", "hard", "sample")
    assert not default.calibration.bias_correction
    assert _recipe_from(parser.parse_args([*quantize, "--bias-correction"]), make=make).calibration.bias_correction
    assert default.codebook.method == "log_dynamic"
    assert _recipe_from(parser.parse_args([*quantize, "--method", "log_or_uniform"]), make=make).codebook.method == \
        "log_or_uniform"
    with pytest.raises(LogartError, match="contradicts"):
        _recipe_from(parser.parse_args([*quantize, "--method", "uniform", "--no-dbs"]), make=make)


def test_a_half_precision_cache_holds_block_inputs_in_float16_and_runs_them_in_float32():
    from logart.models.capture import capture_inputs

    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(10, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    full = capture_inputs(model, model.body, x, batch_size=4).hidden
    half = capture_inputs(model, model.body, x, batch_size=4, dtype=torch.float16).hidden
    assert half.dtype == torch.float16 and half.shape == full.shape
    assert torch.equal(half, full.half())      # batches written in order, none lost at the ragged end
    adapter = CNN(example=x[:2])
    adapter.cache_dtype = torch.float16
    block = adapter.plan(model)[1]
    y = adapter.run(block, half, {})
    assert y.dtype == torch.float32


def test_a_half_precision_cache_quantizes_a_tiny_cnn_as_the_float32_cache_does():
    recipe = vision_recipe("logart", bits=3, recon_iters=30, recon_batch=8)
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        model = TinyNet().eval()
        adapter = CNN(example=x[:2])
        adapter.cache_dtype = dtype
        result = logart.quantize(model, recipe, x, progress=False, log=None, adapter=adapter)
        assert any("reconstruct" in r.extra for r in result.layers)
        with torch.no_grad():
            outputs[dtype] = model(x)
    # The same codebooks and nearly the same rounding: the cache's rounding error (2^-11 relative) is far below
    # the 3-bit weights' own.
    with torch.no_grad():
        torch.manual_seed(0)
        fp = TinyNet().eval()(x)
    err = {d: float((o - fp).pow(2).sum() / fp.pow(2).sum()) for d, o in outputs.items()}
    assert err[torch.float16] <= 1.5 * err[torch.float32] + 1e-6
    assert agreement(outputs[torch.float32], outputs[torch.float16]) >= 90


def test_an_unknown_cache_dtype_is_one_clear_error_before_any_work():
    from logart.vision_pipeline import VisionOptions, run_vision

    with pytest.raises(LogartError, match="cache dtype 'bfloat8'.*float16"):
        run_vision(vision_recipe("rtn", bits=4), VisionOptions(model="fashion-resnet", cache_dtype="bfloat8"))


def test_bias_correction_gives_the_quantized_network_the_full_precision_output_means():
    """The last site (fc) is corrected last, on the quantized network's own inputs: its mean logits on the
    calibration data then equal the full-precision network's, which plain rounding does not give."""
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    fp = TinyNet().eval()
    with torch.no_grad():
        target = fp(x).mean(0)
    gaps = {}
    for correct in (False, True):
        torch.manual_seed(0)
        model = TinyNet().eval()
        recipe = vision_recipe("rtn", bits=3, bias_correction=correct)
        assert recipe.needs_calibration == correct
        logart.quantize(model, recipe, x, progress=False, log=None, adapter=CNN(example=x[:2]))
        with torch.no_grad():
            gaps[correct] = float((model(x).mean(0) - target).abs().max())
    assert gaps[True] < 1e-4 < gaps[False]


def test_bias_correction_runs_after_block_reconstruction_and_is_packed(tmp_path):
    from safetensors.torch import load_file

    from logart.io.checkpoint import save_quantized

    recipe = vision_recipe("logart", bits=3, recon_iters=10, recon_batch=8, bias_correction=True)
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = TinyNet().eval()
    lines = []
    result = logart.quantize(model, recipe, x, progress=False, log=lines.append, adapter=CNN(example=x[:2]))
    assert any("bias correction of" in line for line in lines)
    with torch.no_grad():
        expected = model(x)
    corrected = model.fc.bias.detach().clone()
    save_quantized(model, tmp_path / "q", result.params, recipe, config={})   # packs in place
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    stored = {k: v for f in (tmp_path / "q").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert torch.equal(stored["fc.bias"], corrected)


def test_output_means_are_per_channel_means_over_ragged_batches():
    from logart.calib.bias import output_means

    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 5, 3), nn.Linear(5, 4)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(2), nn.Conv1d(5, 5, 1), nn.Flatten(1, 1))
    x = torch.randn(7, 3, 6, 6)
    means = output_means(lambda b: lin(net(b).transpose(1, 2)), {"conv": conv, "lin": lin}, x, batch=3)
    with torch.no_grad():
        y = conv(x)
        torch.testing.assert_close(means["conv"], y.mean((0, 2, 3)))
        torch.testing.assert_close(means["lin"], lin(net(x).transpose(1, 2)).mean((0, 1)))
