"""Packed checkpoints: LogLinear, the CPU kernel, save / load round trip, and every corruption case."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from logart.api import quantize
from logart.io import kernel
from logart.io.checkpoint import WEIGHTS, load_quantized, save_quantized
from logart.io.linear import LogLinear
from logart.models.decoder import decoder_layers, linear_layers
from logart.models.tiny import tiny_causal_lm
from logart.errors import LogartError
from logart.quant import QuantSpec, make_codebook
from logart.recipes import make_recipe


def _quantized_linear(o, i, spec, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o)
    cb = make_codebook(spec)
    p = cb.fit(lin.weight)
    lin.weight.data = cb.fake_quant(lin.weight, p)
    return lin, cb, p


CASES = [(2, -1, 37, 70), (3, -1, 64, 96), (3, 16, 24, 48), (4, -1, 33, 100), (4, 32, 40, 128),
         (3, -1, 5, 1000), (4, 128, 16, 256)]


@pytest.mark.parametrize("bits,gs,o,i", CASES)
@pytest.mark.parametrize("method", ["log_dynamic", "uniform"])
def test_loglinear_dequantizes_exactly(bits, gs, o, i, method):
    lin, cb, p = _quantized_linear(o, i, QuantSpec(method, bits, group_size=gs, hardware_approx=False))
    packed = LogLinear.from_linear(lin, cb, p)
    assert torch.equal(packed.dequantize(), lin.weight)


@pytest.mark.parametrize("bits,gs,o,i", CASES)
@pytest.mark.parametrize("batch", [1, 3, 8, 20])
def test_kernel_matches_reference(bits, gs, o, i, batch):
    if kernel.load() is None:
        pytest.skip("no C++ compiler: the kernel is optional, the reference path is tested elsewhere")
    lin, cb, p = _quantized_linear(o, i, QuantSpec("log_dynamic", bits, group_size=gs, hardware_approx=True))
    packed = LogLinear.from_linear(lin, cb, p)
    x = torch.randn(2, batch, i)
    ref = nn.functional.linear(x, packed.dequantize(), packed.bias)
    packed.kernel = kernel.lut_forward
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)


def test_packing_refuses_off_codebook_weights_and_reference_mode():
    lin, cb, p = _quantized_linear(8, 32, QuantSpec("log_dynamic", 4))
    lin.weight.data[0, 0] += 1e-3
    with pytest.raises(LogartError, match="not on its codebook"):
        LogLinear.from_linear(lin, cb, p)
    lin, cb, p = _quantized_linear(8, 32, QuantSpec("log_dynamic", 4, mode="reference"))
    with pytest.raises(LogartError, match="strict mode to pack"):
        LogLinear.from_linear(lin, cb, p)


def _quantize_tiny(arch="llama", bits=3, group_size=16):
    model = tiny_causal_lm(arch)
    recipe = make_recipe("logart-fast", bits=bits, group_size=group_size)
    cb = make_codebook(recipe.codebook)
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    layers = {}
    for b, block in enumerate(blocks):
        for name, lin in linear_layers(block).items():
            p = cb.fit(lin.weight)
            lin.weight.data = cb.fake_quant(lin.weight, p)
            layers[f"{prefix}.{b}.{name}"] = (cb, p)
    return model, layers, recipe


@pytest.fixture
def checkpoint(tmp_path):
    model, layers, recipe = _quantize_tiny()
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
    save_quantized(model, tmp_path / "ck", layers, recipe)
    return tmp_path / "ck", model, x, ref


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2", "gemma", "mistral"])
def test_round_trip_is_bit_exact(tmp_path, arch):
    model, layers, recipe = _quantize_tiny(arch)
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
    save_quantized(model, tmp_path / "ck", layers, recipe)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)        # packing in place changes nothing
    loaded, _ = load_quantized(tmp_path / "ck")
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "logart" and cfg["bits"] == 3 and len(cfg["modules"]) == len(layers)


def test_existing_folder_is_never_overwritten(checkpoint):
    path, model, _, _ = checkpoint
    before = (path / WEIGHTS).read_bytes()
    with pytest.raises(LogartError, match="already exists"):
        save_quantized(model, path, {}, make_recipe("logart-fast"))
    assert (path / WEIGHTS).read_bytes() == before


def _edit_tensors(path, edit):
    f = path / WEIGHTS
    from safetensors import safe_open
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata=meta)


def test_missing_tensor(checkpoint):
    path = checkpoint[0]
    _edit_tensors(path, lambda t: t.pop(next(k for k in t if k.endswith("q_proj.qweight"))))
    with pytest.raises(LogartError, match="lacks 1 tensor"):
        load_quantized(path)


def test_extra_tensor(checkpoint):
    path = checkpoint[0]
    _edit_tensors(path, lambda t: t.__setitem__("stray.weight", torch.zeros(2)))
    with pytest.raises(LogartError, match="1 unexpected tensor"):
        load_quantized(path)


def test_wrong_shape(checkpoint):
    path = checkpoint[0]

    def edit(t):
        k = next(k for k in t if k.endswith("row_scale"))
        t[k] = t[k][:-1].clone()
    _edit_tensors(path, edit)
    with pytest.raises(LogartError, match="has shape"):
        load_quantized(path)


def test_corrupted_bytes_fail_the_checksum(checkpoint):
    path = checkpoint[0]

    def edit(t):
        k = next(k for k in t if k.endswith("qweight"))
        t[k] = t[k].clone()
        t[k].view(-1)[0] ^= 1
    _edit_tensors(path, edit)
    with pytest.raises(LogartError, match="fails its checksum"):
        load_quantized(path)


def test_truncated_file(checkpoint):
    path = checkpoint[0]
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(LogartError, match="truncated or corrupted"):
        load_quantized(path)


def test_format_version_and_foreign_folders(checkpoint, tmp_path):
    path = checkpoint[0]
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LogartError, match="format version 99"):
        load_quantized(path)
    with pytest.raises(LogartError, match="no config.json"):
        load_quantized(tmp_path / "nowhere")
    other = tmp_path / "plain"
    shutil.copytree(path, other)
    cfg.pop("quantization_config")
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LogartError, match="not a logart checkpoint"):
        load_quantized(other)


def _damaged_copy(src, dst, edit):
    """A copy of the checkpoint folder `src` whose weights file went through `edit(tensors, meta)`."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return dst


def _tiny_checkpoint(tmp_path):
    model = tiny_causal_lm("llama")
    calib = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize(model, "logart-fast", calib, bits=4, nsamples=2, seqlen=16, progress=False, log=None)
    return save_quantized(model, tmp_path / "ok", result.params, result.recipe)


def test_nan_in_a_row_scale_is_refused_even_with_a_matching_checksum(tmp_path):
    import json as _json

    from logart.errors import LogartError
    from logart.io.checkpoint import _sha256

    def poison(tensors, meta):
        name = next(k for k in tensors if k.endswith(".row_scale"))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
        sums = _json.loads(meta["logart.sha256"])
        sums[name] = _sha256(tensors[name])          # the checksum recomputed: only the finiteness check is left
        meta["logart.sha256"] = _json.dumps(sums)

    bad = _damaged_copy(_tiny_checkpoint(tmp_path), tmp_path / "bad", poison)
    with pytest.raises(LogartError, match="NaN or inf"):
        load_quantized(bad)


def test_a_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    """As re-saved by another tool: none of logart's metadata left (tests/test_faults.py: only the checksums gone)."""
    def strip(tensors, meta):
        meta.pop("logart.sha256")
        meta.pop("logart.format_version")

    bad = _damaged_copy(_tiny_checkpoint(tmp_path), tmp_path / "nosum", strip)
    with pytest.warns(UserWarning, match="cannot be verified"):
        load_quantized(bad)
