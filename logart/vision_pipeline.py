"""The end-to-end CNN run behind `logart quantize --model mobilenetv2 ...`: load -> data -> quantize -> evaluate ->
save -> record, through the same engine as the LLM path (models/cnn.py adapter, calib/driver.py).

Recipes keep their names; on a CNN they follow the original CNN pipeline (spec §5):
    logart       DBS x SFS x ABS search with the layer-output score (`layer_wise`), then block reconstruction
                 with learned log-domain rounding: 2000 iterations per block, batch 32, Adam lr 0.05 with a
                 cosine down to 0.3 lr, λ 1, β 20 -> 2 after a 20 % warm-up, soft forward, loss per position
    logart-fast  the same search alone (round to nearest)
    brecq        uniform codebook, the same block reconstruction (the baseline)
    adaround     uniform codebook, layer-wise learned rounding
    rtn, log2-rtn, gptq   as on LLMs
Any option given explicitly (`--recon-iters 200`, `--reconstruct none`) wins over these defaults.

Data: ImageNet models calibrate on the packaged photos (or `--calib FOLDER`) and are measured for fidelity to
fp32 (top-1 agreement, KL) over several views of each held-out photo; the Fashion-MNIST models calibrate on
training images and are measured by test accuracy too.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from logart.recipes import Override, Recipe, make_recipe

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# The original pipelines' reconstruction schedule (LogART-CNN main.py, spec §5; the ViT's too, spec §6).
ORIGINAL_SCHEDULE = dict(reconstruct="block", recon_iters=2000, recon_batch=32, recon_lr=0.05,
                         recon_lr_min_ratio=0.3, recon_reg=1.0)
# On CNNs the original's AdaRound forward too: the block runs on the soft weights, and the loss sums channels
# and averages positions (BRECQ's). On MobileNetV2 blocks 14-16 (2000 iterations, 128 photos) the
# straight-through forward fitted the calibration photos and lost on held-out ones: relative output error
# 0.0125 held out against 0.0071 with the soft forward (bench/cnn_recon_forward.py, docs/RESULTS.md).
CNN_RECONSTRUCTION = dict(ORIGINAL_SCHEDULE, recon_forward="soft", recon_reduce="position")
# BRECQ's weight quantizers do not start from the min/max range: their scale is initialised per channel by a
# search of the clipping range on the weight error (its 'mse' scale method), which here is the uniform codebook's
# SFS axis scored on the weight error (data-free). Without it the uniform baseline started weaker than BRECQ
# does: MobileNetV2 W3, 200 iterations, 78.42 % / KL 0.438 from min/max against 84.16 % / 0.292 (docs/RESULTS.md).
BRECQ_INIT = dict(sfs=True, score="weight")
CNN_DEFAULTS = {
    # The original's layer_wise search: on MobileNetV2 W4 the search alone keeps 86.7 % top-1 agreement with it
    # and 73.3 % with the Gram score (docs/RESULTS.md), which cannot see the ReLU6 clipping or upstream error.
    "logart": dict(rounding="rtn", fp_target=0.0, score="output", **CNN_RECONSTRUCTION),
    "logart-fast": dict(score="output"),
    "brecq": dict(CNN_RECONSTRUCTION, **BRECQ_INIT),
}
# The ViT pipeline (spec §6, configs best.py): the schedule with QDrop mixing at p = 0.5 (and logart's own
# straight-through forward, with which the ViT numbers of docs/RESULTS.md were measured).
VIT_DEFAULTS = {"logart": dict(rounding="rtn", fp_target=0.0, qdrop=0.5, **ORIGINAL_SCHEDULE),
                "brecq": dict(ORIGINAL_SCHEDULE, **BRECQ_INIT), "logart-fast": {}}


def vision_recipe(name: str = "logart", bits: int = 4, group_size: int = -1, mode: str = "strict",
                  family: str = "cnn", **options) -> Recipe:
    """A preset with the CNN or ViT pipeline's defaults (module doc); explicit `options` win."""
    defaults = (VIT_DEFAULTS if family == "vit" else CNN_DEFAULTS).get(name, {})
    return make_recipe(name, bits=bits, group_size=group_size, mode=mode, **{**defaults, **options})


def uniform_row_share(params: dict) -> dict:
    """{"uniform_row_share": the fraction of rows that took the uniform grid} where a `log_or_uniform` codebook
    quantized some layers; {} otherwise."""
    chosen = [p.uniform for _, p in params.values() if hasattr(p, "uniform")]
    if not chosen:
        return {}
    return {"uniform_row_share": round(sum(int(u.sum()) for u in chosen) / sum(u.numel() for u in chosen), 4)}


def first_last_overrides(model: torch.nn.Module, bits: int) -> tuple[Override, ...]:
    """Rules that keep the first conv and the last linear layer at `bits` (BRECQ keeps them at 8, uniform: log
    codebooks stop at 4 bits)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    method = "uniform" if bits > 4 else None
    return tuple(Override(pattern=f"^{re.escape(n)}$", bits=bits, method=method)
                 for n in dict.fromkeys([names[0], names[-1]]))


EVAL_SEED = 0   # the random crops of the evaluation views


@dataclass
class VisionOptions:
    model: str = "mobilenetv2"
    weights: str | None = None          # a local state_dict for the architecture
    calib: str = "photos"               # photos (packaged), a folder of images, or fashion-train
    eval: str = "photos-eval"           # photos-eval (packaged), a folder, or fashion-test
    nsamples: int | None = None         # calibration images (None: 128 photos, 1024 Fashion-MNIST images)
    eval_views: int = 5                 # views per evaluation photo (centre, mirror, random crops)
    calib_views: int = 1                # views per calibration photo (1: the centre view only)
    eval_limit: int | None = None       # at most this many evaluation images
    first_last_bits: int | None = None  # None: quantize them like the rest (the original); 8: BRECQ's choice
    cache_dtype: str = "float32"        # the cached block inputs: float32, or float16 (half the memory)
    output: str | None = None
    results: str | None = None
    tag: str | None = None
    overwrite: bool = False
    threads: int | None = None
    seed: int = 0                       # the calibration sample (Fashion-MNIST images, photo views) and run seeds
    progress: bool = True


def calibration_images(vm, opts: VisionOptions) -> torch.Tensor:
    """The calibration inputs: a seeded sample of Fashion-MNIST training images, or the photos' centre views (with
    `calib_views` > 1, that many views of each photo)."""
    from logart.data.images import fashion_mnist, fashion_tensors, load_images, views

    if vm.data == "fashion-mnist":
        images, _ = fashion_mnist("train")
        pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(opts.seed))
        return fashion_tensors(images[pick[:opts.nsamples or 1024]])
    calib = "photos" if opts.calib in ("photos", "fashion-train") else opts.calib
    if opts.calib_views > 1:   # more varied inputs than photos: mirrors and random crops (seeded)
        return views(calib, vm.preprocess, per_image=opts.calib_views, seed=opts.seed + 1,
                     limit=opts.nsamples or 128)
    return load_images(calib, vm.preprocess, limit=opts.nsamples or 128)


def evaluation_images(vm, opts: VisionOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(evaluation inputs, labels or None): the Fashion-MNIST test set, or views of the held-out photos."""
    from logart.data.images import fashion_mnist, fashion_tensors, views

    if vm.data == "fashion-mnist":
        images, labels = fashion_mnist("test")
        n = opts.eval_limit or images.shape[0]
        return fashion_tensors(images[:n]), labels[:n]
    evaluation = "photos-eval" if opts.eval in ("photos-eval", "fashion-test") else opts.eval
    # One fixed set of views whatever --seed is: the seed varies the calibration, never what it is measured on.
    return views(evaluation, vm.preprocess, per_image=opts.eval_views, seed=EVAL_SEED, limit=opts.eval_limit), None


def evaluate_checkpoint(directory, opts: VisionOptions | None = None, log=print) -> dict:
    """Reload a packed vision checkpoint and measure it against its fp32 model on the evaluation data."""
    from logart.eval.classify import logits, scores
    from logart.io.checkpoint import load_quantized, read_quantization_config
    from logart.models.vision import load_vision_model

    info = read_quantization_config(directory)["logart_vision"]
    model, _ = load_quantized(directory)
    vm = load_vision_model(info["model"], log=log)
    x_eval, labels = evaluation_images(vm, opts or VisionOptions(model=vm.name))
    return scores(logits(vm.model, x_eval), logits(model, x_eval), labels)


def run_vision(recipe: Recipe, opts: VisionOptions, log=print) -> dict:
    """Quantize a vision model, evaluate it against its fp32 self, save, and append a results row; returns the
    row and the activation quantizers' records (`activations`)."""
    from logart.api import quantize
    from logart.calib.resume import RunState, fingerprint
    from logart.eval.classify import logits, scores
    from logart.models.vision import load_vision_model, vision_adapter
    from logart.pipeline import check_output, seed_everything
    from logart.version import __version__
    from logart.report import append_csv, results_csv, now, peak_rss_gb, versions, write_json

    from logart.allocator import keep_freed_memory

    if opts.cache_dtype not in CACHE_DTYPES:
        from logart.errors import LogartError
        raise LogartError(f"unknown cache dtype {opts.cache_dtype!r}.", f"use one of {', '.join(CACHE_DTYPES)}.")
    keep_freed_memory()   # block reconstruction allocates the same activations every iteration
    if opts.threads:
        torch.set_num_threads(opts.threads)
    check_output(opts.output, opts.overwrite)
    seed_everything(opts.seed)
    vm = load_vision_model(opts.model, opts.weights, log=log)
    x_calib = calibration_images(vm, opts)
    x_eval, labels = evaluation_images(vm, opts)
    log(f"{vm.name}: {sum(p.numel() for p in vm.model.parameters()) / 1e6:.2f} M parameters; calibration "
        f"{x_calib.shape[0]} images, evaluation {x_eval.shape[0]} {'test images' if labels is not None else 'views'}")
    if opts.first_last_bits:
        recipe = recipe.with_options(overrides=recipe.overrides + first_last_overrides(vm.model, opts.first_last_bits))
    reference = logits(vm.model, x_eval)
    n_eval = int(x_eval.shape[0])
    del x_eval   # 0.3 GB of photo views that quantization does not need: loaded again (the same, seeded) after it
    t0 = time.perf_counter()
    blocks = []
    adapter = vision_adapter(vm.name, x_calib[:2], cache_dtype=CACHE_DTYPES[opts.cache_dtype])
    n_blocks = None

    def on_block(index, seconds):
        nonlocal n_blocks
        n_blocks = n_blocks or len(adapter.plan(vm.model))   # prepared by now (BatchNorm folded)
        blocks.append(seconds)
        left = (n_blocks - index - 1) * (time.perf_counter() - t0) / len(blocks)   # blocks timed by this run
        log(f"block {index + 1}/{n_blocks} done in {seconds:.1f} s; elapsed {time.perf_counter() - t0:.0f} s, "
            f"ETA {left:.0f} s; peak RSS {peak_rss_gb():.2f} GB")

    state, resumed = None, 0
    if opts.output:   # resumable: finished blocks survive an interruption in <output>.partial/
        state = RunState(Path(f"{opts.output}.partial"), fingerprint(
            model=vm.name, weights=opts.weights, recipe=recipe.to_dict(), calib=x_calib, calib_source=opts.calib,
            cache_dtype=opts.cache_dtype, logart=__version__))
        resumed = state.done
        if resumed:
            log(f"resuming: {resumed} blocks finished by the interrupted run are restored from {state.folder}")
    result = quantize(vm.model, recipe, x_calib if recipe.needs_calibration else x_calib[:2], progress=opts.progress,
                      log=None, adapter=adapter, on_block_done=on_block, state=state)
    seconds = time.perf_counter() - t0
    x_eval, labels = evaluation_images(vm, opts)
    row = {"tag": opts.tag, "date": now(), "model": vm.name, "pretrained": vm.pretrained, "recipe": recipe.to_dict(),
           "calib": opts.calib, "calib_views": opts.calib_views, "nsamples": int(x_calib.shape[0]), "eval": opts.eval,
           "eval_inputs": n_eval, "first_last_bits": opts.first_last_bits,
           "cache_dtype": opts.cache_dtype,
           "quant_seconds": round(seconds, 1), "block_seconds": [round(s, 1) for s in blocks],
           "resumed_blocks": resumed,   # quant_seconds then counts the rest only
           **scores(reference, logits(vm.model, x_eval), labels), "peak_rss_gb": round(peak_rss_gb(), 3),
           "act_sites": len(result.activations),
           **uniform_row_share(result.params),
           "versions": versions()}
    acts = f"A{recipe.activations.bits}" if recipe.activations.bits else ""
    log(f"{vm.name} {recipe.name} W{recipe.codebook.bits}{acts}: " + ", ".join(
        f"{k} {row[k]}" for k in ("top1", "top1_fp32", "agreement", "kl") if k in row) + f" ({seconds:.0f} s)")
    if opts.output:
        from logart.io.checkpoint import save_quantized
        from logart.models.vision import checkpoint_config

        out = Path(opts.output)
        if recipe.codebook.mode == "strict":
            save_quantized(vm.model, out, result.params, recipe, overwrite=opts.overwrite,
                           config=checkpoint_config(vm, x_calib.shape[1:], result.activation_quantizers))
            row["checkpoint_mb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2 ** 20, 3)
            log(f"saved the packed checkpoint to {out} ({row['checkpoint_mb']} MB)")
        write_json(out / "report.json", dict(row, layers=[r.to_dict() for r in result.layers],
                                             activations=result.activations))
    if state is not None:
        state.finish()
    results = results_csv(opts.results, opts.output)
    append_csv(results, row)
    return dict(row, activations=result.activations)
