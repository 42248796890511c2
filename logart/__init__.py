"""logart: logarithmic post-training quantization (LogART) for PyTorch models.

    result = logart.quantize(model, "logart", calib, bits=3)
    logart.save_quantized(model, "out", result.params, result.recipe, tokenizer=tok)
    model, tok = logart.load_quantized("out")
"""

from logart.version import __version__  # noqa: F401

# transformers' from_pretrained loads logart checkpoints once transformers is imported (logart/io/hf.py);
# this only puts a finder on sys.meta_path, it imports nothing heavy.
from logart.io import install_transformers_hook as _install_transformers_hook  # noqa: E402

_install_transformers_hook()


def __getattr__(name):
    # Lazy: `import logart` stays cheap (no transformers import) until the API is used.
    if name in ("quantize", "QuantizationResult"):
        from logart import api
        return getattr(api, name)
    if name in ("save_quantized", "load_quantized"):
        from logart.io import checkpoint
        return getattr(checkpoint, name)
    if name in ("make_recipe", "Recipe", "Override"):
        from logart import recipes
        return getattr(recipes, name)
    raise AttributeError(f"module 'logart' has no attribute {name!r}")
