"""`LogLinear`: a Linear layer that keeps its weight as packed n-bit codes and dequantizes by table lookup.

Per row (output channel, or group of `group_size` inputs) the weight is

    W[row, c] = row_scale[row] * tables[table_index[row], code[row, c]]

`tables` is the layer's small dequant table: the distinct relative value tables of its rows (a log codebook
has one per base split k, ABS shift and exponent parity: a few dozen at most), so any runtime can dequantize
with one gather and one multiply. The factorisation is exact (`Codebook.factored_tables`): the packed layer
computes with bit-identical weights to the fake-quantized model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from logart.errors import LogartError
from logart.quant import pack, packed_length, unpack
from logart.quant.rows import PER_CHANNEL, PER_TENSOR, padded_width


def row_geometry(out_features: int, in_features: int, group_size: int) -> tuple[int, int]:
    """(rows, row length) of the row view used by the codebooks (quant/rows.py)."""
    if group_size == PER_CHANNEL:
        return out_features, in_features
    if group_size == PER_TENSOR:
        return 1, out_features * in_features
    return out_features * (padded_width(in_features, group_size) // group_size), group_size


def unpack_rows(qweight: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """`unpack(qweight, bits, length)` for the 2-D [rows, words] layout, several times faster (word-wise int32
    shifts instead of a bit stream): the pure-PyTorch forward unpacks every layer on every call."""
    R, W = qweight.shape
    if W != packed_length(length, bits) or bits not in (2, 3, 4, 8):
        return unpack(qweight, bits, length)  # its error messages
    if bits != 3:  # word k of a chunk holds codes k*32/bits ... (k+1)*32/bits - 1
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
        codes = (qweight.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    else:  # 3 words per 32 codes: codes 10 and 21 straddle a word boundary
        w = qweight.reshape(R, -1, 3)
        w0, w1, w2 = w[..., 0:1], w[..., 1:2], w[..., 2:3]
        steps = [torch.arange(a, a + 30, 3, dtype=torch.int32, device=qweight.device) for a in (0, 1, 2)]
        codes = torch.cat([(w0 >> steps[0]) & 7, ((w0 >> 30) & 3) | ((w1 & 1) << 2), (w1 >> steps[1]) & 7,
                           ((w1 >> 31) & 1) | ((w2 & 3) << 1), (w2 >> steps[2]) & 7], dim=-1)
    return codes.reshape(R, -1)[:, :length].long()


class LogLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1, n_tables: int = 1,
                 bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        rows, length = row_geometry(out_features, in_features, group_size)
        self.register_buffer("qweight", torch.zeros(rows, packed_length(length, bits), dtype=torch.int32))
        self.register_buffer("row_scale", torch.zeros(rows, dtype=torch.float32))
        self.register_buffer("table_index", torch.zeros(rows, dtype=torch.int32))
        self.register_buffer("tables", torch.zeros(n_tables, 2 ** bits, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.kernel = None  # set by logart.io.kernel when the compiled CPU kernel is available

    accepts_kernel = True  # the compiled kernel computes x @ Wᵀ; LogEmbedding's lookup has no use for it

    @classmethod
    def from_linear(cls, linear: nn.Module, codebook, params) -> "LogLinear":
        """Pack a layer whose weight already lies on `codebook` with `params` (the quantizer's output). `linear`
        is an `nn.Linear`, or for `LogEmbedding` an `nn.Embedding` (its rows are the tokens)."""
        bits = codebook.bits
        if codebook.table_size() > 2 ** bits:
            raise LogartError(f"a {codebook.spec.mode}-mode codebook uses {codebook.table_size()} table entries per "
                              f"row, more than {bits}-bit codes can index.",
                              "quantize in strict mode to pack, or export a dequantized checkpoint.")
        w = linear.weight.detach().float()
        rows = codebook.rows(w)
        codes = codebook.encode_rows(rows, params)
        row_scale, rel = codebook.factored_tables(params)
        if not torch.equal(row_scale[:, None] * torch.gather(rel, 1, codes), rows):
            raise LogartError("the layer's weights are not on its codebook, so packing would change them.",
                              "pack the model returned by logart.quantize without editing its weights.")
        tables, index = torch.unique(rel, dim=0, return_inverse=True)
        m = cls.empty_like(linear, bits, codebook.spec.group_size, tables.shape[0])
        m.qweight.copy_(pack(codes, bits))
        m.row_scale.copy_(row_scale)
        m.table_index.copy_(index.to(torch.int32))
        m.tables.copy_(tables)
        if m.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        return m

    @classmethod
    def empty_like(cls, linear: nn.Linear, bits: int, group_size: int, n_tables: int) -> "LogLinear":
        """A zero-filled packed layer of `linear`'s shape: the shell a checkpoint's tensors are loaded into."""
        return cls(linear.in_features, linear.out_features, bits, group_size, n_tables, bias=linear.bias is not None)

    def codes(self) -> torch.Tensor:
        rows, length = row_geometry(self.out_features, self.in_features, self.group_size)
        return unpack_rows(self.qweight, self.bits, length)

    def dequantize_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 values of the packed rows `rows` (all rows when None), [len(rows), row length]."""
        qweight, scale, index = self.qweight, self.row_scale, self.table_index
        if rows is not None:
            qweight, scale, index = qweight[rows], scale[rows], index[rows]
        length = row_geometry(self.out_features, self.in_features, self.group_size)[1]
        rel = self.tables[index.long()]
        return scale[:, None] * torch.gather(rel, 1, unpack_rows(qweight, self.bits, length))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] (the reference path; the kernel never materialises it)."""
        w = self.dequantize_rows().reshape(self.out_features, -1)
        return w[:, :self.in_features] if w.shape[1] != self.in_features else w  # drop a last group's padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            return self.kernel(self, x)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, tables={self.tables.shape[0]}")
