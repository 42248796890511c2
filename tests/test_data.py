"""logart.data: text sources, windows, the window cache. Fast: a byte-level tokenizer, no model."""

import gzip
import json
import random

import pytest
import torch

from logart.data import (TextSource, calibration_set, calibration_windows, eval_set, eval_windows, load_text,
                         packaged_news_text, packaged_wikipedia_text, text_source, tokenize)
from logart.data import cache as cache_mod
from logart.errors import LogartError
from logart.models import byte_tokenizer

DOCS = [f"Document {i}: " + " ".join(f"word{j * i % 97}" for j in range(60)) for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def ids(tok):
    return tokenize(tok, load_text(DOCS))


def test_tokenize_shape_and_no_special_tokens(tok):
    ids = tokenize(tok, "abc")
    assert ids.dtype == torch.long and ids.shape == (1, 3)
    assert ids[0].tolist() == list(b"abc")


def test_calibration_windows_shape_and_determinism(ids):
    a = calibration_windows(ids, nsamples=5, seqlen=64, seed=0)
    assert a.shape == (5, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(ids, nsamples=5, seqlen=64, seed=0))
    assert not torch.equal(a, calibration_windows(ids, nsamples=5, seqlen=64, seed=1))


def test_calibration_windows_follow_global_random_seed_protocol(ids):
    """Same starts as `random.seed(seed)` + `random.randint(0, n - seqlen - 1)` (PROTOCOL.md), without
    touching the global generator."""
    state = random.getstate()
    windows = calibration_windows(ids, nsamples=4, seqlen=32, seed=7)
    assert random.getstate() == state
    random.seed(7)
    flat = ids[0]
    for w in windows:
        start = random.randint(0, flat.numel() - 32 - 1)
        assert torch.equal(w, flat[start:start + 32])
    random.setstate(state)


def test_eval_windows_first_nonoverlapping_remainder_dropped(ids):
    n = ids.shape[1]
    every = eval_windows(ids, seqlen=100, max_windows=None)
    assert every.shape == (n // 100, 100)
    assert torch.equal(every.reshape(-1), ids[0, : (n // 100) * 100])
    assert torch.equal(eval_windows(ids, seqlen=100, max_windows=2), every[:2])


def test_too_short_text_names_counts(tok):
    ids = tokenize(tok, "short text")
    with pytest.raises(LogartError, match=r"has 10 tokens.*at least 65"):
        calibration_windows(ids, nsamples=1, seqlen=64)
    with pytest.raises(LogartError, match=r"has 10 tokens.*at least 64"):
        eval_windows(ids, seqlen=64)
    # exactly seqlen + 1 tokens is enough for one calibration window (the reference crashed here, Q9)
    assert calibration_windows(tokenize(tok, "x" * 65), nsamples=3, seqlen=64).shape == (3, 64)


def _write(path, payload: str):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(payload)
    return path


def test_same_text_from_list_and_files(tmp_path, tok):
    joined = "\n\n".join(DOCS)
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    files = [
        _write(tmp_path / "a.txt", joined),
        _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in records) + "\n"),
        _write(tmp_path / "a.jsonl.gz", "\n".join(json.dumps(r) for r in records)),
        _write(tmp_path / "a.json.gz", json.dumps(records)),
        _write(tmp_path / "b.json", json.dumps({"text": DOCS})),
        _write(tmp_path / "c.json", json.dumps(DOCS)),
    ]
    reference = calibration_windows(tokenize(tok, load_text(DOCS)), nsamples=3, seqlen=64)
    assert torch.equal(calibration_windows(tokenize(tok, joined), nsamples=3, seqlen=64), reference)
    for path in files:
        assert load_text(path) == joined, path.name
        assert load_text(str(path)) == joined, path.name
        assert torch.equal(calibration_windows(tokenize(tok, load_text(path)), nsamples=3, seqlen=64), reference)


def test_custom_json_field(tmp_path):
    path = _write(tmp_path / "x.jsonl", json.dumps({"content": "hello"}) + "\n")
    assert load_text(path, field="content") == "hello"
    with pytest.raises(LogartError, match="field 'text'"):
        load_text(path)


@pytest.mark.parametrize("bad", ["no/such/file.txt", "not a corpus name", 42, ["ok", 3]])
def test_bad_sources_raise(bad):
    with pytest.raises(LogartError):
        text_source(bad)


def test_broken_file_raises(tmp_path):
    with pytest.raises(LogartError, match="cannot read"):
        load_text(_write(tmp_path / "bad.json", "{not json"))


def test_packaged_news_text():
    text = packaged_news_text()
    docs = text.split("\n\n")
    assert len(docs) == 300 and all(d == d.strip() and d for d in docs)


def test_packaged_wikipedia_text():
    text = packaged_wikipedia_text()
    articles = text.split("\n\n = ")
    assert len(articles) == 107
    assert text.startswith(" = Anarchism = \n\n")
    assert "'''" not in text and "''" not in text
    assert "#REDIRECT" not in text.upper()
    assert text_source("wikipedia").sha256 == TextSource("x", text).sha256


# ---------------------------------------------------------------- cache

def _parts(tok, **change):
    args = dict(source=TextSource("list", "some text"), kind="calib", nsamples=32, seqlen=2048, seed=0)
    args.update(change)
    return cache_mod.window_key_parts(tok, **args)


def test_every_key_part_changes_the_key(tok, monkeypatch):
    base = cache_mod.cache_key(_parts(tok))
    assert base == cache_mod.cache_key(_parts(tok))
    variants = [
        _parts(tok, source=TextSource("file:/x", "some text")),   # source id
        _parts(tok, source=TextSource("list", "other text")),     # content sha256
        _parts(tok, kind="eval"),
        _parts(tok, nsamples=16),
        _parts(tok, seqlen=1024),
        _parts(tok, seed=1),
    ]
    renamed = byte_tokenizer()
    renamed.name_or_path = "another/tokenizer"
    variants.append(_parts(renamed))                               # tokenizer name
    grown = byte_tokenizer()
    grown.add_tokens(["<extra>"])
    variants.append(_parts(grown))                                 # vocab size + hash
    import transformers
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    variants.append(_parts(tok))                                   # transformers version
    monkeypatch.undo()
    keys = [cache_mod.cache_key(p) for p in variants]
    assert base not in keys and len(set(keys)) == len(keys)


def test_vocab_hash_alone_changes_the_identity(tok):
    """Same name and size, different ids: only the vocabulary hash can tell them apart."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def word_level(vocab):
        t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")))
        t.name_or_path = "same"
        return t

    a = cache_mod.tokenizer_identity(word_level({"a": 0, "b": 1}))
    b = cache_mod.tokenizer_identity(word_level({"a": 1, "b": 0}))
    assert a["vocab_size"] == b["vocab_size"] and a["vocab_sha256"] != b["vocab_sha256"]


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOGART_CACHE", str(tmp_path / "c"))
    assert cache_mod.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LOGART_CACHE")
    assert cache_mod.cache_dir().parts[-2:] == (".cache", "logart")


def test_cached_tensor_builds_once_and_survives_corruption(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return torch.arange(5)

    assert torch.equal(cache_mod.cached_tensor("k", build, tmp_path), torch.arange(5))
    assert torch.equal(cache_mod.cached_tensor("k", build, tmp_path), torch.arange(5))
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["k.pt"]  # no temp files left behind
    (tmp_path / "k.pt").write_bytes(b"garbage")
    assert torch.equal(cache_mod.cached_tensor("k", build, tmp_path), torch.arange(5))
    assert len(calls) == 2


def test_sets_use_the_cache(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("LOGART_CACHE", str(tmp_path))
    first = calibration_set(tok, DOCS, nsamples=4, seqlen=64, seed=3)
    evals = eval_set(tok, DOCS, seqlen=64, max_windows=2)
    assert len(list(tmp_path.glob("*.pt"))) == 2

    import logart.data.sets as sets
    monkeypatch.setattr(sets, "tokenize", lambda *a: pytest.fail("cache miss: tokenized again"))
    assert torch.equal(calibration_set(tok, DOCS, nsamples=4, seqlen=64, seed=3), first)
    assert torch.equal(eval_set(tok, DOCS, seqlen=64, max_windows=2), evals)
    assert torch.equal(first, calibration_windows(tokenize(tok, load_text(DOCS)), nsamples=4, seqlen=64, seed=3))


def test_sets_without_cache_write_nothing(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("LOGART_CACHE", str(tmp_path))
    assert eval_set(tok, DOCS, seqlen=64, max_windows=None, cache=False).shape[1] == 64
    assert not list(tmp_path.iterdir())


def test_same_text_from_a_hugging_face_dataset(tmp_path, tok, monkeypatch):
    """`hf:NAME:CONFIG:SPLIT` goes through datasets.load_dataset offline; a local dataset folder stands in for a
    warm hub cache (same call, no network)."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "mydata"
    folder.mkdir()
    _write(folder / "test.jsonl", "\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    source = f"hf:{folder}::test"
    assert load_text(source) == load_text(DOCS)
    reference = calibration_windows(tokenize(tok, load_text(DOCS)), nsamples=3, seqlen=64)
    assert torch.equal(calibration_windows(tokenize(tok, load_text(source)), nsamples=3, seqlen=64), reference)
    with pytest.raises(LogartError, match="no 'body' column"):
        load_text(source, field="body")


def test_a_cold_hugging_face_cache_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(LogartError, match="not in the local Hugging Face datasets cache.*never downloads"):
        load_text("hf:logart-no-such-dataset:none:test")
