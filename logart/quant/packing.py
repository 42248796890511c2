"""Bit packing of n-bit codes into int32 words, exact for n in {2, 3, 4, 8}.

Codes along the last dimension are cut into chunks of 32 and each chunk becomes n int32 words holding its
32*n bits as one little-endian bit stream (code i occupies bits n*i .. n*i+n-1). For n = 2, 4, 8 that is the
usual "32/n codes per word" layout; for n = 3 a code may straddle two words, and no bit is wasted.
The last dimension is zero-padded to a multiple of 32; `unpack` takes the true length back.
"""

from __future__ import annotations

import torch

from logart.errors import LogartError

PACKABLE_BITS = (2, 3, 4, 8)


def _check_bits(bits: int):
    if bits not in PACKABLE_BITS:
        raise LogartError(f"cannot pack {bits}-bit codes.", f"use one of {', '.join(map(str, PACKABLE_BITS))} bits.")


def packed_length(n: int, bits: int) -> int:
    """int32 words needed for n codes."""
    return (n + 31) // 32 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., N] with values in [0, 2^bits) -> int32 [..., ceil(N/32)*bits]."""
    _check_bits(bits)
    codes = codes.long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise LogartError(f"codes out of range for {bits} bits (min {int(codes.min())}, max {int(codes.max())}).",
                          "pack codes produced by a codebook of the same bit width.")
    *lead, n = codes.shape
    pad = (-n) % 32
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    chunks = codes.reshape(*lead, -1, 32)
    shifts = torch.arange(bits, device=codes.device)
    bitstream = ((chunks[..., None] >> shifts) & 1).reshape(*lead, -1, bits, 32)   # [..., chunk, word, bit]
    words = (bitstream << torch.arange(32, device=codes.device)).sum(-1)          # int64, < 2^32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)                  # two's complement int32
    return words.to(torch.int32).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 [..., W] -> int64 codes [..., n]."""
    _check_bits(bits)
    *lead, w = packed.shape
    if w != packed_length(n, bits):
        raise LogartError(f"packed row has {w} words, {packed_length(n, bits)} expected for {n} {bits}-bit codes.",
                          "the checkpoint is truncated or belongs to another shape; re-export it.")
    words = packed.long().reshape(*lead, -1, bits, 1)
    bitstream = (words >> torch.arange(32, device=packed.device)) & 1                # [..., chunk, word, bit]
    per_code = bitstream.reshape(*lead, -1, 32, bits)
    codes = (per_code << torch.arange(bits, device=packed.device)).sum(-1)
    return codes.reshape(*lead, -1)[..., :n]
