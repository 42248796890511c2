"""Codebooks: what values are representable. Pure tensor functions, vectorised over rows and groups.

    cb = make_codebook(QuantSpec(method="log_dynamic", bits=4))
    params = cb.fit(w)                 # or cb.fit(w, k=..., s=...) with searched choices
    codes, params = cb.encode(w, params)
    w_hat = cb.decode(codes, params)   # == cb.fake_quant(w, params)
"""

from logart.quant.codebook import Codebook
from logart.quant.log import LogCodebook, LogParams
from logart.quant.packing import pack, packed_length, unpack
from logart.quant.rows import to_rows, from_rows
from logart.quant.spec import METHODS, MODES, SUPPORTED_BITS, QuantSpec
from logart.quant.uniform import UniformCodebook, UniformParams
from logart.quant.union import UnionCodebook, UnionParams


def make_codebook(spec: QuantSpec) -> Codebook:
    if spec.method == "uniform":
        return UniformCodebook(spec)
    return UnionCodebook(spec) if spec.method == "log_or_uniform" else LogCodebook(spec)


__all__ = ["Codebook", "LogCodebook", "LogParams", "METHODS", "MODES", "QuantSpec",
           "SUPPORTED_BITS", "UniformCodebook", "UniformParams", "UnionCodebook", "UnionParams", "from_rows",
           "make_codebook", "pack", "packed_length", "to_rows", "unpack"]
