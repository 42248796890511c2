"""The compiled CPU kernel for `LogLinear` (lut_kernel.cpp), built on first use with torch's cpp_extension.

Small batches (decode) go through the fused kernel, which reads the packed codes and never materialises the
weight; larger batches (prefill) dequantize once with the compiled kernel and hand the matmul to BLAS. If the
extension cannot be built (no compiler), `LogLinear` keeps its pure-PyTorch path and logart says so once.

    python -m logart.io.kernel     # build now (the Makefile's setup does this), print where it lives
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from logart.data.cache import cache_dir
from logart.quant.rows import padded_width

SOURCE = Path(__file__).with_name("lut_kernel.cpp")
SMALL_BATCH = 8  # up to this many tokens per call use the fused product
_ext = None
_failed = False


def _cpu_flags() -> list[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if (" avx2" in info and " fma" in info) else []


def build_dir() -> Path:
    root = cache_dir()
    # The build depends on the environment's include paths too: key on the interpreter prefix, or two venvs
    # sharing the cache would rebuild the extension (about 30 s) every time the other one used it.
    key = [SOURCE.read_bytes(), " ".join(_cpu_flags() + ["omp"]).encode(), torch.__version__.encode(),
           os.path.realpath(sys.prefix).encode()]
    tag = hashlib.sha256(b"\0".join(key)).hexdigest()[:12]
    d = root / "kernels" / tag
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(verbose: bool = False):
    """The compiled extension, or None where it cannot be built."""
    global _ext, _failed
    if _ext is not None or _failed:
        return _ext
    try:
        # cpp_extension warns at import that there is no CUDA runtime: true and irrelevant for a CPU kernel.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load as load_ext
        _ext = load_ext(name="logart_lut", sources=[str(SOURCE)], build_directory=str(build_dir()),
                        extra_cflags=["-O3", "-fopenmp", *_cpu_flags()], extra_ldflags=["-fopenmp"],
                        verbose=verbose)
    except Exception as e:  # a missing compiler or headers: keep working on the reference path
        _failed = True
        warnings.warn(f"logart: the CPU kernel could not be built ({type(e).__name__}: {str(e)[:200]}); "
                      "packed layers use the slower pure-PyTorch path.")
    return _ext


def lut_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` on the compiled kernel: one call does the reshape, padding, fused product (up to SMALL_BATCH
    rows) or dequantization + BLAS (more rows), and the bias."""
    if layer.group_size == 0:  # per-tensor rows do not follow output channels: reference path
        return F.linear(x, layer.dequantize(), layer.bias)
    ext = _ext if _ext is not None else load()
    g = layer.in_features if layer.group_size == -1 else layer.group_size
    width = padded_width(layer.in_features, g)
    if width != layer.in_features:  # a last shorter group is stored zero-padded: pad the inputs to match
        x = F.pad(x, (0, width - layer.in_features))
    return ext.lut_linear(x, layer.qweight, layer.row_scale, layer.table_index, layer.tables, layer.bias,
                          layer.bits, width, g, SMALL_BATCH)


def enable(model) -> int:
    """Route every LogLinear of `model` through the compiled kernel. Returns how many layers use it."""
    from logart.io.linear import LogLinear
    if load() is None:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, LogLinear) and m.accepts_kernel:
            m.kernel = lut_forward
            n += 1
    return n


def disable(model) -> None:
    from logart.io.linear import LogLinear
    for m in model.modules():
        if isinstance(m, LogLinear):
            m.kernel = None


if __name__ == "__main__":
    ext = load(verbose=True)
    print("logart kernel:", "built in " + str(build_dir()) if ext is not None else "NOT available")
