"""summary.md: the run's numbers in one page, with links to the figures beside it."""

from __future__ import annotations

import math
import os
from pathlib import Path

from logart.reporting.run import RunFolder, recorded_recipe
from logart.reporting.sizes import Sizes


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _num(v, fmt: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _duration(secs) -> str:
    if not isinstance(secs, (int, float)):
        return "—"
    return f"{secs:.1f} s" + (f" ({secs / 60:.1f} min)" if secs >= 60 else "")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def describe_codebook(cb: dict) -> str:
    if not cb:
        return "—"
    group = {-1: "per output channel", 0: "per tensor"}.get(cb.get("group_size"), f"groups of {cb.get('group_size')}")
    parts = [f"{cb.get('method')} {cb.get('bits')}-bit", group]
    if cb.get("method") != "uniform":
        parts.append("symmetric" if cb.get("symmetric") else "asymmetric (ABS)")
        if cb.get("hardware_approx"):
            parts.append("1 + 1/2 hardware approximation")
    else:
        parts.append("symmetric" if cb.get("symmetric") else "with zero point")
    parts.append(f"{cb.get('mode', 'strict')} mode")
    return ", ".join(parts)


def describe_recipe(recipe: dict) -> str:
    r = recorded_recipe(recipe) if recipe else None
    if r is None:
        return "—"
    s, rd, c = r.search, r.rounding, r.calibration
    on = [name for name, flag in (("DBS", s.dbs), ("SFS", s.sfs)) if flag]
    parts = [f"**{r.name}**", f"search {'+'.join(on) or 'none'} ({s.strategy}, {s.score} score)",
             f"rounding {rd.method}"]
    if rd.method.learns:
        parts.append(f"{rd.llr_iters} LLR iterations")
    if r.reconstruction.kind != "none":
        parts.append(f"{r.reconstruction.kind} reconstruction ({r.reconstruction.iters} iterations)")
    if r.needs_calibration:
        parts.append(f"calibration {c.nsamples} × {c.seqlen} tokens, seed {c.seed}")
    else:
        parts.append("data-free (no calibration)")
    if recipe.get("ignore"):
        parts.append(f"kept in full precision: {', '.join(recipe['ignore'])}")
    return ", ".join(parts)


def _size_lines(sizes: Sizes | None, report: dict) -> list[tuple[str, str]]:
    if sizes is None:
        return [("effective bits per weight", "— (no packed checkpoint: reference mode runs are not packed)"),
                ("checkpoint", "none written")]
    parts = " + ".join(f"{name} {sizes.bits_of(key):.3f}" for key, name in
                       (("qweight", "codes"), ("row_scale", "row scales"), ("table_index", "table indices"),
                        ("tables", "tables")))
    ratio = sizes.fp32_bytes / sizes.tensor_bytes if sizes.tensor_bytes else float("nan")
    lin_ratio = sizes.linear_fp32_bytes / sizes.packed_bytes if sizes.packed_bytes else float("nan")
    return [
        ("effective bits per weight", f"**{sizes.effective_bits:.3f}** over {sizes.weights:,} quantized weights "
                                      f"({parts})"),
        ("checkpoint", f"model.safetensors {_bytes(sizes.file_bytes)} on disk; its tensors take "
                       f"{_bytes(sizes.tensor_bytes)} against {_bytes(sizes.fp32_bytes)} for the same tensors in "
                       f"fp32 (×{ratio:.2f} smaller)"),
        ("quantized linears", f"{_bytes(sizes.packed_bytes)} packed against {_bytes(sizes.linear_fp32_bytes)} in "
                              f"fp32 (×{lin_ratio:.2f} smaller)"),
        ("per-row choices", f"quant_params.safetensors {_bytes(sizes.params_file_bytes)} (for reports; "
                            "inference does not read it)"),
    ]


def _k_table(report: dict, layers: list[dict], bits: int | None) -> list[str]:
    hist = {int(k): int(v) for k, v in (report.get("k_histogram") or {}).items()}
    if not hist:
        for r in layers:
            for k, v in r.get("k_hist", {}).items():
                hist[k] = hist.get(k, 0) + v
    if not hist:
        return ["No k was recorded (uniform codebook)."]
    L = 2 ** (bits - 1) if bits else None
    total = sum(hist.values())
    lines = ["| k (base-2 levels per sign) | base-√2 levels per sign | rows | share |", "|---:|---:|---:|---:|"]
    for k in sorted(hist, reverse=True):
        lines.append(f"| {k} | {L - k if L is not None else '—'} | {hist[k]:,} | {100 * hist[k] / total:.1f}% |")
    return lines


def _top_layers(layers: list[dict], n: int = 10) -> list[str]:
    ranked = sorted((r for r in layers if isinstance(r.get("loss_after"), (int, float)) and not math.isnan(r["loss_after"])),
                    key=lambda r: r["loss_after"], reverse=True)[:n]
    if not ranked:
        return ["No per-layer errors were recorded."]
    lines = ["| # | layer | shape | error before | error after | after / before | k histogram | s range |",
             "|---:|---|---|---:|---:|---:|---|---|"]
    for i, r in enumerate(ranked, 1):
        before, after = r.get("loss_before"), r["loss_after"]
        ratio = after / before if isinstance(before, (int, float)) and before and not math.isnan(before) else None
        ks = " ".join(f"k{k}:{v}" for k, v in sorted(r.get("k_hist", {}).items(), reverse=True)) or "—"
        s = r.get("s_range") or []
        srange = f"{s[0]:.2f}–{s[1]:.2f}" if len(s) == 2 else "—"
        lines.append(f"| {i} | `{r['name']}` | {' × '.join(map(str, r.get('shape', [])))} | {_num(before)} | "
                     f"{_num(after)} | {_num(ratio, '.3f')} | {ks} | {srange} |")
    return lines


def write_summary(run: RunFolder, sizes: Sizes | None, figures: dict, path: Path, error_meaning: str,
                  notes: list[str] = ()) -> Path:
    """figures: {caption: png path or None (not drawn)}; links are relative to summary.md."""
    rep = run.report
    cb = run.codebook
    ppl = _num(rep.get("ppl"), ".3f")
    if rep.get("ppl") is not None:
        ppl += f" ({rep.get('eval')}, {rep.get('eval_windows') or 'all'} windows)"
    if rep.get("ppl_fp32") is not None:
        ppl += f"; full precision {rep['ppl_fp32']:.3f}"
    secs = rep.get("quant_seconds")
    rows = [("run folder", f"`{run.path}`"), ("tag", rep.get("tag") or "—"), ("date", rep.get("date") or "—"),
            ("model", f"`{rep.get('model')}`"), ("recipe", describe_recipe(rep.get("recipe") or {})),
            ("codebook", describe_codebook(cb)), ("perplexity", ppl),
            *_size_lines(sizes, rep),
            ("quantization time", _duration(secs)),
            ("peak RSS", f"{rep['peak_rss_gb']:.2f} GiB" if isinstance(rep.get("peak_rss_gb"), (int, float)) else "—"),
            ("versions", ", ".join(f"{k} {v}" for k, v in (rep.get("versions") or {}).items()) or "—")]
    out = [f"# logart report: {rep.get('tag') or run.path.name}", "", "| | |", "|---|---|"]
    out += [f"| {name} | {_cell(value)} |" for name, value in rows]
    if rep.get("sample"):
        out += ["", "Sample (greedy):", "", "```text", str(rep["sample"]).rstrip().replace("```", "'''"), "```"]
    out += ["", "## Chosen k across rows", ""] + _k_table(rep, run.layers, cb.get("bits"))
    out += ["", "## Top 10 layers by error after quantization", "", f"Error: {error_meaning}.", ""]
    out += _top_layers(run.layers)
    out += ["", "## Figures", ""]
    for caption, png in figures.items():
        if png is None:
            out.append(f"- {caption}: not drawn for this run")
        else:
            rel = Path(os.path.relpath(png, path.parent)).as_posix()
            out += [f"- [{caption}]({rel})", "", f"  ![{caption}]({rel})", ""]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(out) + "\n")
    return path
