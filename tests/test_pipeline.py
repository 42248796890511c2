"""The whole LLM pipeline on tiny random models: every recipe, every architecture family, the CLI, bad input."""

import csv
import json
import math

import pytest
import torch

from logart import api
from logart.cli import main
from logart.eval.perplexity import perplexity
from logart.models import byte_tokenizer, decoder_layers, linear_layers, tiny_causal_lm
from logart.errors import LogartError

ARCHS = ["llama", "mistral", "qwen2", "gemma", "opt"]


def _windows(n, length=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n, length), generator=g)


def _on_codebook(result):
    for name, (cb, p) in result.params.items():
        w = result.model.get_submodule(name).weight.detach().float()
        assert torch.equal(cb.fake_quant(w, p), w), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", ["logart-fast", "logart"])
def test_logart_recipes_on_every_family(arch, recipe):
    model = tiny_causal_lm(arch)
    calib, ev = _windows(4), _windows(2, seed=1)
    n_linear = sum(len(linear_layers(b)) for b in decoder_layers(model))
    result = api.quantize(model, recipe, calib, bits=3, progress=False, log=None, llr_iters=20)
    assert len(result.params) == len(result.layers) == n_linear
    _on_codebook(result)
    for rec in result.layers:
        # the search never ends above its own starting point (log2, s = 1, round to nearest)
        assert rec.extra["search_loss"] <= rec.loss_before * (1 + 1e-6), rec.line()
        assert sum(rec.k_hist.values()) == rec.shape[0]
    ppl = perplexity(model, ev, progress=False)
    assert math.isfinite(ppl)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("recipe", ["rtn", "gptq", "log2-rtn"])
def test_baseline_recipes(arch, recipe):
    model = tiny_causal_lm(arch)
    result = api.quantize(model, recipe, _windows(4), bits=4, progress=False, log=None)
    _on_codebook(result)
    assert math.isfinite(perplexity(model, _windows(2, seed=1), progress=False))


def test_gptq_and_llr_lower_the_layer_loss():
    """Same codebook parameters, smarter rounding: the H-weighted error of every layer goes down."""
    losses = {}
    for rounding in ("rtn", "gptq", "llr"):
        model = tiny_causal_lm("llama")
        r = api.quantize(model, "logart-fast", _windows(4), bits=3, rounding=rounding, llr_iters=200,
                         progress=False, log=None)
        losses[rounding] = sum(rec.loss_after for rec in r.layers)
    assert losses["gptq"] < losses["rtn"]
    assert losses["llr"] < losses["rtn"]


def test_model_without_decoder_blocks():
    with pytest.raises(LogartError, match="no decoder blocks"):
        api.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), "rtn", None, progress=False, log=None)


@pytest.fixture
def local_model(tmp_path):
    model = tiny_causal_lm("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    words = "the quick brown fox jumps over the lazy dog while logart quantizes every weight".split()
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (4000,), generator=g)))
    return folder, text


def _cli(*args):
    return main([str(a) for a in args])


def test_cli_quantize_eval_generate(local_model, tmp_path, capsys):
    folder, text = local_model
    out = tmp_path / "q"
    common = ["--nsamples", 4, "--seqlen", 64, "--calib", text, "--eval", text, "--eval-windows", 3, "--quiet"]
    assert _cli("quantize", "--model", folder, "--bits", 4, "--recipe", "logart-fast", "--output", out, *common) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.safetensors").is_file() and report["recipe"]["name"] == "logart-fast"
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 1 and float(rows[0]["ppl"]) == pytest.approx(report["ppl"])
    capsys.readouterr()
    assert _cli("eval", out, "--eval", text, "--seqlen", 64, "--eval-windows", 3, "--quiet") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    reloaded = float(lines[-2].split()[-1])
    assert reloaded == pytest.approx(report["ppl"], rel=1e-4)
    assert lines[-1].startswith("in-memory perplexity") and float(lines[-1].split()[-1]) < 1e-4
    assert _cli("generate", out, "the quick", "--max-new-tokens", 4) == 0


def test_cli_attention_aware(local_model, tmp_path):
    folder, text = local_model
    out = tmp_path / "aa"
    assert _cli("quantize", "--model", folder, "--bits", 3, "--recipe", "logart", "--attention-aware", "--llr-iters", 5,
                "--nsamples", 2, "--seqlen", 64, "--calib", text, "--no-eval", "--quiet", "--output", out) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["rounding"]["attention_aware"] is True
    flagged = [r["name"] for r in report["layers"] if r["extra"].get("attention_aware")]
    assert len(flagged) == 4 and all(n.endswith(("q_proj", "k_proj")) for n in flagged)


def test_cli_bad_input(local_model, tmp_path, capsys):
    folder, text = local_model
    out = tmp_path / "q"
    cases = [
        (["--model", "no-such-model"], "not an embedded model"),
        (["--model", "mobilenetv3"], "vision models: mobilenetv2, efficientnet-lite0"),   # the names that exist
        (["--model", tmp_path / "missing-folder"], "not an embedded model"),
        (["--model", folder, "--bits", 5], "5-bit weights are not supported"),
        (["--model", folder, "--calib", tmp_path / "nope.txt"], "nope.txt"),
        (["--model", folder, "--seqlen", 100000, "--calib", text], "tokens"),
        (["--model", folder, "--recipe", "logart-fast", "--attention-aware"], "attention-aware"),
    ]
    for args, message in cases:
        code = _cli("quantize", *args, "--output", out, "--no-eval", "--quiet", "--nsamples", 2)
        err = capsys.readouterr().err
        assert code == 2, args
        last = err.strip().splitlines()[-1]
        assert message in last and last.startswith("error:") and "Traceback" not in err, err
        assert not out.exists(), "a failed run must not leave a half-written output"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli("quantize", "--model", folder, "--output", out, "--no-eval", "--quiet") == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_abs_per_row_never_raises_the_first_blocks_rtn_loss():
    """On the first block (identical inputs and H in both runs) the per-row ABS choice scores every layer at or
    below the asymmetric table alone, with round-to-nearest; the weights stay on their codebooks."""
    losses = {}
    for per_row in (False, True):
        model = tiny_causal_lm("llama")
        r = api.quantize(model, "logart-fast", _windows(4), bits=3, abs_per_row=per_row, progress=False, log=None)
        _on_codebook(r)
        losses[per_row] = [rec.loss_after for rec in r.layers if ".layers.0." in rec.name]
        if per_row:
            assert any(rec.extra["symmetric_rows"] for rec in r.layers)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses[False], losses[True]))
    assert sum(losses[True]) < sum(losses[False])


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _cli("quantize", "--model", "no-such-model", "--output", blocker / "run", "--quiet") == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


def test_generate_without_a_tokenizer_says_so(tmp_path, capsys):
    from logart.api import quantize
    from logart.io.checkpoint import save_quantized
    from logart.models import tiny_causal_lm

    model = tiny_causal_lm("llama")
    result = quantize(model, "log2-rtn", None, bits=4, progress=False, log=None)
    save_quantized(model, tmp_path / "ck", result.params, result.recipe)   # no tokenizer saved
    assert _cli("generate", tmp_path / "ck", "hello") == 2
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "Traceback" not in err


def test_ctrl_c_during_quantize_says_that_rerunning_resumes(tmp_path, capsys, monkeypatch):
    import logart.pipeline

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(logart.pipeline, "run", interrupted)
    assert _cli("quantize", "--output", tmp_path / "w3", "--quiet") == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
