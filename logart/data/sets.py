"""Calibration and evaluation token sets in one call: text source -> tokens -> windows, cached on disk.

Defaults are the standard protocol (PROTOCOL.md): calibration = 32 random windows of 2048 tokens of the packaged
news text, seed 0; evaluation = the first 16 non-overlapping windows of 2048 tokens of the packaged Wikipedia text.
"""

from __future__ import annotations

from logart.data.cache import cache_key, cached_tensor, window_key_parts
from logart.data.source import text_source
from logart.errors import LogartError
from logart.data.windows import calibration_windows, eval_windows, tokenize


def _windows(tokenizer, source, kind, nsamples, seqlen, seed, make, cache, field, bos):
    src = text_source(source, field=field)

    def build():
        try:
            return make(tokenize(tokenizer, src.text))
        except LogartError as e:   # name the text it was read from
            raise LogartError(f"{src.id.removeprefix('file:')}: {e.problem}", e.fix) from e

    if not cache:
        return build()
    parts = window_key_parts(tokenizer, src, kind, nsamples, seqlen, seed)
    if bos is not None:  # only then: the entries written before BOS windows existed stay valid
        parts["bos"] = bos
    key = cache_key(parts)
    return cached_tensor(f"{kind}-{seqlen}-{key}", build, directory=None if cache is True else cache)


def calibration_set(tokenizer, source="news", nsamples: int = 32, seqlen: int = 2048, seed: int = 0,
                    cache=True, field: str = "text", bos: int | None = None):
    """`LongTensor[nsamples, seqlen]` of random windows (see `calibration_windows`).

    `source`: anything `text_source` takes. `cache`: True (default folder), False, or a folder path.
    `bos`: the token id every window starts with (`logart.data.bos.resolve_bos`), or None.
    """
    return _windows(tokenizer, source, "calib", nsamples, seqlen, seed,
                    lambda ids: calibration_windows(ids, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos),
                    cache, field, bos)


def eval_set(tokenizer, source="wikipedia", seqlen: int = 2048, max_windows: int | None = 16,
             cache=True, field: str = "text", bos: int | None = None):
    """`LongTensor[n, seqlen]` of the first non-overlapping windows (see `eval_windows`)."""
    return _windows(tokenizer, source, "eval", max_windows, seqlen, None,
                    lambda ids: eval_windows(ids, seqlen=seqlen, max_windows=max_windows, bos=bos),
                    cache, field, bos)
