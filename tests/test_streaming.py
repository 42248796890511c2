"""Larger-than-memory runs: a model streamed block by block from its shards, under a weight budget smaller than
the model, ends with exactly the checkpoint of the in-memory run."""

import json

import pytest
import torch
from safetensors.torch import load_file

import logart.calib.driver as driver
from logart.cli import main
from logart.models import byte_tokenizer, tiny_causal_lm
from logart.models.streaming import parse_size, resident_bytes


class Interrupt(Exception):
    pass


@pytest.fixture
def sharded(tmp_path):
    """A tiny llama saved in several shards, converted by `logart convert`, and a text file."""
    model = tiny_causal_lm("llama", num_hidden_layers=6)   # blocks, not embeddings, hold most weights
    src = tmp_path / "src"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    folder = tmp_path / "sharded"
    assert main(["convert", str(src), str(folder), "--shard-size", "40KB"]) == 0
    assert len(list(folder.glob("*.safetensors"))) > 2
    text = tmp_path / "text.txt"
    words = "a model larger than memory is quantized one block at a time from its shards".split()
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=g)))
    return folder, text, resident_bytes(model)


def _quantize(folder, text, out, *extra):
    args = ["quantize", "--model", folder, "--bits", 3, "--recipe", "logart-fast", "--output", out,
            "--nsamples", 3, "--seqlen", 48, "--calib", text, "--eval", text, "--eval-windows", 2, "--quiet", *extra]
    return main([str(a) for a in args])


def _same_checkpoint(a, b):
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_streaming_under_a_budget_matches_the_in_memory_run(sharded, tmp_path):
    folder, text, model_bytes = sharded
    assert _quantize(folder, text, tmp_path / "mem") == 0
    budget = int(model_bytes * 0.6)
    assert _quantize(folder, text, tmp_path / "stream", "--max-memory", budget) == 0
    _same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    mem = json.loads((tmp_path / "mem" / "report.json").read_text())
    stream = json.loads((tmp_path / "stream" / "report.json").read_text())
    assert stream["streaming"]["peak_weights_mib"] * 2**20 <= budget
    assert stream["ppl"] == pytest.approx(mem["ppl"], rel=1e-4)   # packed model vs fake-quantized floats


def test_streaming_with_overrides_and_ends_matches_the_in_memory_run(sharded, tmp_path):
    """Per-module codebooks are packed block by block, the head is calibrated on the packed blocks."""
    folder, text, model_bytes = sharded
    extra = ["--override", r"layers\.[0-2]\.:bits=4,group_size=16", "--override", "mlp:recipe=rtn", "--lm-head",
             "--embeddings"]
    assert _quantize(folder, text, tmp_path / "mem", *extra) == 0
    assert _quantize(folder, text, tmp_path / "stream", "--max-memory", int(model_bytes * 0.8), *extra) == 0
    _same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    qc = json.loads((tmp_path / "stream" / "config.json").read_text())["quantization_config"]
    assert {"lm_head", "model.embed_tokens"} <= set(qc["modules"]) and qc["module_specs"]


def test_a_budget_below_one_block_is_refused(sharded, tmp_path, capsys):
    folder, text, model_bytes = sharded
    assert _quantize(folder, text, tmp_path / "out", "--max-memory", int(model_bytes * 0.2)) == 2
    err = capsys.readouterr().err
    assert "over the budget" in err and "raise --max-memory" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_streaming_needs_a_safetensors_folder(sharded, tmp_path, capsys):
    _, text, _ = sharded
    assert _quantize("smollm2-135m", text, tmp_path / "out", "--max-memory", "1GB") == 2
    assert "logart convert" in capsys.readouterr().err


def test_streaming_run_resumes_after_a_kill(sharded, tmp_path, monkeypatch):
    folder, text, model_bytes = sharded
    budget = int(model_bytes * 0.6)
    assert _quantize(folder, text, tmp_path / "ref", "--max-memory", budget) == 0
    real, calls = driver.quantize_site, {"n": 0}

    def dies_in_block_1(*a, **k):
        calls["n"] += 1
        if calls["n"] == 17:   # 7 linears per block: this is the middle of block 2
            raise Interrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(driver, "quantize_site", dies_in_block_1)
        with pytest.raises(Interrupt):
            _quantize(folder, text, tmp_path / "work", "--max-memory", budget)
    assert (tmp_path / "work.partial" / "state.json").is_file()
    assert _quantize(folder, text, tmp_path / "work", "--max-memory", budget) == 0
    _same_checkpoint(tmp_path / "ref", tmp_path / "work")


@pytest.mark.parametrize("text, expected", [("300MB", 300_000_000), ("1.5GiB", int(1.5 * 2**30)), ("2048", 2048)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected
