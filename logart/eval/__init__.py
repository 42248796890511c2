"""eval: functions of (model, data) -> numbers (see DESIGN.md)."""

from logart.eval.generate import generate_text
from logart.eval.perplexity import perplexity, window_nlls

__all__ = ["generate_text", "perplexity", "window_nlls"]
