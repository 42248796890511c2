"""`LogEmbedding`: a token embedding stored exactly as `LogLinear` stores a weight (the embedding matrix
[vocab, dim] is the weight [out, in]: one packed row per token, or dim / group_size rows per token), so it
shares the packing, the tables, the checkpoint format and the dequantized export. Only the forward differs:
it decodes just the rows of the requested tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from logart.io.linear import LogLinear
from logart.quant.rows import PER_TENSOR


class LogEmbedding(LogLinear):
    accepts_kernel = False

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int = -1, n_tables: int = 1,
                 padding_idx: int | None = None):
        super().__init__(embedding_dim, num_embeddings, bits, group_size, n_tables, bias=False)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def empty_like(cls, embedding: nn.Embedding, bits: int, group_size: int, n_tables: int) -> "LogEmbedding":
        return cls(embedding.num_embeddings, embedding.embedding_dim, bits, group_size, n_tables,
                   embedding.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group_size == PER_TENSOR:  # one row holds the whole matrix: nothing to gather per token
            return F.embedding(ids, self.dequantize())
        per_token = self.qweight.shape[0] // self.num_embeddings
        rows = (ids.reshape(-1, 1) * per_token + torch.arange(per_token, device=ids.device)).reshape(-1)
        values = self.dequantize_rows(rows).reshape(*ids.shape, -1)
        return values[..., :self.embedding_dim]   # a last shorter group is stored zero-padded

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"tables={self.tables.shape[0]}")


def packed_class(module: nn.Module) -> type[LogLinear]:
    """The packed module type that replaces `module` (an nn.Embedding, nn.Conv2d or nn.Linear)."""
    if isinstance(module, nn.Conv2d):
        from logart.io.conv import LogConv2d
        return LogConv2d
    return LogEmbedding if isinstance(module, nn.Embedding) else LogLinear
