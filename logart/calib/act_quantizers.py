"""Two-parameter activation quantizers for transformers, fitted by a two-parameter search (search/two_param.py)
against the error they cause in their consumer's output (AdaLog §3.4: the layer-output MSE):

    AsymActQuantizer   uniform, asymmetric, per tensor: a clipping range [lo, hi] on 2^b levels (post-LayerNorm
                       inputs of qkv and fc1, the attention output, the q / k / v matrix-product inputs)
    LogActQuantizer    AdaLog (scale and base searched), log2 or log√2 (scale searched) for post-softmax and
                       post-GELU activations (quant/adalog.py). `shift` c makes a post-GELU input non-negative:
                       it quantizes x + c and hands on Q(x + c) - c, which is what fc2 computes after AdaLog's
                       bias reparameterization (b' = b - c·W·1, `reparameterize_bias`) on the shifted input.

`fit(sample, error, strategy)`: `sample` holds the site's calibration values, `error(x_hat)` the consumer-output
error of a candidate's fake-quantized sample; returns {the chosen parameters, the score, the pairs scored}.
"""

from __future__ import annotations

import torch
from torch import nn

from logart.quant import adalog
from logart.search.two_param import search

GELU_SHIFT = 0.17             # just above -min GELU(x) = 0.16997 (at x = -0.7518): x + c >= 0
GRID = 100                    # candidates per continuous parameter
SCALE_EXPONENTS = (-1.5, 0.25)  # log scales: s = max · 2^t, t on this interval
Q_MAX_RATIO = 4               # AdaLog: q in 1 .. 4 r (bases 2^(1/37) .. 16)


class AsymActQuantizer(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.bits, self.maxq = bits, 2 ** bits - 1
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(1.0))

    @staticmethod
    def _grid(lo, hi, maxq) -> tuple[float, int]:
        """(step, zero point) of the range [lo, hi] on codes 0 .. maxq."""
        delta = max(hi - lo, 1e-12) / maxq
        return delta, round(-lo / delta)

    @classmethod
    def _apply(cls, x, lo, hi, maxq):
        delta, zero = cls._grid(lo, hi, maxq)
        return (torch.clamp(torch.round(x / delta) + zero, 0, maxq) - zero) * delta

    def forward(self, x):
        return self._apply(x, float(self.lo), float(self.hi), self.maxq).to(x.dtype)

    @torch.no_grad()
    def fit(self, sample: torch.Tensor, error, strategy: str = "fpcs") -> dict:
        low, high = float(sample.min()), float(sample.max())
        ratios = torch.linspace(1.0 / GRID, 1.0, GRID).tolist()
        # a range that does not cross zero keeps its near end: only the far end is clipped
        los = [low * r for r in ratios] if low < 0 else [low] * GRID
        his = [high * r for r in ratios] if high > 0 else [high] * GRID

        def score(a, b):
            return torch.tensor([error(self._apply(sample, los[i], his[j], self.maxq))
                                 for i, j in zip(a.tolist(), b.tolist())])

        i, j, value, scored = search(strategy, score, GRID if low < 0 else 1, GRID if high > 0 else 1)
        self.lo.fill_(los[i])
        self.hi.fill_(his[j])
        return {"kind": "uniform-asym", "bits": self.bits, "lo": los[i], "hi": his[j], "score": value,
                "scored": scored}

    def to_config(self) -> dict:
        return {"type": "uniform-asym", "bits": self.bits, "lo": float(self.lo), "hi": float(self.hi)}

    def levels(self) -> torch.Tensor:
        """Every value the quantizer can output."""
        delta, zero = self._grid(float(self.lo), float(self.hi), self.maxq)
        return (torch.arange(self.maxq + 1) - zero) * delta

    def extra_repr(self):
        return f"bits={self.bits}, lo={float(self.lo):.4g}, hi={float(self.hi):.4g}"


class LogActQuantizer(nn.Module):
    def __init__(self, kind: str, bits: int, shift: float = 0.0):
        super().__init__()
        if kind not in adalog.KINDS:
            raise ValueError(f"unknown log activation quantizer {kind!r}")
        self.kind, self.bits, self.shift = kind, bits, shift
        self.folded = False    # True once the consumer's bias absorbed the shift (`fold_shift`)
        q, r = adalog.base_of(kind, adalog.R_PRIME)
        self.params = adalog.LogActParams(1.0, q, r, bits)

    def forward(self, x):
        shifted = adalog.fake_quant(x + self.shift, self.params)
        return shifted if self.folded else shifted - self.shift

    @torch.no_grad()
    def fold_shift(self, linear: nn.Linear) -> None:
        """AdaLog's deployed form (eq. 15): `linear` (the site's consumer, its weights final) takes b' = b - c·W·1
        and this quantizer hands on Q(x + c) itself, the non-negative log-coded values; same outputs."""
        if self.folded or not self.shift:
            return
        set_bias(linear, reparameterize_bias(linear, self.shift))
        self.folded = True

    @torch.no_grad()
    def fit(self, sample: torch.Tensor, error, strategy: str = "fpcs") -> dict:
        top = float((sample + self.shift).max().clamp(min=1e-12))
        scales = (top * torch.exp2(torch.linspace(*SCALE_EXPONENTS, GRID))).tolist()
        qs = list(range(1, Q_MAX_RATIO * adalog.R_PRIME + 1)) if self.kind == "adalog" else [None]

        def params(i, j):
            q, r = adalog.base_of(self.kind, qs[j])
            return adalog.LogActParams(scales[i], q, r, self.bits)

        shifted = sample + self.shift

        def score(a, b):
            return torch.tensor([error(adalog.fake_quant(shifted, params(i, j)) - self.shift)
                                 for i, j in zip(a.tolist(), b.tolist())])

        i, j, value, scored = search(strategy, score, GRID, len(qs))
        self.params = params(i, j)
        return {"kind": self.kind, "shift": self.shift, **self.params.to_dict(), "score": value, "scored": scored}

    def to_config(self) -> dict:
        p = self.params
        return {"type": "log", "kind": self.kind, "bits": self.bits, "shift": self.shift, "scale": p.scale,
                "q": p.q, "r": p.r, "mantissa_bits": p.mantissa_bits, "folded": self.folded}

    def levels(self) -> torch.Tensor:
        """Every value the quantizer can output (the zero code included), on the unshifted axis."""
        return adalog.level_values(self.params) - self.shift

    def extra_repr(self):
        p = self.params
        return f"{self.kind}, bits={self.bits}, scale={p.scale:.4g}, base=2^({p.q}/{p.r}), shift={self.shift}"


def from_config(cfg: dict) -> nn.Module:
    """The quantizer a `to_config()` dict describes (a packed checkpoint's activation quantizers)."""
    if cfg["type"] == "uniform-asym":
        q = AsymActQuantizer(int(cfg["bits"]))
        q.lo.fill_(float(cfg["lo"]))
        q.hi.fill_(float(cfg["hi"]))
        return q
    if cfg["type"] == "log":
        q = LogActQuantizer(cfg["kind"], int(cfg["bits"]), float(cfg["shift"]))
        q.params = adalog.LogActParams(float(cfg["scale"]), int(cfg["q"]), int(cfg["r"]), int(cfg["bits"]),
                                       int(cfg["mantissa_bits"]))
        q.folded = bool(cfg.get("folded", False))
        return q
    raise ValueError(f"unknown activation quantizer type {cfg.get('type')!r}")


def histogram(sample: torch.Tensor, quantizer, bins: int = 60) -> dict:
    """A compact picture of a site for reports: the histogram of its calibration values (log-spaced bins over the
    shifted positive values for a log quantizer) and the quantizer's levels."""
    x = sample.reshape(-1).float()
    if isinstance(quantizer, LogActQuantizer):
        shifted = x + quantizer.shift
        positive = shifted[shifted > 0]
        lo = float(positive.min()) if positive.numel() else 1e-8
        edges = torch.logspace(torch.log10(torch.tensor(max(lo, 1e-8))), torch.log10(positive.max().clamp(min=2e-8)),
                               bins + 1) - quantizer.shift
    else:
        edges = torch.linspace(float(x.min()), float(x.max()) + 1e-12, bins + 1)
    counts = torch.histogram(x, edges.float()).hist
    return {"edges": [round(float(e), 7) for e in edges], "counts": [int(c) for c in counts],
            "levels": [round(float(v), 7) for v in quantizer.levels()], "log_axis": isinstance(quantizer, LogActQuantizer),
            "shift": getattr(quantizer, "shift", 0.0)}


def reparameterize_bias(linear: nn.Linear, shift: float) -> torch.Tensor:
    """The bias b - c·W·1 under which `linear` on the shifted input x + c computes what it computed on x (AdaLog
    eq. 15; with the quantized W it absorbs the shift exactly)."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return b - shift * w.sum(dim=1)


def set_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    """Give `linear` this bias, creating the parameter when the layer has none."""
    bias = bias.to(linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(bias)
    else:
        linear.bias.data = bias
