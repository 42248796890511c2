"""Windows start with BOS exactly when the model expects it (issue #14 case 6): the tokenizer's convention,
a GGUF file's `tokenizer.ggml.add_bos_token`, or a forced choice; recorded in every results row."""

import csv
import json

import pytest
import torch

from logart.cli import main
from logart.data import calibration_windows, eval_windows
from logart.data.bos import carry_gguf_bos, gguf_add_bos, resolve_bos, tokenizer_adds_bos
from logart.errors import LogartError
from logart.models import byte_tokenizer, tiny_causal_lm

TEXT = torch.arange(3, 203)  # 200 "text tokens", none of them the BOS id 0


def test_windows_without_bos_are_unchanged():
    assert torch.equal(eval_windows(TEXT, seqlen=10, max_windows=None), TEXT.reshape(20, 10))
    assert torch.equal(calibration_windows(TEXT, 3, 10, seed=1), calibration_windows(TEXT, 3, 10, seed=1, bos=None))


def test_eval_windows_with_bos_score_every_text_token_once():
    w = eval_windows(TEXT, seqlen=10, max_windows=None, bos=0)
    assert w.shape == (22, 10) and (w[:, 0] == 0).all()
    assert torch.equal(w[:, 1:].reshape(-1), TEXT[: 22 * 9])


def test_calibration_windows_with_bos_keep_their_length():
    w = calibration_windows(TEXT, 5, 16, seed=0, bos=0)
    assert w.shape == (5, 16) and (w[:, 0] == 0).all()
    steps = w[:, 2:] - w[:, 1:-1]
    assert (steps == 1).all()   # contiguous text after BOS


def test_the_tokenizer_convention_decides():
    plain, with_bos = byte_tokenizer(), byte_tokenizer(bos=True)
    assert not tokenizer_adds_bos(plain) and tokenizer_adds_bos(with_bos)
    assert resolve_bos(plain)[0] is None
    assert resolve_bos(with_bos)[0] == 0
    assert resolve_bos(with_bos, "no")[0] is None
    with pytest.raises(LogartError, match="no BOS token"):
        resolve_bos(plain, "yes")
    with pytest.raises(LogartError, match="auto"):
        resolve_bos(plain, "sometimes")


def _gguf(path, flag):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    if flag is not None:
        w.add_bool("tokenizer.ggml.add_bos_token", flag)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("flag", [True, False, None])
def test_a_gguf_flag_is_carried_over_to_the_tokenizer(tmp_path, flag):
    path = _gguf(tmp_path / "m.gguf", flag)
    assert gguf_add_bos(path) is flag
    tok = byte_tokenizer()
    tok.bos_token = byte_tokenizer(bos=True).bos_token   # has a BOS token, does not add it
    carry_gguf_bos(tok, path)
    assert tokenizer_adds_bos(tok) is bool(flag)


@pytest.fixture
def bos_model(tmp_path):
    folder = tmp_path / "tiny-bos"
    tiny_causal_lm("llama").save_pretrained(folder)
    byte_tokenizer(bos=True).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 60)
    return folder, text


@pytest.mark.parametrize("choice, expected", [("auto", True), ("no", False)])
def test_every_results_row_says_whether_windows_start_with_bos(bos_model, tmp_path, capsys, choice, expected):
    folder, text = bos_model
    out = tmp_path / f"q-{choice}"
    args = ["quantize", "--model", folder, "--bits", 4, "--recipe", "log2-rtn", "--output", out, "--seqlen", 32,
            "--calib", text, "--eval", text, "--eval-windows", 2, "--bos", choice, "--quiet"]
    assert main([str(a) for a in args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bos"] is expected
    row = next(csv.DictReader((tmp_path / "results.csv").open()))
    assert row["bos"] == str(expected)
    capsys.readouterr()
    # the saved tokenizer keeps the convention, so a reload evaluates the same windows
    assert main([str(a) for a in ["eval", out, "--eval", text, "--seqlen", 32, "--eval-windows", 2,
                                  "--bos", choice, "--quiet"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert ("BOS first" in lines[-2]) is expected
    assert lines[-1].startswith("in-memory perplexity")


def test_bos_changes_the_fp32_perplexity_of_a_model_that_expects_it(bos_model):
    """The windows really differ: the same text with and without BOS gives another perplexity."""
    from logart.data import eval_set
    from logart.eval.perplexity import perplexity

    folder, text = bos_model
    model, tok = tiny_causal_lm("llama"), byte_tokenizer(bos=True)
    with_bos = eval_set(tok, str(text), seqlen=32, max_windows=4, cache=False, bos=0)
    without = eval_set(tok, str(text), seqlen=32, max_windows=4, cache=False)
    assert (with_bos[:, 0] == 0).all() and not (without[:, 0] == 0).any()
    assert perplexity(model, with_bos, progress=False) != perplexity(model, without, progress=False)
