"""`logart report DIR`: figures and summary.md for a finished run folder, written to DIR/report/ by default."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from logart.errors import LogartError
from logart.reporting.run import load_run, quantized_with_data, recorded_recipe

# (axis label, what it means): loss_before / loss_after in report.json are one or the other.
ERROR_H = ("output error tr(ΔW·H·ΔWᵀ)",
           "tr(ΔW·H·ΔWᵀ) with H = (2/N) Σ x·xᵀ over the N calibration tokens, i.e. 2 × the mean over tokens of "
           "‖ΔW·x‖² (the layer's squared output error, summed over output channels)")
ERROR_W = ("weight error ‖ΔW‖²", "‖ΔW‖², the sum of squared weight errors (a data-free recipe: no calibration)")


@dataclass
class Report:
    out: Path                                       # the folder with the PNGs and summary.md
    summary: Path
    figures: dict = field(default_factory=dict)     # caption -> PNG path, or None when not drawn
    effective_bits: float | None = None             # None when the run wrote no packed checkpoint
    rows: dict = field(default_factory=dict)        # layer -> the row drawn in its codebook figure
    fp_overlay: bool = False                        # the codebook figures show full-precision weights


def error_label(recipe: dict) -> tuple[str, str]:
    """What loss_before / loss_after measure: H-weighted when the run calibrated, the weight error otherwise."""
    return ERROR_H if quantized_with_data(recipe) else ERROR_W


def _fp_model(model: str, config: dict | None):
    """The full-precision model as the quantized one saw it (a vision network with its BatchNorms folded)."""
    from logart.models.vision import is_vision_model
    if is_vision_model(model):
        import torch

        from logart.models.cnn import fold_batchnorm
        from logart.models.vision import load_vision_model

        fp = load_vision_model(model).model
        shape = ((config or {}).get("logart_vision") or {}).get("input_shape") or [3, 224, 224]
        with torch.no_grad():
            fold_batchnorm(fp, torch.zeros(1, *shape))
        return fp
    from logart.models import load_causal_lm
    return load_causal_lm(model)[0]


def _fp_weights(model: str, names: list[str], config: dict | None = None) -> dict:
    fp = _fp_model(model, config)
    out = {}
    for name in names:
        try:
            w = fp.get_submodule(name).weight.detach().float()
            out[name] = w.reshape(w.shape[0], -1)   # a conv kernel as the [out, in] matrix the codebook saw
        except AttributeError as e:
            raise LogartError(f"the --model {model!r} has no layer {name!r}.",
                              "pass the model that was quantized (report.json names it).") from e
    return out


def _on_run_codebook(recipe: dict, names: list[str]) -> list[str]:
    """The names whose effective codebook (after the recorded --override rules) is the run's own one."""
    r = recorded_recipe(recipe)
    if r is None:
        return list(names)
    return [n for n in names if (r.for_module(n) or r).codebook == r.codebook]


def _file_name(layer: str) -> str:
    return "codebook_" + re.sub(r"[^A-Za-z0-9_.-]", "_", layer) + ".png"


def make_report(folder, layers=(), out=None, model: str | None = None, row: int | None = None, log=print) -> Report:
    """Write the report of the run in `folder`: errors.png, k_distribution.png, s_distribution.png, one
    codebook_<layer>.png per chosen layer (`layers`: regexes; default a few representative ones) and summary.md.
    `model`: the full-precision model (name or path) to overlay its weights on the codebook figures."""
    import logart.reporting.plots as plots
    from logart.reporting.rows import row_view
    from logart.reporting.sizes import measure
    from logart.reporting.summary import write_summary

    log = log or (lambda *_: None)
    run = load_run(folder)
    if run.packed:   # the whole load check first: a damaged checkpoint gets its error before any figure is written
        from logart.io.checkpoint import load_quantized
        load_quantized(run.path)
    out = Path(out) if out is not None else run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    cb = run.codebook
    bits, method = int(cb.get("bits", 4)), cb.get("method", "log_dynamic")
    group = cb.get("group_size", -1)
    row_unit = {-1: "output channels", 0: "whole tensors"}.get(group, f"groups of {group} weights")
    label, meaning = error_label(run.report.get("recipe") or {})
    report = Report(out=out, summary=out / "summary.md")
    notes = []
    if run.layers:
        errors = plots.plot_errors(run.layers, out / "errors.png", label, run.is_log)
        report.figures["per-layer error before / after"] = errors
    # k means "base-2 levels of L = 2^(bits-1)": only layers on the run's own codebook share one axis
    keep = set(_on_run_codebook(run.report.get("recipe") or {}, [r["name"] for r in run.layers]))
    own = [r for r in run.layers if r["name"] in keep]
    if len(own) < len(run.layers):
        notes.append(f"the k distribution leaves out {len(run.layers) - len(own)} layers whose codebook an "
                     "--override changed (their k counts another number of levels).")
    k_png = plots.plot_k(own, bits, method, row_unit, out / "k_distribution.png") if run.is_log else None
    report.figures["chosen k across rows"] = k_png
    s_by_layer = {}
    if run.is_log:
        for name in run.modules:
            s = run.row_choices(name).get("s")
            if s is not None:
                s_by_layer[name] = s.numpy()
    report.figures["chosen s across rows"] = plots.plot_s(s_by_layer, row_unit, out / "s_distribution.png")
    if not run.is_log:
        notes.append("k and s are choices of log codebooks; this run used a uniform codebook.")
    elif not s_by_layer:
        notes.append("no quant_params.safetensors in the run folder, so the s distribution is not drawn.")
    acts = run.report.get("activations") or {}
    if acts:
        report.figures["activation histograms and quantizer levels"] = plots.plot_activations(
            acts, out / "activations.png")
    sizes = measure(run)
    if sizes is not None:
        report.effective_bits = sizes.effective_bits
        chosen = run.pick(layers)
        fp = _fp_weights(model, chosen, run.config) if model else {}
        report.fp_overlay = bool(fp)
        for name in chosen:
            view = row_view(run, name, row, fp.get(name))
            report.rows[name] = view.row
            report.figures[f"codebook of {name}, row {view.row}"] = plots.plot_row(view, out / _file_name(name))
        if not fp:
            notes.append("the codebook figures show the quantized weights; pass --model "
                         f"{run.report.get('model') or 'NAME_OR_PATH'} to draw the full-precision weights under the levels.")
    else:
        notes.append("the run wrote no packed checkpoint (reference mode), so no codebook figures and no "
                     "effective bits.")
        if layers or model:
            log("note: --layers / --model need a packed checkpoint; this run has none.")
    write_summary(run, sizes, report.figures, report.summary, meaning, notes)
    for png in report.figures.values():
        if png is not None:
            log(f"wrote {png}")
    log(f"wrote {report.summary}")
    return report


def add_arguments(p) -> None:
    """The `logart report` options, on an argparse (sub)parser."""
    p.add_argument("dir", help="the --output folder of a finished `logart quantize` run")
    p.add_argument("--layers", action="append", default=[], metavar="REGEX",
                   help="draw the codebook figure of every layer matching REGEX (repeatable; default: the first "
                        "q_proj, a middle down_proj and the last layer)")
    p.add_argument("--row", type=int, help="the row (output channel or group) to draw (default: a typical one)")
    p.add_argument("--model", help="the full-precision model (name or path) to draw its weights under the levels")
    p.add_argument("--out", help="where to write the PNGs and summary.md (default: DIR/report)")


def cmd_report(args) -> Report:
    report = make_report(args.dir, layers=args.layers, out=args.out, model=args.model, row=args.row)
    if report.effective_bits is not None:
        print(f"effective bits per weight: {report.effective_bits:.3f}")
    return report
