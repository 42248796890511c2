"""Fault injection (issue #14): a valid tiny checkpoint, many broken variants of it, bad command lines and bad
data files. Every fault ends in one `LogartError` (API) or exit code 2 with one `error: ... Fix: ...` line (CLI),
naming the file or option, without a traceback, and no file of the user changes. Test ids carry the count.

The classes of faults and what each gets are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from logart.api import quantize
from logart.cli import main
from logart.errors import LogartError
from logart.io.checkpoint import _sha256, load_quantized, save_quantized
from logart.models import byte_tokenizer, tiny_causal_lm

WEIGHTS = "model.safetensors"


# ------------------------------------------------------------------ the valid checkpoint and its copies

@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid packed checkpoint of a one-block tiny Llama (with tokenizer) and a text to evaluate it on."""
    root = tmp_path_factory.mktemp("faults")
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    result = quantize(model, "log2-rtn", None, bits=4, progress=False, log=None)
    save_quantized(model, root / "ck", result.params, result.recipe, tokenizer=byte_tokenizer())
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    return root / "ck", text


@pytest.fixture(scope="module")
def reference_state(valid):
    model, _ = load_quantized(valid[0])
    return {k: v.clone() for k, v in model.state_dict().items()}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ ways to break a checkpoint

def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of one tensor's data."""
    n, header = _header(path)
    a, b = header[name]["data_offsets"]
    return 8 + n + a, 8 + n + b


def _rewrite(folder: Path, edit, rehash: bool = True) -> None:
    """Edit the tensors of model.safetensors (`edit(tensors, meta)`), recomputing the checksums unless told not
    to: then only the other checks can catch the fault."""
    path = folder / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    if rehash and "logart.sha256" in meta:
        meta["logart.sha256"] = json.dumps({k: _sha256(v) for k, v in tensors.items()})
    save_file(tensors, path, metadata=meta)


def _bytes(folder: Path, change) -> None:
    path = folder / WEIGHTS
    path.write_bytes(change(bytearray(path.read_bytes())))


def _truncate(at):
    def fault(folder):
        size = (folder / WEIGHTS).stat().st_size
        n = at(size, _header(folder / WEIGHTS)[0]) if callable(at) else at
        _bytes(folder, lambda b: b[:n])
    return fault


def _flip(tensor: str, bit: int = 0):
    def fault(folder):
        start, _ = _span(folder / WEIGHTS, tensor)

        def change(b):
            b[start] ^= 1 << bit
            return b
        _bytes(folder, change)
    return fault


def _zero(tensor: str):
    def fault(folder):
        start, end = _span(folder / WEIGHTS, tensor)

        def change(b):
            b[start:end] = bytes(end - start)
            return b
        _bytes(folder, change)
    return fault


def _poison(tensor: str, value: float):
    def edit(t, _meta):
        t[tensor] = t[tensor].clone()
        t[tensor].view(-1)[0] = value
    return lambda folder: _rewrite(folder, edit)


def _tensor_edit(fn, rehash=True):
    return lambda folder: _rewrite(folder, lambda t, meta: fn(t, meta), rehash)


def _config(edit):
    def fault(folder):
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        edit(cfg, cfg["quantization_config"])
        path.write_text(json.dumps(cfg))
    return fault


def _file(name: str, content: bytes | None):
    def fault(folder):
        path = folder / name
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
    return fault


def _set(key, value):
    def edit(cfg, qc):
        (qc if key.startswith("qc.") else cfg)[key.removeprefix("qc.")] = value
    return edit


def _drop(key):
    def edit(cfg, qc):
        (qc if key.startswith("qc.") else cfg).pop(key.removeprefix("qc."))
    return edit


L0 = "model.layers.0"
FLOAT_TENSORS = ["lm_head.weight", "model.embed_tokens.weight", f"{L0}.input_layernorm.weight",
                 f"{L0}.post_attention_layernorm.weight", "model.norm.weight"] + [
    f"{L0}.{m}.{part}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") for part in ("row_scale", "tables")]
Q = f"{L0}.self_attn.q_proj"

# name -> (how to break the folder, a word the error line must contain)
FAULTS = {
    "truncated-empty": (_truncate(0), WEIGHTS),
    "truncated-in-length": (_truncate(5), WEIGHTS),
    "truncated-after-length": (_truncate(8), WEIGHTS),
    "truncated-mid-header": (_truncate(lambda size, n: 8 + n // 2), WEIGHTS),
    "truncated-after-header": (_truncate(lambda size, n: 8 + n), WEIGHTS),
    "truncated-mid-data": (_truncate(lambda size, n: (8 + n + size) // 2), WEIGHTS),
    "truncated-last-byte": (_truncate(lambda size, n: size - 1), WEIGHTS),
    "header-length-too-large": (lambda f: _bytes(f, lambda b: struct.pack("<Q", 2 ** 40) + b[8:]), WEIGHTS),
    "header-length-zero": (lambda f: _bytes(f, lambda b: bytes(8) + b[8:]), WEIGHTS),
    "header-bit-flip": (lambda f: _bytes(f, lambda b: b[:8] + bytes([b[8] ^ 4]) + b[9:]), WEIGHTS),
    "zero-bytes-codes": (_zero(f"{Q}.qweight"), "checksum"),
    "zero-bytes-scales": (_zero(f"{Q}.row_scale"), "checksum"),
    "bit-flip-codes": (_flip(f"{Q}.qweight", 3), "checksum"),
    "bit-flip-scales": (_flip(f"{Q}.row_scale", 1), "checksum"),
    "bit-flip-tables": (_flip(f"{Q}.tables", 2), "checksum"),
    "bit-flip-table-index": (_flip(f"{Q}.table_index", 0), "checksum"),
    "bit-flip-embeddings": (_flip("model.embed_tokens.weight", 7), "checksum"),
    **{f"nan-{name}": (_poison(name, math.nan), "NaN") for name in FLOAT_TENSORS},
    **{f"inf-{name}": (_poison(name, math.inf), "NaN or inf") for name in FLOAT_TENSORS},
    "deleted-tensor": (_tensor_edit(lambda t, m: t.pop(f"{Q}.qweight")), "lacks"),
    "renamed-tensor": (_tensor_edit(lambda t, m: t.update({f"{Q}.codes": t.pop(f"{Q}.qweight")})), "lacks"),
    "extra-tensor": (_tensor_edit(lambda t, m: t.update({"model.extra": torch.zeros(3)})), "unexpected"),
    "reshaped-tensor": (_tensor_edit(lambda t, m: t.update({f"{Q}.row_scale": t[f"{Q}.row_scale"][:32]})), "shape"),
    "retyped-scales": (_tensor_edit(lambda t, m: t.update({f"{Q}.row_scale": t[f"{Q}.row_scale"].double()})), "float64"),
    "retyped-codes": (_tensor_edit(lambda t, m: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].long()})), "int64"),
    "table-index-out-of-range": (_tensor_edit(lambda t, m: t[f"{Q}.table_index"].fill_(3)), "table_index"),
    "edited-tensor-old-checksum": (_tensor_edit(lambda t, m: t["model.norm.weight"].mul_(2), rehash=False), "checksum"),
    "checksum-metadata-garbled": (_tensor_edit(lambda t, m: m.update({"logart.sha256": "{not json"}), rehash=False),
                                  "checksum"),
    "weights-missing": (_file(WEIGHTS, None), WEIGHTS),
    "weights-not-safetensors": (_file(WEIGHTS, b"PK\x03\x04 this is a zip file, not safetensors"), WEIGHTS),
    "config-missing": (_file("config.json", None), "config.json"),
    "config-empty": (_file("config.json", b""), "config.json"),
    "config-invalid-json": (_file("config.json", b'{"model_type": "llama",'), "config.json"),
    "config-a-list": (_file("config.json", b"[1, 2, 3]"), "config.json"),
    "config-not-utf8": (_file("config.json", b"\xff\xfe{\x00"), "config.json"),
    "config-model-type-unknown": (_config(_set("model_type", "no-such-architecture")), "model_type"),
    "config-hidden-size-changed": (_config(_set("hidden_size", 32)), "shape"),
    "config-more-layers": (_config(_set("num_hidden_layers", 2)), "lacks"),
    "config-vocab-changed": (_config(_set("vocab_size", 300)), "shape"),
    "qc-missing": (_config(_drop("quantization_config")), "not a logart checkpoint"),
    "qc-quant-method-other": (_config(_set("qc.quant_method", "gptq")), "not a logart checkpoint"),
    "qc-future-format": (_config(_set("qc.format_version", 99)), "format version 99"),
    "qc-format-missing": (_config(_drop("qc.format_version")), "format version"),
    "qc-bits-unsupported": (_config(_set("qc.bits", 5)), "5-bit"),
    "qc-bits-a-string": (_config(_set("qc.bits", "four")), "four-bit"),
    "qc-group-size-changed": (_config(_set("qc.group_size", 16)), "shape"),
    "qc-group-size-invalid": (_config(_set("qc.group_size", -7)), "group"),
    "qc-module-unknown": (_config(lambda c, qc: qc["modules"].append("model.layers.7.mlp.up_proj")), "lacks"),
    "qc-modules-missing": (_config(_drop("qc.modules")), "modules"),
    "qc-module-not-a-linear": (_config(lambda c, qc: qc["modules"].append("model.norm")), "model.norm"),
    "qc-module-spec-bits": (_config(lambda c, qc: qc["module_specs"].update({Q: {"bits": 3}})), "shape"),
}
TOKENIZER_FAULTS = {   # the model loads; what needs the tokenizer (eval, generate) refuses
    "tokenizer-missing": (lambda f: [_file(n, None)(f) for n in ("tokenizer.json", "tokenizer_config.json")],
                          "no tokenizer"),
    "tokenizer-invalid-json": (_file("tokenizer.json", b"{ broken"), "tokenizer"),
}
ALL = {**FAULTS, **TOKENIZER_FAULTS}
IDS = [f"fault-{i:02d}-of-{len(ALL)}-{name}" for i, name in enumerate(ALL, 1)]


def test_the_suite_is_large_enough():
    assert len(ALL) >= 40


def _broken(valid, tmp_path, name):
    folder = _copy(valid[0], tmp_path / "ck")
    ALL[name][0](folder)
    return folder


def _one_error_line(err: str, word: str):
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and " Fix: " in lines[0], err
    assert word.lower() in lines[0].lower(), err
    return lines[0]


@pytest.mark.parametrize("name", list(ALL), ids=IDS)
def test_the_cli_refuses_a_broken_checkpoint(valid, tmp_path, capsys, name):
    folder = _broken(valid, tmp_path, name)
    before, text_before = _digest(folder), valid[1].read_bytes()
    code = main(["eval", str(folder), "--eval", str(valid[1]), "--seqlen", "16", "--eval-windows", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    line = _one_error_line(err, ALL[name][1])
    assert str(folder) in line or "tokenizer" in line or "--" in line, line   # names the file
    assert _digest(folder) == before and valid[1].read_bytes() == text_before   # nothing of the user changed


@pytest.mark.parametrize("name", list(FAULTS), ids=[i for i in IDS if not i.split("-", 4)[-1].startswith("tokenizer")])
def test_the_api_refuses_a_broken_checkpoint(valid, tmp_path, name):
    folder = _broken(valid, tmp_path, name)
    with pytest.raises(LogartError, match="Fix:") as e:
        load_quantized(folder)
    assert str(folder) in str(e.value)


@pytest.mark.parametrize("name", [n for n in FAULTS if not n.startswith(("config", "qc", "weights-missing"))])
def test_from_pretrained_refuses_a_broken_weights_file(valid, tmp_path, capfd, name):
    """transformers' door: the same check once config.json is sound (its own JSON errors are its own), and
    before transformers could print its misleading "newly initialized weights" table."""
    import logart  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    folder = _broken(valid, tmp_path, name)
    with pytest.raises(LogartError, match="Fix:") as e:
        AutoModelForCausalLM.from_pretrained(folder)
    assert WEIGHTS in str(e.value)
    printed = capfd.readouterr()
    assert "newly initialized" not in printed.err + printed.out and "MISSING" not in printed.err + printed.out


def test_a_checkpoint_without_checksums_loads_with_the_documented_warning(valid, tmp_path):
    folder = _copy(valid[0], tmp_path / "ck")
    # as transformers' save_pretrained re-saves it: no logart metadata at all
    _rewrite(folder, lambda t, meta: [meta.pop(k) for k in ("logart.sha256", "logart.format_version")], rehash=False)
    with pytest.warns(UserWarning, match="cannot be verified"):
        load_quantized(folder)
    # only the checksums gone while logart's own mark stays: a damaged header, refused
    folder = _copy(valid[0], tmp_path / "ck2")
    _rewrite(folder, lambda t, meta: meta.pop("logart.sha256"), rehash=False)
    with pytest.raises(LogartError, match="checksum metadata"):
        load_quantized(folder)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_corruption_is_refused_or_harmless(valid, reference_state, tmp_path_factory, data):
    """Any change of a few bytes of the weights file either gives a LogartError or a model identical to the
    original (a change that means nothing, e.g. inside unused header padding): never a different model."""
    folder = _copy(valid[0], tmp_path_factory.mktemp("random") / "ck")
    raw = bytearray((folder / WEIGHTS).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255).filter(lambda v, old=raw[at]: v != old))
    (folder / WEIGHTS).write_bytes(bytes(raw))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _ = load_quantized(folder)
    except LogartError:
        return
    if any("cannot be verified" in str(w.message) for w in caught):
        return   # the documented warning: the checksums themselves were hit (needs two lucky changes)
    state = model.state_dict()
    changed = [k for k, v in reference_state.items() if not torch.equal(state[k], v)]
    assert not changed, f"a corrupted file loaded as a different model: {changed}"


def test_report_checks_the_checkpoint_before_writing_any_figure(valid, tmp_path, capsys):
    folder = _broken(valid, tmp_path, "truncated-mid-data")
    (folder / "report.json").write_text(json.dumps({"model": "tiny", "recipe": {"name": "log2-rtn"}, "layers": []}))
    assert main(["report", str(folder)]) == 2
    _one_error_line(capsys.readouterr().err, WEIGHTS)
    assert not (folder / "report").exists()


# ------------------------------------------------------------------ bad command lines and bad data files

@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = root / "tiny"
    tiny_causal_lm("llama", num_hidden_layers=1).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    files = {
        "text": "the quick brown fox jumps over the lazy dog " * 40,
        "empty.txt": "",
        "blank.txt": " \n\n \t\n",
        "short.txt": "too short",
        "bad.jsonl": '{"text": "fine"}\n{"text": broken\n',
        "nofield.jsonl": '{"body": "no text field here"}\n',
        "numbers.json": "[1, 2, 3]",
    }
    for name, content in files.items():
        (root / name).write_text(content)
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "a-file").write_text("I am a file")
    (root / "kept").mkdir()
    (root / "kept" / "mine.txt").write_text("the user's own file")
    return root, folder


def _bad_lines(root: Path, folder: Path) -> dict:
    q = ["quantize", "--model", str(folder), "--quiet", "--no-eval", "--nsamples", "2", "--seqlen", "32",
         "--calib", str(root / "text"), "--recipe", "logart-fast"]   # a recipe that reads its calibration
    out = ["--output", str(root / "out")]
    return {   # name -> (argv, a word the error line must contain)
        "unknown-model": (["quantize", "--model", "no-such-model", *out], "no-such-model"),
        "missing-folder": (["quantize", "--model", str(root / "nope"), *out], "nope"),
        "bits-5": ([*q, "--bits", "5", *out], "5-bit"),
        "bits-1": ([*q, "--bits", "1", *out], "1-bit"),
        "group-size-negative": ([*q, "--group-size", "-3", *out], "group"),
        "nsamples-zero": ([*q, "--nsamples", "0", *out], "nsamples"),
        "seqlen-zero": ([*q, "--seqlen", "0", *out], "seqlen"),
        "seqlen-too-long": ([*q, "--seqlen", "100000", *out], "tokens"),
        "calib-missing": ([*q, "--calib", str(root / "missing.txt"), *out], "missing.txt"),
        "calib-empty": ([*q, "--calib", str(root / "empty.txt"), *out], "empty.txt"),
        "calib-blank": ([*q, "--calib", str(root / "blank.txt"), *out], "blank.txt"),
        "calib-too-short": ([*q, "--calib", str(root / "short.txt"), *out], "short.txt"),
        "calib-binary": ([*q, "--calib", str(root / "binary.txt"), *out], "binary.txt"),
        "calib-bad-jsonl": ([*q, "--calib", str(root / "bad.jsonl"), *out], "bad.jsonl"),
        "calib-no-field": ([*q, "--calib", str(root / "nofield.jsonl"), *out], "nofield.jsonl"),
        "calib-json-numbers": ([*q, "--calib", str(root / "numbers.json"), *out], "numbers.json"),
        "calib-cold-hf": ([*q, "--calib", "hf:no-such-dataset", *out], "no-such-dataset"),
        "eval-missing": ([a for a in q if a != "--no-eval"] + ["--eval", str(root / "gone.txt"), *out], "gone.txt"),
        "override-syntax": ([*q, "--override", "no-colon-here", *out], "--override"),
        "override-unknown-key": ([*q, "--override", "q_proj:colour=blue", *out], "colour"),
        "override-bad-regex": ([*q, "--override", "q_proj(:bits=3", *out], "--override"),
        "ignore-bad-regex": ([*q, "--ignore", "q_proj(", *out], "--ignore"),
        "ignore-matches-nothing": ([*q, "--ignore", "no_such_layer", *out], "no_such_layer"),
        "output-under-a-file": ([*q, "--output", str(root / "a-file" / "run")], "a-file"),
        "output-not-empty": ([*q, "--output", str(root / "kept")], "kept"),
        "max-memory-garbage": ([*q, "--max-memory", "lots", *out], "lots"),
        "fp-target-out-of-range": ([*q, "--fp-target", "3", *out], "fp"),
        "llr-iters-negative": ([*q, "--recipe", "logart", "--llr-iters", "-5", *out], "llr"),
        "qdrop-out-of-range": ([*q, "--reconstruct", "block", "--qdrop", "1.5", *out], "qdrop"),
        "bos-yes-without-bos": ([*q, "--bos", "yes", *out], "--bos"),
        "eval-missing-dir": (["eval", str(root / "no-run")], "no-run"),
        "generate-missing-dir": (["generate", str(root / "no-run"), "hi"], "no-run"),
        "report-missing-dir": (["report", str(root / "no-run")], "no-run"),
        "export-onto-user-folder": (["export", str(root / "no-run"), str(root / "kept")], "no-run"),
    }


BAD_LINE_NAMES = list(_bad_lines(Path("r"), Path("f")))
BAD_IDS = [f"bad-{i:02d}-of-{len(BAD_LINE_NAMES)}-{name}" for i, name in enumerate(BAD_LINE_NAMES, 1)]


def test_enough_bad_command_lines():
    assert len(BAD_LINE_NAMES) >= 20


@pytest.mark.parametrize("name", BAD_LINE_NAMES, ids=BAD_IDS)
def test_a_bad_command_line_is_one_clear_error(local, capsys, name):
    root, folder = local
    argv, word = _bad_lines(root, folder)[name]
    before = _digest(root)
    try:
        code = main(argv)
    finally:   # a case that wrongly succeeds must not break the next ones
        shutil.rmtree(root / "out", ignore_errors=True)
    err = capsys.readouterr().err
    assert code == 2, err
    _one_error_line(err, word)
    assert _digest(root) == before, "a failed run changed the user's files"
    assert not list(root.glob("*.tmp-*")) and not list(root.glob(".*.tmp-*"))
