"""Block reconstruction (BRECQ, with QDrop's input mixing as an option; spec related-methods §2.4-2.5).

After the driver has searched every site's codebook parameters (and rounded layer by layer), the rounding of
every weight of the block is learned *together*, against the block's output:

    min_V  loss(block_q(x), block_fp(x_fp)) + λ Σ_sites Σ (1 - |2h - 1|^β)

with each weight on the soft path between its two neighbouring levels (rounding/soft.py, the same relaxation as
layer-wise LLR; log codebooks interpolate the exponent). Two ways to run the block during training:

    hard_forward (default)  the block runs on the hard choices (h >= 0.5), the gradient takes the soft path
                            (straight-through, as AutoRound does): what is optimised is what is kept
    soft                    BRECQ / AdaRound: the block runs on the soft weights and the annealed regulariser
                            drives h to 0 or 1

On SmolLM2 (W3, 100 iterations, the first blocks) the soft relaxation ended *above* the layer-wise result after
hardening, and the straight-through variant 60 % below it (docs/RESULTS.md), hence the default. CNN recipes use
the soft forward (vision_pipeline.py): over 2000 iterations on few calibration images the straight-through
variant fits them and loses on held-out inputs, the annealed relaxation does not. block_fp is the block's full-precision copy and x_fp its
full-precision inputs (the driver carries that stream while reconstruction is on); x is what the quantized model
feeds the block, or with QDrop (`qdrop = p`) each element is the full-precision one with probability p.

    loss "mse"  Σ (y_q - y_fp)² per sample (BRECQ's), averaged over the batch
    loss "nlc"  -log cos(y_q, y_fp) per sample (LRQuant's negative log of the cosine similarity), scaled by the
                number of output elements of one sample so that λ weighs it as it weighs the MSE
    reduce "position"  any of these divided by the number of positions of a sample (the elements of one channel):
                the CNN loss of BRECQ and of the original CNN pipeline, Σ over channels and mean over positions.
                Against the regulariser (a sum over weights) this weighs the output error H·W times less
                than "sample" does, which keeps the rounding near its start; with "sample", 2000 iterations on
                128 photos moved MobileNetV2's rounding far enough to lower its held-out agreement
    loss "hessian"  Σ w (y_q - y_fp)² with w the block output's perturbation Hessian in the full-precision
                network (calib/perturbation.py; APHQ-ViT, the original ViT pipeline's loss); needs an adapter
                whose driver keeps a full-precision copy of the network (CNNs, ViTs)

Adam on V, cosine learning rate, β from 20 to 2 after a warm-up without the regulariser (the original's CNN
settings, scaled down by `iters`). The learned hard rounding is kept only if it lowers the block's output error
over the calibration samples against the layer-wise result; every site's record says which was kept.
`steps`: the place for learnable activation step sizes (LSQ-style): a function of the block returning extra
parameters that the same optimiser trains (none by default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from logart.errors import LogartError
from logart.quant.rows import padded_width
from logart.rounding.learned import LLRConfig
from logart.rounding.soft import AnnealSchedule, SoftRounding
from logart.rounding.tables import LayerTables, weight_matrix

LOSSES = ("mse", "nlc", "hessian")


@dataclass(frozen=True)
class ReconstructConfig(AnnealSchedule):
    """The schedule (`AnnealSchedule`, as layer-wise LLR) with BRECQ's λ and a cosine down to 0, plus the block
    loss and its inputs."""

    iters: int = 200
    lr_min_ratio: float = 0.0
    reg_weight: float = 0.01
    batch: int = 1            # samples per step
    loss: str = "mse"
    qdrop: float = 0.0        # probability that an input element is the full-precision one (QDrop); 0: off
    hard_forward: bool = True   # straight-through: the block runs on the hard choices, gradients take the soft path
    reduce: str = "sample"      # "sample" or "position" (module doc)
    seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise LogartError(f"unknown reconstruction loss {self.loss!r}.", f"use one of {', '.join(LOSSES)}.")
        if self.reduce not in ("sample", "position"):
            raise LogartError(f"unknown loss reduction {self.reduce!r}.", "use sample or position.")
        if not 0.0 <= self.qdrop <= 1.0:
            raise LogartError(f"the QDrop probability must lie in [0, 1], got {self.qdrop}.", "use e.g. 0.5.")
        if self.iters < 1 or self.batch < 1:
            raise LogartError("block reconstruction needs at least one iteration of at least one sample.",
                              "use e.g. iters=200, batch=1.")

    def to_dict(self) -> dict:
        return asdict(self)


def output_loss(y: torch.Tensor, target: torch.Tensor, kind: str, weights: torch.Tensor | None = None,
                reduce: str = "sample") -> torch.Tensor:
    """Per-sample loss, averaged over the batch (first dimension); with reduce "position", per position (dims 2+,
    as [batch, channels, *positions]). `weights` (broadcast over the batch): the per-element weights of the
    "hessian" loss."""
    positions = y[0, 0].numel() if reduce == "position" and y.dim() > 2 else 1
    diff = (y - target).flatten(1)
    if kind == "hessian":
        return (diff.pow(2) * weights.flatten(1)).sum(1).mean() / positions
    if kind == "mse":
        return diff.pow(2).sum(1).mean() / positions
    cos = nn.functional.cosine_similarity(y.flatten(1), target.flatten(1), dim=1, eps=1e-12)
    return -(torch.log(cos.clamp(min=1e-12))).mean() * diff.shape[1] / positions


class _Call(nn.Module):
    """The adapter's block call as a module, so that `torch.func.functional_call` can put soft weights in."""

    def __init__(self, adapter, block, kwargs):
        super().__init__()
        self.adapter, self.block, self.kwargs = adapter, block, kwargs
        self.m = block.module

    def forward(self, x):
        return self.adapter.run(self.block, x, self.kwargs)


class BlockReconstruction:
    """The driver's `reconstruct` step (calib/driver.py): called once per block after its sites are quantized."""

    def __init__(self, config: ReconstructConfig = ReconstructConfig(), steps=None, progress: bool = True):
        self.config, self.steps, self.progress = config, steps, progress
        self.weights = None    # the current block's perturbation Hessian ("hessian" loss)
        self.layout = None     # the adapter's memory order for input batches (channels-last CNNs), if any

    def _soft_weights(self, driver, block, chosen, fp_module) -> dict:
        """{parameter name inside the block: (site, SoftRounding)} for every learned-rounded site, each bracket
        around the site's full-precision weight and starting at the codebook's nearest level."""
        softs = {}
        for name, (site, eff) in chosen.items():
            if name not in driver.block_params or not (site.takes_inputs and eff.quantizes_with_data):
                continue
            cb, params = driver.block_params[name]
            rel = name[len(block.name) + 1:] if name != block.name else ""
            W = weight_matrix(fp_module.get_submodule(rel).weight)
            pad = padded_width(W.shape[1], cb.spec.group_size) - W.shape[1]
            W = nn.functional.pad(W, (0, pad)) if pad else W
            tables = LayerTables(W, cb, params)
            sr = SoftRounding(tables, W, cb.log_rows(params), LLRConfig().zero_segment_for(cb.spec))
            sr.bracket.align(tables, weight_matrix(cb.fake_quant(W, params)))
            softs[f"m.{rel}.weight" if rel else "m.weight"] = (site, sr.start(), tables)
        return softs

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.config.batch, n)) for i in range(0, n, self.config.batch)]

    @torch.no_grad()
    def _targets(self, fp_call, x_fp: torch.Tensor) -> torch.Tensor:
        """The full-precision block's outputs, kept in the precision of its cached inputs (a half-precision cache
        stays half)."""
        targets = None
        for c in self._chunks(x_fp.shape[0]):
            y = fp_call(x_fp[c])
            if targets is None:
                targets = torch.empty((x_fp.shape[0], *y.shape[1:]), dtype=x_fp.dtype)
            targets[c] = y
        return targets

    @torch.no_grad()
    def _error(self, call, inputs, targets) -> float:
        """Σ over samples of the per-sample output MSE, Hessian-weighted with that loss (in batches)."""
        kind = "hessian" if self.weights is not None else "mse"
        return sum(float(output_loss(call(inputs[c]), targets[c], kind, self.weights)) * (c.stop - c.start)
                   for c in self._chunks(inputs.shape[0]))

    def __call__(self, driver, block, chosen, inputs, kwargs, fp_inputs, fp_module) -> None:
        cfg = self.config
        self.layout = getattr(driver.adapter, "layout", None)
        call = _Call(driver.adapter, block, kwargs)
        fp_call = _Call(driver.adapter, type(block)(block.name, fp_module, []), kwargs)
        x_fp = fp_inputs if fp_inputs is not None else inputs
        targets = self._targets(fp_call, x_fp)
        softs = self._soft_weights(driver, block, chosen, fp_module)
        if not softs:
            return
        self.weights = None
        if cfg.loss == "hessian":
            if driver.fp_model is None or not torch.is_tensor(driver.data):
                raise LogartError("the hessian reconstruction loss needs the full-precision network beside the "
                                  "quantized one (vision models).", "use --recon-loss mse for this model.")
            from logart.calib.perturbation import perturbation_weights
            self.weights = perturbation_weights(driver.fp_model, driver.fp_model.get_submodule(block.name),
                                                driver.data)
        layerwise = {key: site.weight.detach().clone() for key, (site, _, _) in softs.items()}
        before = self._error(call, inputs, targets)
        self._train(call, softs, inputs, x_fp, targets, block)
        for site, sr, tables in softs.values():
            site.write(tables.decode(tables.canonical(sr.hard_codes())))
        after = self._error(call, inputs, targets)
        kept = "reconstruction" if after < before else "layer-wise"
        if kept == "layer-wise":
            for key, (site, _, _) in softs.items():
                site.weight.data.copy_(layerwise[key])
        info = {"block_error_layerwise": before, "block_error_reconstructed": after, "kept": kept,
                "config": cfg.to_dict()}
        for rec in driver.block_records:
            if rec.name in {site.name for site, _, _ in softs.values()}:
                rec.extra["reconstruct"] = info
        if driver.log:
            driver.log(f"{block.name}: block reconstruction {before:.4g} -> {after:.4g}, kept the {kept} rounding")

    def _weight(self, sr, tables) -> torch.Tensor:
        soft = sr()
        if not self.config.hard_forward:
            return soft
        hard = tables.decode(sr.hard_codes())
        return hard + (soft - soft.detach())

    def _train(self, call, softs, inputs, x_fp, targets, block) -> None:
        frozen = [p for p in block.module.parameters() if p.requires_grad]
        for p in frozen:       # only V (and any step sizes) learn; no gradient for the block's own parameters
            p.requires_grad_(False)
        try:
            self._steps(call, softs, inputs, x_fp, targets, block)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _steps(self, call, softs, inputs, x_fp, targets, block) -> None:
        cfg = self.config
        extra = list(self.steps(block)) if self.steps else []
        opt = torch.optim.Adam([sr.V for _, sr, _ in softs.values()] + extra, lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = inputs.shape[0]
        for it in tqdm(range(cfg.iters), desc=f"{block.name} reconstruction", leave=False, disable=not self.progress):
            idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
            x = inputs[idx]
            if cfg.qdrop > 0:
                keep_fp = torch.rand(x.shape, generator=gen) < cfg.qdrop
                x = torch.where(keep_fp, x_fp[idx], x)
            if self.layout is not None:
                x = self.layout(x)
            weights = {key: self._weight(sr, tables)[:, :site.columns].reshape(site.weight.shape)
                       for key, (site, sr, tables) in softs.items()}
            y = torch.func.functional_call(call, weights, (x,))
            loss = output_loss(y, targets[idx], cfg.loss, self.weights, cfg.reduce)
            beta = cfg.beta(it)
            if beta is not None:
                loss = loss + cfg.reg_weight * sum(sr.regulariser(beta) for _, sr, _ in softs.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(it)
            opt.step()
