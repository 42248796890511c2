"""The Python entry point: `logart.quantize(model, recipe, calib)`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from logart.calib.driver import quantize_blocks
from logart.calib.record import LayerRecord
from logart.recipes import Recipe, make_recipe


@dataclass
class QuantizationResult:
    model: torch.nn.Module
    recipe: Recipe
    layers: list[LayerRecord] = field(default_factory=list)
    params: dict = field(default_factory=dict)   # module name -> (codebook, params): what save_quantized packs
    activations: dict = field(default_factory=dict)   # site name -> its activation quantizer (calib/activations.py)
    activation_quantizers: dict = field(default_factory=dict)   # what a checkpoint stores to reinstall them
    seconds: float = 0.0

    def k_histogram(self) -> dict:
        hist: dict = {}
        for rec in self.layers:
            for k, n in rec.k_hist.items():
                hist[k] = hist.get(k, 0) + n
        return dict(sorted(hist.items(), reverse=True))


def default_adapter(model, recipe: Recipe, log=print, calib: torch.Tensor | None = None):
    """The adapter for `model`, by what it is, recognised as the adapters themselves recognise it: a timm ViT /
    DeiT / Swin, a BERT-family encoder, any other network of convolutions (a CNN: its BatchNorm is folded
    on `calib[:2]`), and otherwise a Hugging Face causal LM (the family this entry point has always taken)."""
    from torch import nn

    from logart.models.hf_encoder import HFEncoder, encoder_layers
    from logart.models.vit import TimmViT, is_timm_vit

    if is_timm_vit(model):
        return TimmViT()
    if encoder_layers(model) is not None:
        return HFEncoder()
    if not hasattr(model, "config") and any(isinstance(m, nn.Conv2d) for m in model.modules()):   # not HF
        from logart.errors import LogartError
        from logart.models.cnn import CNN
        if calib is None or not isinstance(calib, torch.Tensor) or calib.dim() != 4:
            raise LogartError(f"{type(model).__name__} is a convolutional network: logart needs calibration images "
                              "(a float tensor [N, C, H, W]) to trace and fold its BatchNorm.",
                              "pass the images as `calib`, or pass adapter=logart.models.cnn.CNN(example=images[:2]).")
        return CNN(example=calib[:2])
    from logart.models.hf_causal import HFCausalLM

    return HFCausalLM(embeddings=recipe.lm.quantize_embeddings, lm_head=recipe.lm.quantize_lm_head,
                      selects=lambda name: recipe.for_module(name) is not None, log=log)


def quantize(model, recipe: Recipe | str = "logart", calib: torch.Tensor | None = None, progress: bool = True,
             log=print, state=None, streamer=None, adapter=None, reconstruction=None, on_block_done=None,
             **recipe_options) -> QuantizationResult:
    """Quantize the weight sites of `model` in place, block by block (calib/driver.py).

    recipe: a `Recipe` or a preset name (`logart`, `logart-fast`, `log2-rtn`, `rtn`, `gptq`) with options
        such as `bits=3, group_size=128`.
    calib: LongTensor [nsamples, seqlen] of token windows (see `logart.data.calibration_set`), or a float tensor
        of images [N, C, H, W] for a CNN or ViT; not needed by data-free recipes (a CNN needs two images).
    state: a `logart.calib.resume.RunState` to make the run resumable (the CLI does this for --output).
    streamer: larger-than-memory runs load and pack one block at a time (see `logart.pipeline.PackAfterBlock`).
    adapter: the model family's adapter (models/adapter.py); default: found from the model (`default_adapter`:
        timm ViT / DeiT / Swin, BERT-family encoder, CNN, Hugging Face causal LM). Presets given by name keep their
        LLM defaults; `logart.vision_pipeline.vision_recipe` gives the CNN and ViT pipelines' own.
    reconstruction: a block reconstruction engine (calib/reconstruct.py) to use instead of the one the recipe's
        `reconstruct="block"` option builds.
    on_block_done: called (block index, seconds) after each block.
    """
    if isinstance(recipe, str):
        recipe = make_recipe(recipe, **recipe_options)
    t0 = time.perf_counter()
    adapter = adapter or default_adapter(model, recipe, log, calib)
    rc = recipe.reconstruction
    if reconstruction is None and rc.kind == "block":
        from logart.calib.reconstruct import BlockReconstruction, ReconstructConfig

        config = ReconstructConfig(iters=rc.iters, loss=rc.loss, qdrop=rc.qdrop, hard_forward=rc.forward == "hard",
                                   batch=rc.batch, lr=rc.lr, lr_min_ratio=rc.lr_min_ratio, reg_weight=rc.reg_weight,
                                   reduce=rc.reduce, seed=recipe.calibration.seed)
        reconstruction = BlockReconstruction(config, progress=progress)
    activations = None
    if recipe.activations.bits is not None:
        from logart.calib.activations import ActivationQuantization

        activations = ActivationQuantization(recipe.activations)
        if reconstruction is not None and reconstruction.steps is None:
            reconstruction.steps = activations.steps   # LSQ: the steps learn with the block's rounding
    layers, params = quantize_blocks(model, adapter, recipe, calib, progress=progress, log=log, state=state,
                                     streamer=streamer, reconstruct=reconstruction, on_block_done=on_block_done,
                                     activations=activations)
    saved = {}
    if activations is not None:
        from logart.calib.activations import fold_shifts, saved_quantizers
        fold_shifts(activations)   # the weights are final: post-GELU shifts go into fc2's bias (AdaLog eq. 15)
        saved = saved_quantizers(model, activations)
    return QuantizationResult(model=model, recipe=recipe, layers=layers, params=params,
                              seconds=time.perf_counter() - t0,
                              activations=activations.finish() if activations else {}, activation_quantizers=saved)
