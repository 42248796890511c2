"""Text from a warm Hugging Face datasets cache: `hf:NAME[:CONFIG[:SPLIT]]`, e.g. `hf:wikitext:wikitext-2-raw-v1:test`
or `hf:allenai/c4:en:validation`. Offline only: what the cache does not hold fails with the fix, it is never
downloaded (ASSETS.md: no hub at run time)."""

from __future__ import annotations

import os

from logart.data.files import join_documents
from logart.errors import LogartError


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'NAME[:CONFIG[:SPLIT]]' -> (name, config or None, split; default 'test')."""
    name, config, split = (spec.split(":") + [None, None])[:3]
    if not name:
        raise LogartError(f"'hf:{spec}' names no dataset.", "write hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wikitext:wikitext-2-raw-v1:test.")
    return name, config or None, split or "test"


def hf_cached_text(spec: str, field: str = "text") -> str:
    name, config, split = parse_hf_spec(spec)
    os.environ["HF_DATASETS_OFFLINE"] = "1"   # read before `datasets` is imported...
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as e:
        raise LogartError("reading a Hugging Face datasets cache needs the `datasets` package.",
                          "pip install datasets, or pass the text file itself.") from e
    datasets.config.HF_DATASETS_OFFLINE = True   # ...and set again in case it was imported before
    datasets.config.HF_HUB_OFFLINE = True
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises several types for "not cached" (ConnectionError, FileNotFoundError, ...)
        raise LogartError(f"the dataset {name!r} (config {config}, split {split}) is not in the local Hugging Face "
                          f"datasets cache ({type(e).__name__}); logart never downloads.",
                          "load it once with datasets.load_dataset on a machine with network (same cache folder), "
                          "or pass a local .txt/.jsonl/.json(.gz) file.") from e
    if field not in data.column_names:
        raise LogartError(f"the dataset {name!r} has no {field!r} column (it has {', '.join(data.column_names)}).",
                          "choose the text column with field=...")
    return join_documents(data[field])
