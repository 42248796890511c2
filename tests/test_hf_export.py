"""transformers integration (from_pretrained on a logart folder) and the dequantized Hugging Face export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import logart  # noqa: F401  (installs the transformers hook)
from logart.io.checkpoint import WEIGHTS, load_quantized, save_quantized
from logart.io.export import export_dequantized
from logart.io.linear import LogLinear
from logart.errors import LogartError

sys.path.insert(0, str(Path(__file__).parent))
from test_io import _edit_tensors, _quantize_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _save(tmp_path, arch="llama", bits=3, group_size=16):
    model, layers, recipe = _quantize_tiny(arch, bits=bits, group_size=group_size)
    path = save_quantized(model, tmp_path / f"ck-{arch}", layers, recipe)
    return path, model, sorted(layers)


def _from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("arch,bits,group_size", [("llama", 3, 16), ("opt", 4, -1), ("gemma", 2, 32)])
def test_from_pretrained_equals_load_quantized(tmp_path, arch, bits, group_size):
    path, packed, names = _save(tmp_path, arch, bits, group_size)
    model = _from_pretrained(path)
    ref, _ = load_quantized(path)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LogLinear) and layer.bits == bits and layer.group_size == group_size
        assert layer.tables.shape == ref.get_submodule(name).tables.shape
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    x = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    qc = model.config.quantization_config
    assert qc.quant_method == "logart" and qc.bits == bits and qc.modules == names


def test_import_logart_stays_light_and_hooks_later_imports(tmp_path):
    """`import logart` imports no transformers; a transformers imported afterwards knows quant_method logart."""
    path, _, _ = _save(tmp_path)
    ref, _ = load_quantized(path)  # same attention implementation as from_pretrained (the tiny model used eager)
    x = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        torch.save((x, ref(x).logits), tmp_path / "ref.pt")
    out = _python(
        "import sys, logart\n"
        "print('light', 'transformers' not in sys.modules)\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        f"x, ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad(): y = m(x).logits\n"
        "print('same', torch.equal(y, ref), type(m.get_submodule(m.config.quantization_config.modules[0])).__name__)\n")
    assert "light True" in out and "same True LogLinear" in out


def test_tied_embeddings_round_trip(tmp_path):
    """SmolLM2 ties lm_head to the embeddings: both loaders must tie them again, not ask for lm_head.weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from logart.models.tiny import TINY_CONFIGS
    from logart.quant import make_codebook
    from logart.recipes import make_recipe
    config = AutoConfig.for_model("llama", **dict(TINY_CONFIGS["llama"], tie_word_embeddings=True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    recipe = make_recipe("logart-fast", bits=4)
    cb = make_codebook(recipe.codebook)
    layers = {}
    for name, lin in model.named_modules():
        if isinstance(lin, torch.nn.Linear) and ".layers." in name:
            p = cb.fit(lin.weight)
            lin.weight.data = cb.fake_quant(lin.weight, p)
            layers[name] = (cb, p)
    path = save_quantized(model, tmp_path / "tied", layers, recipe)
    x = torch.randint(0, 200, (1, 8))
    ref, _ = load_quantized(path)
    hf = _from_pretrained(path)
    for m in (ref, hf):
        assert m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ref(x).logits)
        torch.testing.assert_close(ref(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path):
    path, _, _ = _save(tmp_path)
    _edit_tensors(path, lambda t: t.pop(next(k for k in t if k.endswith("q_proj.qweight"))))
    with pytest.raises(LogartError, match="lacks 1 tensor"):
        _from_pretrained(path)
    path, _, _ = _save(tmp_path / "b")
    _edit_tensors(path, lambda t: t.pop("model.norm.weight"))  # an unquantized tensor too
    with pytest.raises(LogartError, match="lacks 1 tensor"):
        _from_pretrained(path)


def test_wrong_shape_extra_tensor_and_corruption_fail(tmp_path):
    def shorter(t):
        k = next(k for k in t if k.endswith("row_scale"))
        t[k] = t[k][:-1].clone()

    def flipped(t):
        k = next(k for k in t if k.endswith("qweight"))
        t[k] = t[k].clone()
        t[k].view(-1)[0] ^= 1

    for i, (edit, message) in enumerate([(shorter, "has shape"), (flipped, "checksum"),
                                         (lambda t: t.__setitem__("stray.weight", torch.zeros(2)), "unexpected")]):
        path, _, _ = _save(tmp_path / str(i))
        _edit_tensors(path, edit)
        with pytest.raises(LogartError, match=message):
            _from_pretrained(path)


def test_float32_is_kept_and_save_pretrained_round_trips(tmp_path):
    path, _, _ = _save(tmp_path)
    model = _from_pretrained(path, dtype=torch.float16)  # the packed format is fp32: the request is overridden
    assert all(p.dtype in (torch.float32, torch.int32) for p in model.state_dict().values())
    model.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "logart" and cfg["modules"] == model.config.quantization_config.modules
    for again in (_from_pretrained(tmp_path / "again"), load_quantized(tmp_path / "again")[0]):
        for k, t in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], t), k


def test_export_reloads_with_plain_transformers(tmp_path):
    path, _, names = _save(tmp_path)
    packed, _ = load_quantized(path)
    x = torch.randint(0, 200, (1, 11))
    with torch.no_grad():
        ref = packed(x).logits
    torch.save((x, ref), tmp_path / "ref.pt")
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2}
    outs = {dtype: export_dequantized(path, tmp_path / str(dtype), dtype=dtype) for dtype in tolerance}
    for out in outs.values():
        cfg = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["logart_dequantized"]["bits"] == 3
    # A fresh interpreter that never imports logart loads both with transformers alone.
    got = _python(
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"x, ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        f"for d in {[str(o) for o in outs.values()]!r}:\n"
        "    m = AutoModelForCausalLM.from_pretrained(d, dtype='auto')\n"
        "    with torch.no_grad(): y = m(x).logits.float()\n"
        "    print(m.dtype, (y - ref).abs().max().item())\n"
        "assert not any(k.startswith('logart') for k in sys.modules)\n")
    scale = max(1.0, ref.abs().max().item())
    for line, (dtype, tol) in zip(got.strip().splitlines(), tolerance.items()):
        got_dtype, err = line.split()
        assert got_dtype == str(dtype) and float(err) <= tol * scale, line
    # The exported nn.Linear weights are the packed layers' dequantized weights, cast.
    from transformers import AutoModelForCausalLM
    for dtype, out in outs.items():
        plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype)
        for name in names:
            assert torch.equal(plain.get_submodule(name).weight, packed.get_submodule(name).dequantize().to(dtype))


def test_export_from_a_from_pretrained_model(tmp_path):
    path, _, names = _save(tmp_path)
    model = _from_pretrained(path)
    out = export_dequantized(model, tmp_path / "plain", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["logart_dequantized"]["bits"] == 3
    plain = _from_pretrained(out)
    assert not hasattr(plain, "hf_quantizer") or plain.hf_quantizer is None
    for name in names:
        assert torch.equal(plain.get_submodule(name).weight, model.get_submodule(name).dequantize())


def test_export_never_overwrites(tmp_path):
    path, _, _ = _save(tmp_path)
    packed, _ = load_quantized(path)
    out = export_dequantized(packed, tmp_path / "plain", dtype=torch.float32)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(LogartError, match="already exists"):
        export_dequantized(path, out)
    assert (out / "model.safetensors").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(LogartError, match="already exists"):
        export_dequantized(packed, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    export_dequantized(path, out, dtype="float16", overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_export_cli(tmp_path):
    import argparse

    from logart.io.export import add_export_parser
    path, _, _ = _save(tmp_path)
    ap = argparse.ArgumentParser()
    add_export_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["export", str(path), str(tmp_path / "plain"), "--dtype", "float32"])
    args.func(args)
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert (tmp_path / "plain" / WEIGHTS).is_file() and cfg["dtype"] == "float32" and "quantization_config" not in cfg


# --- the kernel paths and the fast unpack used by the packed layers (io/lut_kernel.cpp, io/linear.py) -------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [5, 32, 70, 576])
def test_unpack_rows_equals_unpack(bits, n):
    from logart.io.linear import unpack_rows
    from logart.quant import pack, unpack
    codes = torch.randint(0, 2 ** bits, (7, n))
    packed = pack(codes, bits)
    assert torch.equal(unpack_rows(packed, bits, n), unpack(packed, bits, n))
    assert torch.equal(unpack_rows(packed, bits, n), codes)


@pytest.mark.parametrize("method,bits,gs,o,i", [("uniform", 8, -1, 19, 72), ("uniform", 8, 32, 16, 64),
                                                ("uniform", 4, -1, 40, 100), ("uniform", 3, 16, 24, 48),
                                                ("log_dynamic", 4, -1, 3, 1536)])
@pytest.mark.parametrize("batch", [1, 5, 9])
def test_kernel_matches_reference_more_formats(method, bits, gs, o, i, batch):
    from torch import nn

    from logart.io import kernel
    from logart.quant import QuantSpec, make_codebook
    if kernel.load() is None:
        pytest.skip("no C++ compiler: the kernel is optional")
    torch.manual_seed(bits + o)
    lin = nn.Linear(i, o)
    cb = make_codebook(QuantSpec(method, bits, group_size=gs))
    p = cb.fit(lin.weight)
    lin.weight.data = cb.fake_quant(lin.weight, p)
    packed = LogLinear.from_linear(lin, cb, p)
    x = torch.randn(2, batch, i)
    ref = torch.nn.functional.linear(x, packed.dequantize(), packed.bias)
    packed.kernel = kernel.lut_forward
    with torch.no_grad():
        torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)
    if batch == 9:  # the dequantize + BLAS path keeps autograd working for the inputs
        xg = x.clone().requires_grad_(True)
        packed(xg).sum().backward()
        torch.testing.assert_close(xg.grad, packed.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
