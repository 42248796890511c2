"""`logart report DIR` on real run folders of a tiny local model: figures, summary.md, effective bits, errors."""

import argparse
import json
import math

import pytest
import torch
from safetensors import safe_open

from logart.cli import main
from logart.errors import LogartError
from logart.models import byte_tokenizer, tiny_causal_lm
from logart.reporting import add_arguments, cmd_report, make_report
from logart.reporting.run import load_run
from logart.reporting.sizes import measure

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama saved as a local HF folder, a text file for calibration, and a helper that runs
    `logart quantize` on them into a fresh folder."""
    tmp = tmp_path_factory.mktemp("report")
    folder = tmp / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    words = "the quick brown fox jumps over the lazy dog while logart quantizes every weight".split()
    g = torch.Generator().manual_seed(0)
    text = tmp / "text.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (2000,), generator=g)))

    def quantize(name, *args):
        out = tmp / name
        common = ["--model", folder, "--calib", text, "--nsamples", 2, "--seqlen", 32, "--no-eval", "--quiet",
                  "--output", out, "--results", tmp / "results.csv"]
        assert main(["quantize", *map(str, common), *map(str, args)]) == 0
        return out

    return folder, quantize


@pytest.fixture(scope="module")
def run3(tiny):
    """LogART (DBS + SFS + ABS), 3 bits, per output channel."""
    _, quantize = tiny
    return quantize("q3", "--recipe", "logart-fast", "--bits", 3)


def _report_args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_cmd_report_writes_figures_and_summary(run3, capsys):
    report = cmd_report(_report_args(run3))
    out = run3 / "report"
    assert report.out == out
    for name in ("errors.png", "k_distribution.png", "s_distribution.png"):
        assert _is_png(out / name), name
    # the default picks: the first q_proj, a middle down_proj, the last layer (2 blocks: layer 0's down_proj)
    assert list(report.rows) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                 "model.layers.1.mlp.down_proj"]
    for name in report.rows:
        assert _is_png(out / f"codebook_{name}.png"), name
    summary = (out / "summary.md").read_text()
    for png in [p for p in report.figures.values() if p is not None]:
        assert f"]({png.name})" in summary
    for needle in ("logart-fast", "log_dynamic 3-bit, per output channel, asymmetric (ABS)", "effective bits per weight",
                   "quantization time", "peak RSS", "## Chosen k across rows", "## Top 10 layers"):
        assert needle in summary, needle
    top = [line for line in summary.splitlines() if line.startswith("| ") and "`model.layers." in line]
    assert len(top) == 10
    losses = [float(line.split("|")[5]) for line in top]       # the "error after" column, largest first
    assert losses == sorted(losses, reverse=True)
    printed = capsys.readouterr().out
    assert f"effective bits per weight: {report.effective_bits:.3f}" in printed


def test_effective_bits_by_hand(run3):
    """Per channel, 3 bits: each row of `in` weights packs into ceil(in/32)*3 int32 words, plus a float32 scale and
    an int32 table index per row, plus the layer's tables (n_tables x 8 float32)."""
    run = load_run(run3)
    sizes = measure(run)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    bits = weights = 0
    with safe_open(str(run3 / "model.safetensors"), framework="pt") as f:
        for b in range(2):
            for leaf, (out, inp) in shapes.items():
                prefix = f"model.layers.{b}.{'mlp' if leaf in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{leaf}"
                n_tables = f.get_slice(f"{prefix}.tables").get_shape()[0]
                layer_bits = out * math.ceil(inp / 32) * 3 * 32 + out * 32 + out * 32 + n_tables * 8 * 32
                assert sizes.per_layer[prefix] == pytest.approx(layer_bits / (out * inp))
                if leaf == "q_proj":   # 64 x 64: 3 bits of codes + 32/64 + 32/64 per weight + the tables
                    assert sizes.per_layer[prefix] == pytest.approx(4 + n_tables / 16)
                bits += layer_bits
                weights += out * inp
    assert sizes.weights == weights == 2 * sum(o * i for o, i in shapes.values())
    assert sizes.effective_bits == pytest.approx(bits / weights)
    assert sizes.bits_of("qweight") == pytest.approx(3.0)       # every row length here is a multiple of 32
    # fp32 equivalent: every tensor of the checkpoint at 4 bytes per element, packed linears as out x in
    cfg = json.loads((run3 / "config.json").read_text())
    hidden, vocab, n_linear = cfg["hidden_size"], cfg["vocab_size"], weights
    norms = hidden * (2 * 2 + 1)
    assert sizes.fp32_bytes == 4 * (n_linear + 2 * vocab * hidden + norms)
    assert sizes.file_bytes == (run3 / "model.safetensors").stat().st_size
    summary = make_report(run3, log=None).summary.read_text()
    assert f"**{bits / weights:.3f}**" in summary


def test_layers_regex_row_and_fp_overlay(run3, tiny, tmp_path):
    folder, _ = tiny
    report = make_report(run3, layers=[r"layers\.1\.self_attn\.(k|v)_proj"], out=tmp_path / "r", model=folder,
                         row=5, log=None)
    assert report.out == tmp_path / "r" and report.fp_overlay
    assert report.rows == {"model.layers.1.self_attn.k_proj": 5, "model.layers.1.self_attn.v_proj": 5}
    assert all(_is_png(tmp_path / "r" / f"codebook_{n}.png") for n in report.rows)
    with pytest.raises(LogartError, match="no quantized layer matches"):
        make_report(run3, layers=["no_such_layer"], out=tmp_path / "r2", log=None)
    with pytest.raises(LogartError, match="--row between 0 and 31"):
        make_report(run3, layers=["layers.1.self_attn.k_proj"], out=tmp_path / "r3", row=32, log=None)


def test_row_view_matches_the_packed_model(run3, tiny):
    """The drawn levels are the row's whole table and its values are what the packed layer computes with."""
    from logart.io.checkpoint import load_quantized
    from logart.reporting.rows import row_view
    folder, _ = tiny
    run = load_run(run3)
    name = "model.layers.0.mlp.down_proj"
    fp = tiny_causal_lm("llama").get_submodule(name).weight.detach()
    view = row_view(run, name, 7, fp)
    model, _ = load_quantized(run3)
    layer = model.get_submodule(name)
    assert len(view.levels) == 8 and view.counts.sum() == 128
    assert torch.equal(torch.from_numpy(view.values).float(), layer.dequantize()[7])
    assert set(view.values.tolist()) <= set(view.levels.tolist())
    assert torch.equal(torch.from_numpy(view.fp).float(), fp[7])
    assert 0 < view.fp_error < 0.5
    assert {"k", "s", "top", "asym"} <= set(view.choices)


@pytest.mark.parametrize("args", [
    ("--recipe", "log2-rtn", "--bits", 4, "--group-size", 32),     # data-free log2: one k, s = 1, groups
    ("--recipe", "rtn", "--bits", 4),                                 # uniform: no k or s to plot
    ("--recipe", "log2-rtn", "--bits", 3, "--mode", "reference"),    # no packed checkpoint at all
])
def test_other_recipes(tiny, args):
    _, quantize = tiny
    out = quantize("run-" + "-".join(map(str, args)).replace("--", ""), *args)
    report = make_report(out, log=None)
    summary = report.summary.read_text()
    assert _is_png(out / "report" / "errors.png")
    if "reference" in args:
        assert report.effective_bits is None and not report.rows
        assert "no packed checkpoint" in summary
    elif "rtn" in args and "log2-rtn" not in args:
        assert report.figures["chosen k across rows"] is None and report.figures["chosen s across rows"] is None
        assert "uniform codebook" in summary and len(report.rows) == 3
    else:
        assert _is_png(out / "report" / "k_distribution.png") and _is_png(out / "report" / "s_distribution.png")
        assert "weight error" in summary            # data-free: the records hold weight errors, not H-weighted
        # groups of 32: 4 bits of codes + 64 bits of scale and index per 32 weights + tables
        assert 6.0 < report.effective_bits < 7.0


def test_folder_without_report_json(tmp_path):
    with pytest.raises(LogartError, match=r"has no report\.json.*Fix: pass the --output folder"):
        make_report(tmp_path, log=None)
    with pytest.raises(LogartError, match="is not a folder"):
        make_report(tmp_path / "missing", log=None)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(LogartError, match="not valid JSON"):
        make_report(tmp_path, log=None)
    assert not (tmp_path / "report").exists()


def test_report_arguments():
    args = _report_args("runs/x", "--layers", "q_proj", "--layers", r"layers\.3\.", "--row", 2, "--model", "m")
    assert (args.dir, args.layers, args.row, args.model, args.out) == ("runs/x", ["q_proj", r"layers\.3\."], 2, "m", None)
    assert _report_args("runs/x").layers == []


def test_k_plot_leaves_out_layers_on_another_codebook(tiny):
    """With layer 0 at 4 bits in a 3-bit run, k of layer 0 counts 8 levels, not 4: it stays out of the k plot,
    and the summary says so."""
    _, quantize = tiny
    out = quantize("mixed", "--recipe", "logart-fast", "--bits", 3, "--override", r"layers\.0\.:bits=4")
    report = make_report(out, log=None)
    assert _is_png(out / "report" / "k_distribution.png")
    assert "leaves out 7 layers" in report.summary.read_text()
