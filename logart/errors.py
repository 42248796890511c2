"""Re-export of the error type; it lives in quant/ because quant/ imports nothing else of ours."""

from logart.quant.errors import LogartError

__all__ = ["LogartError"]
