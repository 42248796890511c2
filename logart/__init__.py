"""logart: logarithmic post-training quantization (LogART) for PyTorch models."""

__version__ = "0.1.0"
