"""The `logart` command.

    logart quantize --model smollm2-135m --bits 3 [--group-size 128] [--recipe logart] [--output DIR]
                    [--ignore REGEX] [--override 'REGEX:bits=3,group_size=128,method=log2,recipe=gptq']
                    [--lm-head] [--embeddings]
    logart eval DIR                    # reload a packed checkpoint and measure its perplexity
    logart generate DIR "prompt"       # greedy text from a packed checkpoint
    logart report DIR [--layers REGEX] [--model NAME]   # figures + summary.md of a finished run
    logart export DIR OUT [--dtype float16|bfloat16|float32]   # plain HF checkpoint, no logart needed
    logart convert MODEL OUT [--shard-size 100MB]   # sharded safetensors folder, the input of --max-memory
    logart train-fashion fashion-resnet|fashion-mobilenet|fashion-vit   # Fashion-MNIST models (trained once, cached)
    logart demo [--full]               # the README's first command

Bad input ends with one line `error: ... Fix: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

# Idle OpenMP threads that spin make torch's many mid-sized operations up to 10x slower on a busy machine
# (measured during the (k, s) search); it must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# transformers' own "Loading weights" bar: logart prints one line per step instead, and an error stays one line.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from logart.data.bos import CHOICES as BOS_CHOICES
from logart.errors import LogartError
from logart.quant.spec import METHODS
from logart.recipes import PRESETS, SCORES, Override, make_recipe

BOS_HELP = ("start every calibration and evaluation window with the BOS token: auto (default) follows the model's "
            "convention (its tokenizer; a GGUF file's tokenizer.ggml.add_bos_token), yes, no")


def _recipe_args(p: argparse.ArgumentParser, defaults: dict | None = None):
    d = defaults or {}
    p.add_argument("--model", default=d.get("model", "smollm2-135m"),
                   help="embedded name (smollm2-135m), a local Hugging Face folder, or a local .gguf file")
    p.add_argument("--recipe", default=d.get("recipe", "logart"), choices=list(PRESETS))
    p.add_argument("--bits", type=int, default=d.get("bits", 4))
    p.add_argument("--group-size", type=int, default=-1,
                   help="-1 per output channel (default), 0 one table for the whole weight (per tensor), or e.g. 128")
    p.add_argument("--mode", default="strict", choices=["strict", "reference"],
                   help="strict: packable n-bit codes (default); reference: the original code's numerics")
    p.add_argument("--hardware-approx", action="store_true", help="1 + 1/2 multiplier-free sqrt(2) levels")
    p.add_argument("--rounding", choices=["rtn", "gptq", "llr", "gptq+llr"], help="override the recipe's rounding")
    p.add_argument("--search", choices=["fast", "exhaustive"], help="override the recipe's (k, s) search")
    p.add_argument("--llr-iters", type=int,
                   help="learned-rounding iterations per layer (the logart preset: 200; the original: 500)")
    p.add_argument("--attention-aware", action="store_true", default=None,
                   help="learned rounding of q/k projections weighs errors by the attention scores they perturb "
                        "(per-head key/query moments, RoPE-aware; spec §4.4)")
    p.add_argument("--abs-per-row", action="store_true", default=None,
                   help="strict mode: every row keeps the asymmetric (ABS) or the symmetric table, whichever the "
                        "search scores lower (one more search per layer)")
    p.add_argument("--fp-target", type=float, nargs="?", const=0.25, default=None, metavar="ALPHA",
                   help="every layer moves a fraction ALPHA (default 0.25) toward the full-precision model's output "
                        "on the full-precision inputs, so it also corrects the error of the blocks before it "
                        "(statistics gathered group by group; about 1.2x the quantization time of the logart recipe)")
    p.add_argument("--bias-correction", action="store_true", default=None,
                   help="after each block is quantized, every bias absorbs the mean shift of its layer's output "
                        "from the full-precision network's, per output channel (Nagel et al. 2019; layers with a "
                        "bias only, e.g. convs with BatchNorm folded in; a few forwards per block)")
    p.add_argument("--reconstruct", choices=["none", "block"],
                   help="block: after each block's layers are quantized, learn the rounding of all its weights "
                        "together against the block's full-precision output (BRECQ; on SmolLM2 one "
                        "iteration, forward and backward through a block on one 2048-token window, takes about 0.3 s "
                        "on 2 cores)")
    p.add_argument("--recon-iters", type=int, help="block reconstruction iterations per block (default 200)")
    p.add_argument("--recon-loss", choices=["mse", "nlc", "hessian"],
                   help="block output loss: mse (BRECQ, default), nlc (negative log cosine similarity, LRQuant) or "
                        "hessian (vision models: the output MSE weighted by the perturbation Hessian of the "
                        "network's prediction, the original ViT pipeline's)")
    p.add_argument("--recon-forward", choices=["hard", "soft"],
                   help="hard (default): the block trains on the hard rounding choices, gradients through the soft "
                        "path (straight-through); soft: BRECQ's soft weights with an annealed regulariser")
    p.add_argument("--recon-reduce", choices=["sample", "position"],
                   help="sample: the block loss sums each sample's output elements (default on LLMs and ViTs); "
                        "position: it sums channels and averages positions (BRECQ's CNN loss, the default on CNNs)")
    p.add_argument("--qdrop", type=float, metavar="P",
                   help="QDrop: each reconstruction input element is the full-precision one with probability P")
    p.add_argument("--score", choices=SCORES,
                   help="what the codebook search minimises per row: hessian (Δw H Δwᵀ of the layer's inputs, "
                        "default), weight (data-free weight error) or output (vision models: the layer's output "
                        "error after its activation against the full-precision network, on 32 inputs; the "
                        "original CNN pipeline's layer_wise search, one layer forward per scored candidate)")
    p.add_argument("--method", choices=METHODS,
                   help="the weight codebook (default: the recipe's, log_dynamic for the LogART recipes): uniform, "
                        "log2, log_sqrt2, log_dynamic (LogART's mixed base) or log_or_uniform (per output channel the "
                        "mixed-base table or a uniform grid, whichever the search scores lower)")
    p.add_argument("--dbs", action=argparse.BooleanOptionalAction, help="dynamic base search (off: plain log2)")
    p.add_argument("--sfs", action=argparse.BooleanOptionalAction, help="scale-factor search")
    p.add_argument("--abs", action=argparse.BooleanOptionalAction, help="asymmetric extension (off: symmetric)")
    p.add_argument("--nsamples", type=int, help="calibration samples: token windows of an LM (default 32), "
                   "images of a vision model (default 128 photos; 1024 Fashion-MNIST images)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="keep modules whose full name matches (re.search, e.g. 'mlp.down_proj') in full precision; "
                        "repeatable; beats every --override")
    p.add_argument("--override", action="append", default=[], metavar="REGEX:KEY=VALUE[,...]",
                   help="per-module settings, keys bits, group_size, method, recipe (a preset name), e.g. "
                        "'layers\\.0\\.:bits=4' or 'down_proj:recipe=gptq,group_size=128'; repeatable, in order: "
                        "the first rule whose regex matches a module's full name applies")
    p.add_argument("--lm-head", action="store_true",
                   help="also quantize the lm_head (after the last block, with its input Hessian); an lm_head tied "
                        "to the embeddings is untied")
    p.add_argument("--embeddings", action="store_true",
                   help="also quantize the token embeddings (data-free, stored packed)")
    p.add_argument("--calib", default="news", help="news (packaged), wikipedia, a local .txt/.jsonl/.json(.gz) file, or hf:NAME[:CONFIG[:SPLIT]] from the local HF datasets cache")
    p.add_argument("--eval", default="wikipedia", help="evaluation text: wikipedia (packaged), news, or a local file")
    p.add_argument("--eval-windows", type=int, default=16, help="number of 2048-token windows (0 = all)")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto", help=BOS_HELP)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--eval-fp32", action="store_true", help="also measure the full-precision model first")
    p.add_argument("--output", default=d.get("output"), help="checkpoint folder (never overwritten by accident)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--results", help="results.csv to append to (default: beside --output)")
    p.add_argument("--tag", help="a name for this run, recorded in its results row")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="larger-than-memory mode: keep at most SIZE (e.g. 300MB) of weights in memory, loading one "
                        "block at a time from a safetensors folder (see `logart convert`)")
    p.add_argument("--act-bits", type=int, metavar="BITS",
                   help="vision models: also quantize the activations to BITS, e.g. 4 for W4A4: every conv / "
                        "linear input of a CNN (uniform, per tensor; the input image stays full precision); on a ViT "
                        "the qkv / fc1 / proj / fc2 inputs and both attention products' inputs")
    p.add_argument("--act-method", choices=["mse", "percentile"],
                   help="activation step search (default mse); steps are trained during block reconstruction")
    p.add_argument("--act-softmax", choices=["adalog", "log2", "logsqrt2", "uniform"],
                   help="ViTs: the post-softmax quantizer (default adalog: adaptive base 2^(q/37), q searched)")
    p.add_argument("--act-gelu", choices=["adalog", "log2", "logsqrt2", "uniform"],
                   help="ViTs: the post-GELU quantizer (default adalog, on x + 0.17 with fc2's bias reparameterized)")
    p.add_argument("--act-softmax-bits", type=int, metavar="BITS",
                   help="ViTs: post-softmax bits (default: --act-bits)")
    p.add_argument("--act-search", choices=["fpcs", "brute", "alternating"],
                   help="ViTs: the search of the two-parameter activation quantizers against their layer's output "
                        "(default fpcs, AdaLog's fast progressive combining search)")
    p.add_argument("--act-reparam", action="store_true", default=None,
                   help="ViTs: RepQ-style reparameterization of the post-LayerNorm inputs (per-channel ranges folded "
                        "into the LayerNorm and the next layer, one per-tensor quantizer left)")
    p.add_argument("--weights", help="vision models: a local state_dict file for the architecture")
    p.add_argument("--first-last-bits", type=int, metavar="BITS",
                   help="vision models: keep the first conv and the last linear layer at BITS (BRECQ: 8, uniform); "
                        "default: quantized like the rest, as the original does")
    p.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                   help="vision models: the precision of the cached block inputs and reconstruction targets; "
                        "float16 halves that memory (each batch still runs in float32), e.g. for --calib-views 4")
    p.add_argument("--calib-views", type=int, default=1,
                   help="vision models: views of each calibration photo (centre, mirror, random crops; default 1: "
                        "the centre only), e.g. 4 for 4 x 128 calibration inputs")
    p.add_argument("--eval-views", type=int, default=5,
                   help="vision models: views (centre, mirror, random crops) of each held-out photo")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _recipe_from(args, make=make_recipe):
    overrides = {"nsamples": 32 if args.nsamples is None else args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                 "hardware_approx": args.hardware_approx, "ignore": tuple(args.ignore),
                 "overrides": tuple(Override.parse(o) for o in args.override),
                 "quantize_lm_head": args.lm_head, "quantize_embeddings": args.embeddings}
    for name in ("rounding", "search", "score", "llr_iters", "sfs", "attention_aware", "abs_per_row", "fp_target",
                 "bias_correction", "reconstruct", "recon_iters", "recon_loss", "recon_forward", "recon_reduce",
                 "qdrop", "act_bits", "act_method", "act_softmax", "act_gelu", "act_softmax_bits", "act_search", "act_reparam"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.dbs is not None:  # the paper's ablation: DBS off means the pure log2 codebook
        overrides["dbs"] = args.dbs
        if not args.dbs:
            if args.method not in (None, "log2"):
                raise LogartError(f"--no-dbs means the plain log2 codebook and contradicts --method {args.method}.",
                                  "drop one of the two.")
            overrides["method"] = "log2"
    if args.method is not None:
        overrides["method"] = args.method
    if args.abs is not None:
        overrides["symmetric"] = not args.abs
    return make(args.recipe, bits=args.bits, group_size=args.group_size, mode=args.mode, **overrides)


def _options_from(args):
    from logart.pipeline import RunOptions
    return RunOptions(model=args.model, output=args.output, calib=args.calib,
                      eval=None if args.no_eval else args.eval,
                      eval_windows=None if args.eval_windows == 0 else args.eval_windows, eval_fp32=args.eval_fp32,
                      results=args.results, tag=args.tag, overwrite=args.overwrite, threads=args.threads,
                      max_memory=args.max_memory, bos=args.bos, progress=not args.quiet)


def cmd_quantize(args):
    from logart.models.vision import is_vision_model
    if is_vision_model(args.model):
        return cmd_quantize_vision(args)
    from logart.pipeline import run
    run(_recipe_from(args), _options_from(args))


def cmd_quantize_vision(args):
    """A CNN or ViT by name (models/vision.py): the same recipes with the vision pipeline's defaults
    (vision_pipeline.py)."""
    from logart.models.vision import family_of
    from logart.pipeline import RunOptions
    from logart.vision_pipeline import VisionOptions, run_vision, vision_recipe

    llm = RunOptions()
    opts = VisionOptions(model=args.model, weights=args.weights,
                         calib="photos" if args.calib == llm.calib else args.calib,
                         eval="photos-eval" if args.eval == llm.eval else args.eval, nsamples=args.nsamples,
                         eval_views=args.eval_views, calib_views=args.calib_views,
                         cache_dtype=args.cache_dtype, first_last_bits=args.first_last_bits, output=args.output,
                         results=args.results, tag=args.tag, overwrite=args.overwrite, threads=args.threads,
                         seed=args.seed, progress=not args.quiet)
    run_vision(_recipe_from(args, make=functools.partial(vision_recipe, family=family_of(args.model))), opts)


def cmd_demo(args):
    """Quick by default (8 calibration windows, 4 evaluation windows: minutes on 2 cores); --full is the
    paper's recipe under the whole protocol (32 x 2048 calibration, 16 x 2048 evaluation)."""
    from logart.pipeline import run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.output = args.output or f"runs/demo-{stamp}"
    args.recipe = "logart" if args.full else "logart-fast"
    if not args.full:
        args.nsamples = 8 if args.nsamples is None else args.nsamples
        args.eval_windows = args.eval_windows if args.eval_windows != 16 else 4
    print(f"logart demo: {'the full LogART recipe (DBS+SFS+ABS+GPTQ/LLR)' if args.full else 'LogART without learned rounding'}"
          f" on {args.model}, W{args.bits} per channel, calibration {args.nsamples} x {args.seqlen} tokens, "
          f"evaluation {args.eval_windows} x {args.seqlen} tokens -> {args.output}")
    run(_recipe_from(args), _options_from(args))
    print(f"done. Reload it with `logart eval {args.output}`, look at it with `logart report {args.output}`.")


def cmd_eval_vision(args):
    import json
    from pathlib import Path

    from logart.vision_pipeline import VisionOptions, evaluate_checkpoint

    row = evaluate_checkpoint(args.dir, VisionOptions(eval_views=args.eval_views))
    print(f"{args.dir}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    report = Path(args.dir) / "report.json"
    if report.is_file():
        recorded = json.loads(report.read_text())
        key = "top1" if "top1" in row else "agreement"
        if key in recorded:
            print(f"the quantizing run measured {key} {recorded[key]} (report.json)")


def cmd_eval(args):
    from logart.io.checkpoint import read_quantization_config
    if "logart_vision" in read_quantization_config(args.dir):
        return cmd_eval_vision(args)
    from logart.data import eval_set
    from logart.data.bos import resolve_bos
    from logart.eval.perplexity import perplexity
    from logart.io.checkpoint import load_quantized
    from logart.io.kernel import enable
    t = time.perf_counter()
    model, tok = load_quantized(args.dir)
    if tok is None:
        raise LogartError(f"{args.dir} has no tokenizer files.", "save the checkpoint with its tokenizer (logart quantize does).")
    n = enable(model)
    print(f"loaded {args.dir} in {time.perf_counter() - t:.1f} s ({n} packed layers on the CPU kernel)")
    bos, _ = resolve_bos(tok, args.bos)
    windows = eval_set(tok, args.eval, seqlen=args.seqlen, max_windows=None if args.eval_windows == 0 else args.eval_windows,
                       bos=bos)
    ppl = perplexity(model, windows, progress=not args.quiet)
    print(f"perplexity ({args.eval}, {windows.shape[0]} x {windows.shape[1]}, "
          f"{'BOS first' if bos is not None else 'no BOS'}): {ppl:.4f}")
    _compare_with_run(args, windows, ppl, bos is not None)


def _recorded_seqlen(recipe: dict):
    """The calibration window length of a recorded recipe (nested pieces; the flat layout of older runs)."""
    return (recipe.get("calibration") or {}).get("seqlen", recipe.get("seqlen"))


def _compare_with_run(args, windows, ppl, bos: bool):
    """Set the reloaded perplexity beside the one the quantizing run measured in memory, when comparable."""
    import json
    from pathlib import Path

    path = Path(args.dir) / "report.json"
    if not path.is_file():
        return
    run = json.loads(path.read_text())
    requested = None if args.eval_windows == 0 else args.eval_windows
    same = (run.get("eval") == args.eval and run.get("eval_windows") == requested and bool(run.get("bos")) == bos
            and _recorded_seqlen(run.get("recipe") or {}) == windows.shape[1])
    if same and run.get("ppl"):
        print(f"in-memory perplexity of the quantizing run (report.json): {run['ppl']:.4f}; "
              f"relative difference {abs(ppl - run['ppl']) / run['ppl']:.2e}")


def cmd_train_fashion(args):
    from logart.models.fashion import fashion_model
    _, accuracy = fashion_model(args.name)
    print(f"{args.name}: fp32 test accuracy {accuracy:.2f} % (cached; later runs load it)")


def cmd_generate(args):
    from logart.eval.generate import generate_text
    from logart.io.checkpoint import load_quantized
    from logart.io.kernel import enable
    model, tok = load_quantized(args.dir)
    enable(model)
    print(args.prompt + generate_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens))


def cmd_report(args):
    from logart.reporting import cmd_report as report
    report(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="logart", description="Logarithmic post-training quantization (LogART).")
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a causal LM, evaluate it and save a packed checkpoint")
    _recipe_args(q)
    q.set_defaults(func=cmd_quantize)
    d = sub.add_parser("demo", help="quantize SmolLM2-135M at 4 bits, evaluate, save, report (minutes)")
    _recipe_args(d, {"recipe": "logart-fast"})
    d.add_argument("--full", action="store_true", help="the full recipe with learned rounding (much longer)")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("eval", help="perplexity of a saved logart checkpoint")
    e.add_argument("dir")
    e.add_argument("--eval", default="wikipedia")
    e.add_argument("--eval-windows", type=int, default=16)
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--eval-views", type=int, default=5, help="vision checkpoints: views of each held-out photo")
    e.add_argument("--bos", choices=BOS_CHOICES, default="auto", help=BOS_HELP)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    g = sub.add_parser("generate", help="greedy generation from a saved logart checkpoint")
    g.add_argument("dir")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.set_defaults(func=cmd_generate)
    from logart.reporting import add_arguments as report_arguments
    r = sub.add_parser("report", help="figures and a Markdown summary (summary.md) of a finished run folder")
    report_arguments(r)
    r.set_defaults(func=cmd_report)
    t = sub.add_parser("train-fashion", help="train (or load from the cache) a Fashion-MNIST model: fashion-resnet, "
                                             "fashion-mobilenet, fashion-vit")
    t.add_argument("name", choices=["fashion-resnet", "fashion-mobilenet", "fashion-vit"])
    t.set_defaults(func=cmd_train_fashion)
    from logart.io.export import add_export_parser
    add_export_parser(sub)
    from logart.io.convert import add_convert_parser
    add_convert_parser(sub)
    return ap


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = str(message).removeprefix("logart: ")
    return f"warning: {text}\n"


def main(argv=None) -> int:
    import warnings
    warnings.formatwarning = _one_line_warning   # a warning is one line, like an error, not a source excerpt
    if "transformers" in sys.modules:   # imported before the variable above was set (a test, a notebook)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LogartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = getattr(args, "command", None) == "quantize" and getattr(args, "output", None)
        print("interrupted" + ("; rerun the same command to resume after the last finished block "
                               f"(kept in {args.output}.partial)" if resumable else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
