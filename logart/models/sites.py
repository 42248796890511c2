"""Weight sites: one quantized weight, whatever module holds it, seen as the engine wants it.

    site.matrix()          W as float32 [out, in]: Linear as is, Conv2d flattened per output channel
                           (in = in_channels / groups x kh x kw), Embedding [vocab, dim]
    site.rows(x)           the module's input x as rows [N, in] for statistics: Linear reshapes, Conv2d unfolds
                           (im2col, as GPTQ's reference does); grouped convs stack each group's patches as more
                           rows, so the statistics are those of the channel groups averaged (exact for groups = 1)
    site.write(W_hat)      writes [out, in] back in the module's own shape and dtype
    site.role              what the weight does ("query", "key", "value", "qkv", "plain"), given by the adapter
    site.act               the activation module its output goes straight into (ReLU6 after a conv), if any

The engine (calib/, search/, rounding/) sees only sites, never module classes, so GPTQ, learned rounding and
the search run unchanged on Linear, Conv2d and Embedding weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from logart.errors import LogartError

ROLES = ("plain", "query", "key", "value", "qkv")
ATTENTION_ROLES = ("query", "key", "value", "qkv")


@dataclass(eq=False)
class WeightSite:
    name: str            # full module name in the model, e.g. "model.layers.3.self_attn.q_proj"
    module: nn.Module
    role: str = "plain"
    act: nn.Module | None = None   # the activation applied straight to this weight's output (the original CNN fuses
                                   # it into the layer; the layer-output search score matches the output after it)

    def __post_init__(self):
        if self.role not in ROLES:
            raise LogartError(f"unknown weight role {self.role!r} for {self.name}.", f"use one of {', '.join(ROLES)}.")
        if not isinstance(self.module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
            raise LogartError(f"{self.name} is a {type(self.module).__name__}; weight sites are Linear, Conv1d, "
                              "Conv2d or Embedding modules.", "leave this module out of the adapter's sites.")

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return w.shape[0], w[0].numel()

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def columns(self) -> int:
        return self.shape[1]

    @property
    def row_key(self) -> tuple:
        """What `rows` depends on besides the input: two sites reading one tensor share statistics only if their
        keys match (a 3x3 conv and its block's 1x1 stride-2 shortcut read the same tensor, not the same rows)."""
        m = self.module
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            pad = getattr(m, "static_padding", None)
            return (type(m).__name__, *(tuple(v) if isinstance(v, (list, tuple)) else v for v in (
                m.kernel_size, m.dilation, m.padding, m.stride, m.groups, self.columns,
                getattr(pad, "padding", None))))
        return (type(m).__name__, self.columns)

    @property
    def takes_inputs(self) -> bool:
        """False for embeddings: their input is token ids, so they have no input statistics."""
        return not isinstance(self.module, nn.Embedding)

    def matrix(self) -> torch.Tensor:
        """A float32 copy of the weight as [out, in]."""
        w = self.module.weight.detach()
        return w.reshape(w.shape[0], -1).float().clone()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The module's input `x` as rows [N, in], one per position the weight is applied at."""
        m = self.module
        if isinstance(m, nn.Linear):
            return x.reshape(-1, m.in_features)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if isinstance(getattr(m, "static_padding", None), nn.Module):
                # TensorFlow-style 'same' convolutions (the EfficientNet ports) pad inside their forward,
                # after the input this site sees: pad the same way, so the rows are the patches it convolves.
                x = m.static_padding(x)
            if isinstance(m, nn.Conv1d):   # a [B, C, L] signal is a [B, C, 1, L] image with a 1 x k kernel
                x, k, d, p, s = x.unsqueeze(2), (1, *m.kernel_size), (1, *m.dilation), (0, *m.padding), (1, *m.stride)
            else:
                k, d, p, s = m.kernel_size, m.dilation, m.padding, m.stride
            if isinstance(p, str) or m.padding_mode != "zeros":
                raise LogartError(f"{self.name} uses padding {m.padding!r} / mode {m.padding_mode!r}; statistics "
                                  "need explicit zero padding.", "use integer zero padding in this convolution.")
            patches = F.unfold(x, k, dilation=d, padding=p, stride=s)       # [B, C*kh*kw, L]
            if m.groups > 1:   # [B, groups, C/g*kh*kw, L] -> each group's patches are rows of one shared matrix
                patches = patches.reshape(x.shape[0], m.groups, -1, patches.shape[-1]).transpose(0, 1)
            return patches.transpose(-1, -2).reshape(-1, self.columns)
        raise LogartError(f"{self.name} ({type(m).__name__}) has no input statistics.", "quantize it data-free.")

    def write(self, W_hat: torch.Tensor) -> None:
        """Write [out, in] (extra zero-padded columns dropped) back into the module's weight, in place."""
        w = self.module.weight
        w.data.copy_(W_hat[:, :self.columns].reshape(w.shape).to(w.dtype))
