"""Activation quantization (W4A4, W3A3, W4A8): a quantizer on every activation site, installed block by block.

Before a block's weights are quantized, the driver hands the block's inputs here: every activation site of the
block (`Block.act_sites`) gets a quantizer fitted on that site's calibration values and a hook that
fake-quantizes it from then on, so the block's own weight search and reconstruction, and every later block,
see quantized activations. Two families of sites:

CNN sites ("conv-input", "linear-input"): a uniform per-tensor quantizer with one step (`UniformActQuantizer`),
chosen by

    mse          the step among 100 candidates (a fraction 0.01 .. 1 of max |x|) with the lowest squared error
    percentile   max |x| clipped at the given percentile of |x|

An input that is never negative (after a ReLU) uses the unsigned grid [0, 2^b - 1]; otherwise the signed
[-2^(b-1), 2^(b-1) - 1]. With `learn=True` the steps are trained with the block's rounding during block
reconstruction (LSQ: the gradient reaches the step through a straight-through round), via
`BlockReconstruction(steps=...)`. The network's own input (the image of the first layer) stays in full precision.

Transformer sites (post-softmax, post-GELU, post-LayerNorm, attention output, q / k / v): the two-parameter
quantizers of calib/act_quantizers.py (AdaLog or a fixed log base on post-softmax and post-GELU, uniform
asymmetric elsewhere), each searched (FPCS, brute force or alternating) against its consumer's output: x Wᵀ for
a linear layer's input, A·V for the attention probabilities. All sites of a block are fitted on the block's
unquantized flow, then installed together. Options: RepQ-style reparameterization of post-LayerNorm inputs
(`reparam`); after the run, post-GELU shifts are folded into fc2's bias (`fold_shifts`).

`saved_quantizers` / `install_saved`: what a packed checkpoint stores to put the same quantizers back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from logart.calib.hooks import forward_until_seen

if TYPE_CHECKING:   # the caller hands the recipe's piece in; calib/ does not import the layer above it
    from logart.recipes import ActivationsConfig

METHODS = ("mse", "percentile")
LOG_KINDS = ("adalog", "log2", "logsqrt2", "uniform")   # the quantizers a post-softmax / post-GELU site can take
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

    def to_config(self) -> dict:
        return {"type": "uniform-step", "bits": self.bits, "signed": self.signed, "step": float(self.step.detach().abs())}

    def _grid(self, x: torch.Tensor, step) -> torch.Tensor:
        return torch.clamp(torch.round(x / step), self.qmin, self.qmax) * step

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, step={float(self.step.detach()):.4g}"


def _sample(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE_VALUES)]


STEP_KINDS = ("conv-input", "linear-input")   # CNN sites: the one-step quantizer above
SEARCH_ROWS = 512          # rows of a linear consumer's input scored per candidate
SEARCH_VALUES = 2 ** 16    # values of any other site scored per candidate
SEARCH_MAPS = 4            # images whose attention maps score a post-softmax candidate
CAPTURE_BATCH = 8


class ActivationQuantization:
    """The driver's activation step (calib/driver.py): `calibrate` once per block, `steps` for reconstruction.

    CNN sites ("conv-input", "linear-input") get the one-step quantizer above. Transformer sites get a
    two-parameter quantizer fitted to their consumer's output (calib/act_quantizers.py): post-softmax and
    post-GELU activations the configured log quantizer (AdaLog by default; post-GELU shifted by c and fc2's
    bias reparameterized), every other site (post-LayerNorm, attention output, q / k / v) a uniform asymmetric
    one."""

    def __init__(self, config: ActivationsConfig):
        self.config = config
        self.quantizers: dict[str, nn.Module] = {}
        self.records: dict[str, dict] = {}
        self.sites: dict = {}
        self._first = True

    @torch.no_grad()
    def calibrate(self, run, block, inputs: torch.Tensor) -> None:
        """Fit and install a quantizer on every activation site of `block` (its inputs: `inputs`)."""
        step_sites = {a.name: a for a in block.act_sites if a.kind in STEP_KINDS and not a.output}
        if self._first and step_sites:   # the network's input (the first layer's image) stays in full precision
            step_sites.pop(next(iter(step_sites)))
        if block.act_sites:
            self._first = False
        self._calibrate_steps(run, step_sites, inputs)
        others = [a for a in block.act_sites if a.kind not in STEP_KINDS]
        if others:
            self._calibrate_transformer(run, others, inputs)

    def _calibrate_steps(self, run, sites: dict, inputs: torch.Tensor) -> None:
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
            self.sites[name] = site
            self.records[name] = {"bits": q.bits, "signed": q.signed, "step_searched": float(q.step.detach()),
                                  "relative_mse": error}
            _install(site, q)   # the hook stays: the quantized model keeps quantizing this input

    def _calibrate_transformer(self, run, sites: list, inputs: torch.Tensor) -> None:
        from logart.calib.act_quantizers import GELU_SHIFT, AsymActQuantizer, LogActQuantizer, histogram

        cfg = self.config
        reparam = [s for s in sites if cfg.reparam and s.norm is not None]
        seen = _capture(run, sites, inputs, norms=reparam)
        fitted = []
        for site in sites:
            if not seen[site.name]:
                continue
            note = _reparameterize(site, seen, cfg.bits) if site in reparam else None
            sample, error = _objective(site, seen)
            kind = {"post-softmax": cfg.softmax, "post-gelu": cfg.gelu}.get(site.kind, "uniform")
            bits = cfg.softmax_bits if (site.kind == "post-softmax" and cfg.softmax_bits) else cfg.bits
            if kind == "uniform":
                q = AsymActQuantizer(bits)
            else:
                q = LogActQuantizer(kind, bits, shift=GELU_SHIFT if site.kind == "post-gelu" else 0.0)
            start = time.perf_counter()
            record = q.fit(sample, error, cfg.search)
            record["seconds"] = round(time.perf_counter() - start, 4)
            scale = float(error(torch.zeros_like(sample))) or 1.0
            self.records[site.name] = {"site_kind": site.kind, **record, "relative_error": record["score"] / scale,
                                       "histogram": histogram(sample, q)}
            if note is not None:
                self.records[site.name]["reparameterized"] = note
            self.quantizers[site.name] = q
            self.sites[site.name] = site
            fitted.append((site, q))
        for site, q in fitted:   # installed together: every site was fitted on the block's unquantized flow
            _install(site, q)

    def restore(self, model: nn.Module, saved: dict, started: bool) -> None:
        """Put back the quantizers of an interrupted run's finished blocks (calib/resume.py: {site: {"entry",
        "record"}}) on `model`, as if their blocks had just been calibrated. `started`: a finished block had
        activation sites (so the network's input has been passed over already)."""
        for name, saved_site in saved.items():
            site, q = _rebuild(model, name, saved_site["entry"])
            _install(site, q)
            self.quantizers[name], self.sites[name] = q, site
            self.records[name] = saved_site["record"]
        if started:
            self._first = False

    def steps(self, block) -> list[nn.Parameter]:
        """The step sizes of `block`'s step quantizers, for reconstruction to train (none unless `learn`)."""
        if not self.config.learn:
            return []
        return [self.quantizers[a.name].step for a in block.act_sites
                if isinstance(self.quantizers.get(a.name), UniformActQuantizer)]

    def finish(self) -> dict:
        """{site name: its record}: a step quantizer's bits, signedness, searched and trained step and relative
        MSE; a two-parameter quantizer's kind, parameters, consumer-output error and pairs scored."""
        for name, q in self.quantizers.items():
            if isinstance(q, UniformActQuantizer):
                self.records[name]["step"] = float(q.step.detach().abs())
        return self.records


@torch.no_grad()
def fold_shifts(activations: ActivationQuantization) -> int:
    """Fold every shifted (post-GELU) quantizer's shift into its linear consumer's bias, once the weights are
    final: the deployed form of AdaLog's bias reparameterization. Returns how many were folded."""
    from logart.calib.act_quantizers import LogActQuantizer

    folded = 0
    for name, q in activations.quantizers.items():
        site = activations.sites.get(name)
        if isinstance(q, LogActQuantizer) and q.shift and not q.folded and site is not None \
                and not site.output and isinstance(site.module, nn.Linear):
            q.fold_shift(site.module)
            folded += 1
    return folded


def saved_quantizers(model: nn.Module, activations: ActivationQuantization, names=None) -> dict:
    """{site: {module (its name in `model`), output, chunk, quantizer}}: what a packed checkpoint stores so that
    `install_saved` puts the same quantizers back on the reloaded model (only the sites `names`, if given)."""
    modules = {id(m): n for n, m in model.named_modules()}
    return {name: {"module": modules[id(site.module)], "kind": site.kind, "output": site.output,
                   "chunk": list(site.chunk) if site.chunk else None, "quantizer": q.to_config()}
            for name, q in activations.quantizers.items()
            if (site := activations.sites.get(name)) is not None and (names is None or name in names)}


def _rebuild(model: nn.Module, name: str, entry: dict):
    """(site, quantizer) of one `saved_quantizers` entry, the quantizer not yet installed."""
    from logart.calib.act_quantizers import from_config
    from logart.models.adapter import ActSite

    cfg = entry["quantizer"]
    if cfg["type"] == "uniform-step":
        q = UniformActQuantizer(int(cfg["bits"]), bool(cfg["signed"]), float(cfg["step"]))
    else:
        q = from_config(cfg)
    chunk = tuple(entry["chunk"]) if entry.get("chunk") else None
    return ActSite(name, model.get_submodule(entry["module"]), entry["kind"], bool(entry["output"]), chunk), q


def install_saved(model: nn.Module, saved: dict) -> None:
    """Install the activation quantizers `saved_quantizers` described on `model`."""
    for name, entry in saved.items():
        _install(*_rebuild(model, name, entry))


def _span(site, out: torch.Tensor) -> tuple[int, int]:
    """(start, stop) of the site's slice of the last dimension of `out`."""
    i, n = site.chunk
    width = out.shape[-1] // n
    return i * width, (i + 1) * width


def _slice(site, out: torch.Tensor) -> torch.Tensor:
    start, stop = _span(site, out)
    return out[..., start:stop]


def _install(site, q: nn.Module) -> None:
    if not site.output:
        site.module.register_forward_pre_hook(lambda _m, args: (q(args[0]), *args[1:]))
    elif site.chunk is None:
        site.module.register_forward_hook(lambda _m, _args, out: q(out))
    else:
        def hook(_m, _args, out):
            start, stop = _span(site, out)
            return torch.cat([out[..., :start], q(out[..., start:stop]), out[..., stop:]], dim=-1)
        site.module.register_forward_hook(hook)


def _capture(run, sites: list, inputs: torch.Tensor, norms: list = ()) -> dict[str, list]:
    """Every site's tensor over the calibration inputs, batch by batch, on the block as it is; for the sites of
    `norms` also their LayerNorm's output (under "<site>#norm": the reparameterization checks they are one)."""
    seen: dict[str, list] = {s.name: [] for s in sites}
    handles = []
    for site in norms:
        seen[site.name + "#norm"] = []
        handles.append(site.norm.register_forward_hook(
            lambda _m, _a, out, s=site: seen[s.name + "#norm"].append(out.detach().float())))
    for site in sites:
        if not site.output:
            handles.append(site.module.register_forward_pre_hook(
                lambda _m, args, s=site: seen[s.name].append(args[0].detach().float())))
        else:
            handles.append(site.module.register_forward_hook(
                lambda _m, _a, out, s=site: seen[s.name].append(
                    (out if s.chunk is None else _slice(s, out)).detach().float())))
    try:
        for i in range(0, inputs.shape[0], CAPTURE_BATCH):
            run(inputs[i:i + CAPTURE_BATCH])
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def _reparameterize(site, seen: dict, bits: int) -> str:
    """RepQ-ViT's scale reparameterization of a post-LayerNorm input: the per-channel asymmetric ranges of the
    LayerNorm output y (scale s_c, zero point z_c from each channel's min / max) become one per-tensor range
    (s = mean s_c, z = round(mean z_c)) by the exact rewrite y' = y / r + t, r = s_c / s, t = s (z_c - z):
    the LayerNorm's γ, β turn into γ / r, β / r + t and the consumer's W, b into W diag(r), b - W diag(r) t, so
    the network computes the same function and a per-tensor quantizer of y' is the per-channel one of y. The
    weights absorb the channel spread (they are quantized afterwards). Skipped (the reason is returned) when the
    site's input is not exactly its LayerNorm's output (a Swin window partition, a post-norm block)."""
    from logart.calib.act_quantizers import set_bias

    y, normed = seen[site.name], seen.pop(site.name + "#norm")
    if len(y) != len(normed) or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(y, normed)):
        return "skipped: the input is not the LayerNorm's output itself"
    channels = y[0].shape[-1]
    flat = torch.cat([t.reshape(-1, channels) for t in y])
    lo, hi = flat.min(0).values.clamp(max=0), flat.max(0).values.clamp(min=0)
    s_c = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8)
    z_c = torch.round(-lo / s_c)
    s, z = s_c.mean(), torch.round(z_c.mean())
    r, t = s_c / s, s * (z_c - z)
    norm, linear = site.norm, site.module
    norm.weight.data = (norm.weight.data.float() / r).to(norm.weight.dtype)
    norm.bias.data = (norm.bias.data.float() / r + t).to(norm.bias.dtype)
    w = linear.weight.data.float() * r
    b = linear.bias.data.float() if linear.bias is not None else torch.zeros(w.shape[0])
    linear.weight.data = w.to(linear.weight.dtype)
    set_bias(linear, b - w @ t)
    seen[site.name] = [v / r + t for v in y]
    return f"per-channel ranges folded into one (scale spread max/min {float(r.max() / r.min()):.3g})"


def _objective(site, seen: dict) -> tuple[torch.Tensor, object]:
    """(the sample a candidate quantizes, error(x_hat) of its consumer's output) for one site (AdaLog's
    layer-output MSE): x W^T for a linear layer's input, A·V for post-softmax attention, the values
    themselves otherwise."""
    values = torch.cat(seen[site.name])
    if site.kind == "post-softmax" and site.partner in seen and seen[site.partner]:
        maps = values[:SEARCH_MAPS]                                   # [B, H, N, N]
        v = torch.cat(seen[site.partner])[:SEARCH_MAPS]               # [B, N, H*d]
        b, h, n, _ = maps.shape
        v = v.reshape(b, n, h, -1).transpose(1, 2)                    # [B, H, N, d]
        return maps, lambda x_hat: float(((x_hat - maps) @ v).pow(2).sum())
    if not site.output and isinstance(site.module, nn.Linear):
        rows = values.reshape(-1, values.shape[-1])
        rows = rows[:: max(1, rows.shape[0] // SEARCH_ROWS)][:SEARCH_ROWS]
        w = site.module.weight.detach().float()
        return rows, lambda x_hat: float(((x_hat - rows) @ w.T).pow(2).sum())
    flat = values.reshape(-1)
    flat = flat[:: max(1, flat.numel() // SEARCH_VALUES)]
    return flat, lambda x_hat: float((x_hat - flat).pow(2).sum())
