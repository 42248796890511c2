"""data: calibration and evaluation sets (see DESIGN.md). Text sources -> token ids -> windows, cached on disk."""

from logart.data.cache import cache_dir
from logart.data.files import read_text_file
from logart.data.sets import calibration_set, eval_set
from logart.data.source import TextSource, load_text, text_source
from logart.data.text import packaged_news_text, packaged_wikipedia_text
from logart.data.windows import calibration_windows, eval_windows, tokenize

__all__ = [
    "TextSource", "cache_dir", "calibration_set", "calibration_windows", "eval_set", "eval_windows",
    "load_text", "packaged_news_text", "packaged_wikipedia_text", "read_text_file", "text_source", "tokenize",
]
