"""Text from the user's own files: WikiText-2 / C4 / PTB dumps or anything else, without the Hub.

Supported: plain text (any suffix, read as is), JSON Lines (`.jsonl`) with one record per line, JSON (`.json`)
holding a list of records, a list of strings, or a column dict `{"text": [...]}`; each optionally gzipped
(`.gz`). Records are joined with "\\n\\n", the GPTQ-protocol convention for WikiText-2 rows and C4 documents.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from logart.errors import LogartError

DOC_SEPARATOR = "\n\n"


def join_documents(docs) -> str:
    """Join documents the way every logart text source does, refusing anything that is not a string."""
    docs = list(docs)
    bad = [i for i, d in enumerate(docs) if not isinstance(d, str)]
    if bad:
        raise LogartError(f"text documents must be strings; item {bad[0]} is a {type(docs[bad[0]]).__name__}.",
                          "pass a list of str (one document each).")
    return DOC_SEPARATOR.join(docs)


def _suffixes(path: Path) -> list[str]:
    """Lower-case suffixes without a trailing .gz: 'train.JSONL.gz' -> ['.jsonl']."""
    s = [x.lower() for x in path.suffixes]
    return s[:-1] if s and s[-1] == ".gz" else s


def _record_text(record, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return record[field]
    raise LogartError(f"{where} has no string field {field!r}.",
                      f"give each record a {field!r} field, or pass field='<name of your text field>'.")


def _json_documents(data, field: str, path: Path) -> list[str]:
    if isinstance(data, dict) and isinstance(data.get(field), list):
        data = data[field]  # column layout: {"text": ["doc", "doc", ...]}
    if isinstance(data, dict) and isinstance(data.get(field), str):
        return [data[field]]
    if not isinstance(data, list):
        raise LogartError(f"{path} holds a JSON {type(data).__name__}, not a list of records.",
                          f"store a list of {{{field!r}: ...}} records, a list of strings, or use .jsonl.")
    return [_record_text(r, field, f"{path}: record {i}") for i, r in enumerate(data)]


def read_text_file(path, field: str = "text") -> str:
    """The text of one local file (see the module docstring for the formats)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LogartError(f"text file {path} does not exist.", "pass the path of an existing file.")
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            kind = _suffixes(path)[-1:]
            if kind == [".jsonl"]:
                docs = [_record_text(json.loads(line), field, f"{path}: line {n}")
                        for n, line in enumerate(f, 1) if line.strip()]
                return join_documents(docs)
            if kind == [".json"]:
                return join_documents(_json_documents(json.load(f), field, path))
            return f.read()
    except (UnicodeDecodeError, json.JSONDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise LogartError(f"cannot read text file {path}: {e}.",
                          "pass UTF-8 text, JSON or JSON Lines (optionally gzipped).") from e
