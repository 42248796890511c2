"""An on-disk cache of token windows, keyed on everything that changes them (spec Q8: the reference keyed on
`model_name.split('-')[0]`, so Llama-2 and Llama-3 shared calibration data, and its test cache ignored seqlen).

Key parts: tokenizer identity (name_or_path, vocab size, a hash of the vocab and of the full tokenizer
definition), the transformers version (its tokenizer conversion changes between releases, ASSETS.md), the text's
source id and sha256, the kind of windows, nsamples, seqlen, seed, and a format number bumped whenever the
sampling code changes. Files are written to a temporary name and renamed, so a crash or a concurrent run never
leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from logart.atomic import write_file

FORMAT = 1


def cache_dir() -> Path:
    """`$LOGART_CACHE` if set, else `~/.cache/logart`."""
    return Path(os.environ.get("LOGART_CACHE") or Path.home() / ".cache" / "logart").expanduser()


def _sha256(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """What makes two tokenizers give the same ids. The name alone is not enough (a local folder can be
    re-saved with another vocabulary), so the vocabulary itself, and for fast tokenizers the whole serialized
    pipeline (merges, normalizer, pre-tokenizer), are hashed too."""
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(vocab),
        "vocab_sha256": _sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False)),
        "definition_sha256": _sha256(backend.to_str()) if backend is not None else "",
    }


def window_key_parts(tokenizer, source, kind: str, nsamples: int | None, seqlen: int, seed: int | None) -> dict:
    """Every input of a window tensor, as a JSON-able dict (`source` is a `logart.data.TextSource`)."""
    import transformers

    return {
        "format": FORMAT,
        "tokenizer": tokenizer_identity(tokenizer),
        "transformers": transformers.__version__,
        "source_id": source.id,
        "text_sha256": source.sha256,
        "kind": kind,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
    }


def cache_key(parts: dict) -> str:
    """A stable hash of the key parts (sorted JSON, so dict order does not matter)."""
    return _sha256(json.dumps(parts, sort_keys=True))[:32]


def cached_tensor(name: str, build: Callable[[], torch.Tensor], directory: Path | None = None) -> torch.Tensor:
    """Load `<directory>/<name>.pt`, or build it and store it atomically. An unreadable entry is rebuilt."""
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / f"{name}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a truncated or foreign file: rebuild rather than fail
            pass
    value = build()
    try:
        write_file(path, lambda tmp: torch.save(value, tmp))
    except OSError as e:  # a read-only home must not stop a run: warn and go on uncached
        warnings.warn(f"logart: cannot write the cache at {directory} ({e}); set LOGART_CACHE to a writable folder.")
    return value
