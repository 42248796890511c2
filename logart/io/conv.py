"""`LogConv2d`: a convolution stored exactly as `LogLinear` stores a weight. The kernel [out, in/groups, kh, kw]
is the matrix [out, in/groups·kh·kw] the weight sites quantize (models/sites.py), so the packing, the tables, the
checkpoint format and the load checks are LogLinear's; only the forward differs (a convolution with the
dequantized kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from logart.io.linear import LogLinear


class LogConv2d(LogLinear):
    accepts_kernel = False   # the compiled kernel computes x @ Wᵀ

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bits: int = 4, group_size: int = -1, n_tables: int = 1, bias: bool = True):
        kernel_size = nn.modules.utils._pair(kernel_size)
        super().__init__(in_channels // groups * kernel_size[0] * kernel_size[1], out_channels, bits, group_size,
                         n_tables, bias)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = kernel_size, nn.modules.utils._pair(stride)
        self.padding, self.dilation = nn.modules.utils._pair(padding), nn.modules.utils._pair(dilation)

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, bits: int, group_size: int, n_tables: int) -> "LogConv2d":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, bits, group_size, n_tables, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.bits}, group_size={self.group_size}, "
                f"tables={self.tables.shape[0]}")
