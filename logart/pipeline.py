"""The end-to-end LLM run behind `logart quantize`: load -> calibrate -> quantize -> evaluate -> save -> record.

Every step prints what it does; the run ends with a report.json beside the checkpoint and one row in
results.csv. Defaults follow PROTOCOL.md (news calibration 32 x 2048, seed 0; Wikipedia eval 16 x 2048).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logart.api import quantize
from logart.calib.resume import RunState, fingerprint
from logart.data import calibration_set, eval_set, text_source
from logart.data.bos import resolve_bos
from logart.eval.generate import generate_text
from logart.eval.perplexity import perplexity
from logart.atomic import check_writable, remove_stale
from logart.io.checkpoint import pack_model, save_quantized
from logart.models import detach_gguf, load_causal_lm
from logart.models.streaming import open_streaming, parse_size, resident_bytes
from logart.errors import LogartError
from logart.recipes import Recipe
from logart.version import __version__
from logart.report import append_csv, results_csv, now, peak_rss_gb, versions, write_json


@dataclass
class RunOptions:
    model: str = "smollm2-135m"
    output: str | None = None
    calib: str = "news"
    eval: str | None = "wikipedia"
    eval_windows: int | None = 16
    eval_fp32: bool = False
    prompt: str = "The capital of France is"
    results: str | None = None        # results.csv path; default: beside the output folder
    tag: str | None = None            # a name for the run, recorded in its row
    overwrite: bool = False
    threads: int | None = None
    max_memory: str | int | None = None   # larger-than-memory mode: a weight budget, e.g. "300MB"
    bos: str = "auto"                 # windows start with BOS: auto (the model's convention), yes, no
    progress: bool = True


class PackAfterBlock:
    """The driver's streamer for larger-than-memory runs: load a block's float weights just before it is
    quantized, pack its linears as soon as it is finished (their float weights are then freed)."""

    def __init__(self, model, weights):
        self.model, self.weights = model, weights

    def load(self, block_name: str) -> None:
        self.weights.load(block_name)

    def done(self, block_name: str, block_params: dict) -> None:
        pack_model(self.model, block_params)
        self.weights.release()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output(output: str | None, overwrite: bool) -> None:
    """Refuse a non-empty or unwritable output folder before hours of work, not after."""
    if output:
        for target in (output, f"{output}.partial"):   # what a killed earlier run left half-written
            remove_stale(target)
        check_writable(output, overwrite)
        check_writable(f"{output}.partial", overwrite=True)   # the resumable state is written beside it


def run(recipe: Recipe, opts: RunOptions, log=print) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if recipe.activations.bits is not None:
        raise LogartError("activation quantization (--act-bits) is implemented for vision models so far, not for "
                          "causal LMs.", "drop --act-bits, or quantize a vision model (e.g. --model mobilenetv2).")
    check_output(opts.output, opts.overwrite)
    # Bad data paths fail now, not after the model has loaded (packaged texts are cached in memory).
    if recipe.needs_calibration:
        text_source(opts.calib)
    if opts.eval:
        text_source(opts.eval)
    seed_everything(recipe.calibration.seed)
    t = time.perf_counter()
    streamer = None
    if opts.max_memory is not None:
        if opts.eval_fp32:
            raise LogartError("--eval-fp32 needs the whole float model in memory, which --max-memory avoids.",
                              "measure fp32 separately, or drop --max-memory.")
        model, tokenizer, weights = open_streaming(opts.model, parse_size(opts.max_memory))
        streamer = PackAfterBlock(model, weights)
        log(f"streaming {opts.model} block by block: {resident_bytes(model) / 2**20:.1f} MiB of weights outside "
            f"the blocks in memory, budget {weights.budget / 2**20:.1f} MiB")
    else:
        model, tokenizer = load_causal_lm(opts.model)
        model = detach_gguf(model)
    log(f"loaded {opts.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
        f"({time.perf_counter() - t:.0f} s)")
    bos, bos_rule = resolve_bos(tokenizer, opts.bos)
    log(f"windows {'start with BOS' if bos is not None else 'without BOS'} ({bos_rule})")
    row = {"tag": opts.tag, "date": now(), "model": opts.model, "recipe": recipe.to_dict(), "calib": opts.calib, "eval": opts.eval,
           "eval_windows": opts.eval_windows, "bos": bos is not None, "bos_rule": bos_rule, "versions": versions()}
    windows = None
    if opts.eval:
        windows = eval_set(tokenizer, opts.eval, seqlen=recipe.calibration.seqlen, max_windows=opts.eval_windows,
                           bos=bos)
        log(f"evaluation: {windows.shape[0]} windows x {windows.shape[1]} tokens of {opts.eval}")
        if opts.eval_fp32:
            row["ppl_fp32"] = perplexity(model, windows, progress=opts.progress)
            log(f"fp32 perplexity: {row['ppl_fp32']:.3f}")
    calib = None
    if recipe.needs_calibration:
        c = recipe.calibration
        calib = calibration_set(tokenizer, opts.calib, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed, bos=bos)
        log(f"calibration: {calib.shape[0]} windows x {calib.shape[1]} tokens of {opts.calib} (seed {c.seed})")
    log(f"quantizing with recipe {recipe.name}: {recipe.codebook.method} {recipe.codebook.bits}-bit, group "
        f"{recipe.codebook.group_size}, {recipe.codebook.mode} mode, search {'DBS ' if recipe.search.dbs else ''}"
        f"{'SFS ' if recipe.search.sfs else ''}({recipe.search.score}), rounding {recipe.rounding.method}")
    for i, rule in enumerate(recipe.overrides, 1):
        settings = ", ".join(f"{k}={v}" for k, v in rule.__dict__.items() if k != "pattern" and v is not None)
        log(f"override {i} (first match wins): /{rule.pattern}/ -> {settings}")
    state = None
    if opts.output:  # resumable: finished blocks survive an interruption in <output>.partial/
        state = RunState(Path(f"{opts.output}.partial"), fingerprint(
            model=opts.model, recipe=recipe.to_dict(), calib=calib, calib_source=opts.calib, logart=__version__,
            state_layout="plan"))  # block files are numbered by the adapter's plan, ends included
    result = quantize(model, recipe, calib, progress=opts.progress, log=log, state=state, streamer=streamer)
    if streamer is not None:
        row["streaming"] = {"budget_mib": round(streamer.weights.budget / 2**20, 1),
                            "peak_weights_mib": round(streamer.weights.peak / 2**20, 1)}
        log(f"peak weights in memory while streaming: {row['streaming']['peak_weights_mib']} MiB")
    row["quant_seconds"] = round(result.seconds, 1)
    # The high-water mark of loading + quantizing, before evaluation's own peak (full-vocabulary logits).
    row["peak_rss_quant_gb"] = round(peak_rss_gb(), 3)
    row["k_histogram"] = {str(k): v for k, v in result.k_histogram().items()}
    log(f"quantized {len(result.layers)} linear layers in {result.seconds:.1f} s; chosen k: {row['k_histogram']}")
    if windows is not None:
        row["ppl"] = perplexity(model, windows, progress=opts.progress)
        log(f"quantized perplexity: {row['ppl']:.3f}")
    if opts.prompt:
        row["sample"] = opts.prompt + generate_text(model, tokenizer, opts.prompt, max_new_tokens=24)
        log(f"sample: {row['sample']!r}")
    row["peak_rss_gb"] = round(peak_rss_gb(), 3)
    report = dict(row, layers=[r.to_dict() for r in result.layers])
    if opts.output:
        out = Path(opts.output)
        packable = recipe.codebook.mode == "strict"
        if packable:
            save_quantized(model, out, result.params, recipe, tokenizer=tokenizer, overwrite=opts.overwrite)
            size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
            row["checkpoint_mb"] = round(size / 2 ** 20, 2)
            log(f"saved the packed checkpoint to {out} ({row['checkpoint_mb']} MB)")
        else:
            log("reference mode cannot be packed into n-bit codes: no checkpoint written (use strict mode)")
        report["checkpoint_mb"] = row.get("checkpoint_mb")
        write_json(out / "report.json", report)
    if state is not None:
        state.finish()
    results = results_csv(opts.results, opts.output)
    append_csv(results, row)
    log(f"appended the result row to {results}")
    return report
