"""One entry point for "where does the text come from": packaged names, local files, lists of strings.

A `TextSource` carries the text together with an id and the sha256 of its content, which is what the window
cache keys on: two sources with the same content share cache entries, and an edited file never hits a stale one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from logart.data.files import join_documents, read_text_file
from logart.data.hf_cache import hf_cached_text
from logart.data.text import packaged_news_text, packaged_wikipedia_text
from logart.errors import LogartError

PACKAGED = {"wikipedia": packaged_wikipedia_text, "news": packaged_news_text}


@dataclass(frozen=True)
class TextSource:
    """A text and where it came from (`id` is descriptive, for cache keys and logs)."""

    id: str
    text: str = field(repr=False)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def text_source(source, field: str = "text") -> TextSource:
    """Resolve a text source.

    - `"wikipedia"` / `"news"`: the packaged corpora of the protocol (gensim 4.4.0 wheel);
    - a path (str or PathLike) of a local file: plain text, .jsonl, .json, optionally .gz (see data/files.py);
    - `"hf:NAME[:CONFIG[:SPLIT]]"`: a dataset in the local Hugging Face datasets cache (data/hf_cache.py);
    - a list/tuple of strings: documents, joined with "\\n\\n";
    - a `TextSource`: returned as is.

    A bare string is never taken as the text itself, so a mistyped path fails loudly instead of being
    "evaluated"; wrap raw text in a list to use it directly.
    """
    if isinstance(source, TextSource):
        return source
    if isinstance(source, (list, tuple)):
        return TextSource("list", join_documents(source))
    if isinstance(source, str) and source.startswith("hf:"):
        return TextSource(source, hf_cached_text(source[3:], field=field))
    if isinstance(source, str) and source in PACKAGED:
        return TextSource(f"packaged:{source}", PACKAGED[source]())
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file():
            return TextSource(f"file:{path.resolve()}", read_text_file(path, field=field))
        raise LogartError(f"{str(source)[:80]!r} is neither a packaged text ({', '.join(PACKAGED)}) nor an existing file.",
                          "pass 'wikipedia', 'news', the path of a local .txt/.jsonl/.json(.gz) file, "
                          "or a list of strings.")
    raise LogartError(f"cannot use a {type(source).__name__} as a text source.",
                      "pass 'wikipedia', 'news', a file path, or a list of strings.")


def load_text(source, field: str = "text") -> str:
    """The text of a source (see `text_source`)."""
    return text_source(source, field=field).text
