"""Activation quantization of the weight sites' inputs (W4A4, W4A8): uniform, per tensor, one step size per site.

Block by block, before the block's weights are quantized, the driver hands each block's inputs here: every
activation site of the block (`Block.act_sites`: the input of each conv / linear) gets a quantizer whose step is
searched on that site's calibration inputs, and a forward pre-hook that fake-quantizes the input from then on.
So the block's own weight search and reconstruction, and every later block, see quantized activations. The
step is chosen by

    mse          the step among 100 candidates (a fraction 0.01 .. 1 of max |x|) with the lowest squared error
    percentile   max |x| clipped at the given percentile of |x|

An input that is never negative (after a ReLU) uses the unsigned grid [0, 2^b - 1]; otherwise the signed
[-2^(b-1), 2^(b-1) - 1]. With `learn=True` the steps are trained with the block's rounding during block
reconstruction (LSQ: the gradient reaches the step through a straight-through round), via
`BlockReconstruction(steps=...)`. The network's own input (the image of the first layer) stays in full precision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from logart.calib.hooks import forward_until_seen

if TYPE_CHECKING:   # the caller hands the recipe's piece in; calib/ does not import the layer above it
    from logart.recipes import ActivationsConfig

METHODS = ("mse", "percentile")
PERCENTILE = 99.99        # the "percentile" search clips max |x| at this percentile of |x|
SAMPLE_VALUES = 2 ** 20   # values per site used by the step search (a strided subsample beyond that)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class UniformActQuantizer(nn.Module):
    """Fake-quantizes a tensor on a uniform grid of `step`, unsigned or signed, `bits` wide."""

    def __init__(self, bits: int, signed: bool, step: float = 1.0):
        super().__init__()
        self.bits, self.signed = bits, signed
        self.qmin, self.qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        self.step = nn.Parameter(torch.tensor(float(step)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.step.abs().clamp(min=1e-12)
        return torch.clamp(_round_ste(x / step), self.qmin, self.qmax) * step

    @torch.no_grad()
    def fit(self, values: torch.Tensor, method: str = "mse") -> float:
        """Choose the step on `values` (a 1-D sample of the site's inputs) by `method` (module doc); returns the
        relative MSE."""
        top = float(values.abs().max())
        if top == 0.0:
            self.step.fill_(1.0)
            return 0.0
        levels = self.qmax if not self.signed else -self.qmin
        if method == "percentile":
            limit = float(torch.quantile(values.abs().float(), PERCENTILE / 100.0)) or top
            self.step.fill_(limit / levels)
        else:
            steps = top * torch.linspace(0.01, 1.0, 100) / levels
            errors = torch.stack([(self._grid(values, s) - values).pow(2).sum() for s in steps])
            self.step.fill_(float(steps[int(errors.argmin())]))
        return float((self(values) - values).pow(2).sum() / values.pow(2).sum().clamp(min=1e-30))

    def _grid(self, x: torch.Tensor, step) -> torch.Tensor:
        return torch.clamp(torch.round(x / step), self.qmin, self.qmax) * step

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, step={float(self.step):.4g}"


def _sample(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE_VALUES)]


class ActivationQuantization:
    """The driver's activation step (calib/driver.py): `calibrate` once per block, `steps` for reconstruction."""

    def __init__(self, config: ActivationsConfig):
        self.config = config
        self.quantizers: dict[str, UniformActQuantizer] = {}
        self.records: dict[str, dict] = {}
        self._first = True

    @torch.no_grad()
    def calibrate(self, run, block, inputs: torch.Tensor) -> None:
        """Fit and install a quantizer on every activation site of `block` (its inputs: `inputs`)."""
        sites = {a.name: a for a in block.act_sites if not a.output}
        if self._first and sites:   # the network's input (the first layer's image) stays in full precision
            sites.pop(next(iter(sites)))
            self._first = False
        seen: dict[str, list] = {name: [] for name in sites}
        for i in range(inputs.shape[0]):
            forward_until_seen(lambda: run(inputs[i:i + 1]), {n: a.module for n, a in sites.items()},
                               lambda name, x: seen[name].append(_sample(x.detach().float())), True)
        for name, site in sites.items():
            if not seen[name]:
                continue
            values = torch.cat(seen[name])
            q = UniformActQuantizer(self.config.bits, signed=bool((values < 0).any()))
            error = q.fit(_sample(values), self.config.method)
            self.quantizers[name] = q
            self.records[name] = {"bits": q.bits, "signed": q.signed, "step_searched": float(q.step),
                                  "relative_mse": error}
            # the hook stays: the quantized model keeps quantizing this input
            site.module.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]), *args[1:]))

    def steps(self, block) -> list[nn.Parameter]:
        """The step sizes of `block`'s quantizers, for reconstruction to train (none unless `learn`)."""
        if not self.config.learn:
            return []
        return [self.quantizers[a.name].step for a in block.act_sites if a.name in self.quantizers]

    def finish(self) -> dict:
        """{site name: {bits, signed, step_searched, step (as trained), relative_mse (of the searched step)}}."""
        for name, q in self.quantizers.items():
            self.records[name]["step"] = float(q.step.detach().abs())
        return self.records
