"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state):

    errors.png            per-layer error of the log2 baseline and of the final weights, blocks shaded
    k_distribution.png    the chosen base split k across rows: overall and per layer type
    s_distribution.png    the chosen scale multiplier s across rows, stacked by layer type
    codebook_<layer>.png  one row's weights with all 2^n codebook levels of that row drawn over them
    activations.png       transformer activation sites: histograms with their quantizer's levels over them
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from logart.errors import LogartError
from logart.reporting.rows import RowView
from logart.reporting.run import block_of, layer_kind

DPI = 130
STYLE = {"font.size": 10, "axes.titlesize": 11.5, "axes.labelsize": 10.5, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 12.5}


def _styled(plot):
    """Run a plot function inside the report's rc settings (matplotlib's global settings are left alone)."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        try:
            import matplotlib
        except ImportError as e:
            raise LogartError("logart report needs matplotlib, which is not installed.",
                              "pip install matplotlib (it is in requirements.txt).") from e
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper


def StrMethodFormatter(fmt: str):
    from matplotlib.ticker import StrMethodFormatter as formatter
    return formatter(fmt)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _positive(values) -> np.ndarray:
    a = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    a[~(a > 0)] = np.nan  # a log axis cannot show zero, negative or missing values
    return a


def _runs(keys) -> list[tuple[object, int, int]]:
    """(key, start, stop) of each run of equal consecutive keys."""
    spans, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            spans.append((keys[start], start, i))
            start = i
    return spans


def kinds_in_order(names) -> list[str]:
    return list(dict.fromkeys(layer_kind(n) for n in names))


# --- 1. per-layer error ----------------------------------------------------------------------------------
@_styled
def plot_errors(layers: list[dict], path: Path, error_label: str, is_log: bool = True) -> Path:
    names = [r["name"] for r in layers]
    before, after = _positive(r.get("loss_before") for r in layers), _positive(r.get("loss_after") for r in layers)
    n = len(names)
    x = np.arange(n)
    fig = _figure(min(18.0, max(10.0, 6 + 0.055 * n)), 5.6)
    ax = fig.add_subplot()
    spans = _runs([block_of(nm) for nm in names])
    for i, (_, start, stop) in enumerate(spans):
        if i % 2:
            ax.axvspan(start - 0.5, stop - 0.5, color="0.92", zorder=0, lw=0)
    ms = 4.5 if n <= 60 else 3
    # hollow circles under filled squares: where the two are equal (a baseline recipe) both stay visible
    ax.plot(x, before, "o-", ms=ms + 3.5, mfc="white", mew=1.3, lw=1, color="C0",
            label="before: the baseline, " + ("plain log2 (k = L), s = 1" if is_log else "min/max range (s = 1)")
            + ", round to nearest")
    ax.plot(x, after, "s-", ms=ms, lw=1, color="C3", label="after: the recipe's final weights")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, n - 0.5)
    ax.grid(axis="y", which="major", alpha=0.35)
    ratio = before / after
    ratio = ratio[np.isfinite(ratio)]
    gain = f"; median reduction ×{np.median(ratio):.2g}" if ratio.size else ""
    ax.set_title(f"Per-layer quantization error before and after ({n} layers{gain})")
    ax.set_ylabel(f"{error_label} (log scale)")
    kinds = kinds_in_order(names)
    labelled = [s for s in spans if s[0] is not None]
    step = max(1, math.ceil(len(labelled) / 32))
    shown = [(b, (start + stop - 1) / 2) for i, (b, start, stop) in enumerate(labelled) if i % step == 0]
    if n <= 48:  # every layer's type as a tick label, the block numbers written below them
        ax.set_xticks(x, labels=[layer_kind(nm) for nm in names], rotation=90, fontsize=8.5)
        for b, center in shown:
            ax.annotate(f"block {b}", (center, 0), xycoords=("data", "axes fraction"), xytext=(0, -38),
                        textcoords="offset points", ha="center", va="top", fontsize=9.5)
        ax.set_xlabel("\n\ndecoder block (layers in execution order)")
    else:
        ax.set_xticks([c for _, c in shown], labels=[str(b) for b, _ in shown])
        ax.set_xlabel(f"decoder block (shaded bands; {len(kinds)} layers per block in execution order: "
                      f"{', '.join(kinds)})")
    if not np.isfinite(before).any():
        ax.lines[0].set_label("before: not recorded by this recipe")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return _save(fig, path)


# --- 2. k and s across rows ------------------------------------------------------------------------------
def _k_tick(k: int, L: int) -> str:
    if k == L:
        return f"{k}\n(log2 only)"
    if k == 0:
        return "0\n(√2 only)"
    return f"{k}\n({k}×2, {L - k}×√2)"


@_styled
def plot_k(layers: list[dict], bits: int, method: str, row_unit: str, path: Path) -> Path | None:
    """Bar charts of the chosen k: rows per k over the model, and the share of each layer type's rows."""
    hists = [(layer_kind(r["name"]), r.get("k_hist") or {}) for r in layers]
    if not any(h for _, h in hists):
        return None
    L = 2 ** (bits - 1)
    candidates = {"log2": [L], "log_sqrt2": [0]}.get(method, list(range(L, -1, -2)))
    ks = sorted(set(candidates) | {k for _, h in hists for k in h}, reverse=True)
    kinds = list(dict.fromkeys(kind for kind, _ in hists))
    per_kind = {kind: np.zeros(len(ks)) for kind in kinds}
    for kind, h in hists:
        for k, count in h.items():
            per_kind[kind][ks.index(k)] += count
    total = sum(per_kind.values())
    fig = _figure(13.5, 5.4)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.7])
    pos = np.arange(len(ks))
    bars = left.bar(pos, total, color="C0", width=0.6)
    shares = 100 * total / max(total.sum(), 1)
    left.bar_label(bars, labels=[f"{s:.1f}%" for s in shares], padding=2, fontsize=9)
    left.set_ylim(0, total.max() * 1.12 if total.max() else 1)
    left.set_title(f"All quantized layers: {int(total.sum()):,} rows")
    left.set_ylabel(f"rows ({row_unit})")
    left.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        counts = per_kind[kind]
        right.bar(pos - 0.4 + width * (i + 0.5), 100 * counts / max(counts.sum(), 1), width=width, color=f"C{i % 10}",
                  label=f"{kind} ({int(counts.sum()):,} rows)")
    right.set_title("Per layer type: share of that type's rows")
    right.set_ylabel("share of the type's rows (%)")
    right.legend(title="layer type", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    right.set_ylim(0, 105)
    for ax in (left, right):
        ax.set_xticks(pos, labels=[_k_tick(k, L) for k in ks])
        ax.set_xlabel(f"k = base-2 levels per sign (the other L − k of L = {L} step by √2)")
        ax.grid(axis="y", alpha=0.35)
        ax.set_axisbelow(True)
    how = "searched per row (DBS)" if method == "log_dynamic" else f"fixed by the {method} codebook"
    fig.suptitle(f"Chosen base split k across rows, {bits}-bit {method}: k {how}")
    return _save(fig, path)


@_styled
def plot_s(s_by_layer: dict, row_unit: str, path: Path) -> Path | None:
    """Histogram of the chosen scale multiplier s over every row, stacked by layer type."""
    if not s_by_layer:
        return None
    kinds = kinds_in_order(s_by_layer)
    groups = {kind: np.concatenate([np.asarray(v, dtype=float).ravel() for n, v in s_by_layer.items()
                                    if layer_kind(n) == kind]) for kind in kinds}
    every = np.concatenate(list(groups.values()))
    lo, hi = float(every.min()), float(every.max())
    step = 0.01  # the SFS grid; a coarser bin when the values span more than the grid's 100 steps would show
    edges = np.arange(math.floor(lo / step) * step - step / 2, hi + step, step)
    fig = _figure(11, 5.2)
    ax = fig.add_subplot()
    ax.hist([groups[k] for k in kinds], bins=edges, stacked=True, color=[f"C{i % 10}" for i in range(len(kinds))],
            label=[f"{k} ({groups[k].size:,} rows, median {np.median(groups[k]):.2f})" for k in kinds])
    at_one = 100 * np.mean(np.isclose(every, 1.0))
    ax.set_title(f"Chosen scale multiplier s (SFS) across {every.size:,} rows: median {np.median(every):.2f}, "
                 f"{at_one:.1f}% at s = 1")
    ax.set_xlabel("s = multiplier of the row's scale (1 = the row's largest |w| sets the top level)")
    ax.set_ylabel(f"rows ({row_unit}) per 0.01 bin")
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(axis="y", alpha=0.35)
    ax.set_axisbelow(True)
    ax.set_xlim(min(lo, hi - 0.1) - step, hi + step)   # a single value still shows where it lies
    ax.legend(title="layer type", loc="upper left")
    return _save(fig, path)


# --- 3. one row with its codebook levels -----------------------------------------------------------------
def _symlog_edges(lo: float, hi: float, linthresh: float, bins: int) -> np.ndarray:
    from matplotlib.scale import SymmetricalLogTransform
    t = SymmetricalLogTransform(2, linthresh, 1.0)
    a, b = t.transform(np.array([lo, hi]))
    return t.inverted().transform(np.linspace(a, b, bins + 1))


def _row_subtitle(view: RowView) -> str:
    c = view.choices
    if "k" in c:
        L = len(view.levels) // 2
        parts = [f"k = {int(c['k'])} base-2 + {L - int(c['k'])} base-√2 levels per sign", f"s = {c['s']:.2f}",
                 f"top exponent $2^{{{c['top'] / 2:g}}}$ = {2 ** (c['top'] / 2):.3g}",
                 f"ABS shift {int(c['asym'])}"]
    elif "scale" in c:
        parts = [f"uniform step {c['scale']:.3g}", f"zero point {c['zero']:g}"]
    else:
        parts = ["per-row choices not saved (no quant_params.safetensors)"]
    return ", ".join(parts)


@_styled
def plot_row(view: RowView, path: Path) -> Path:
    used = view.counts > 0
    levels = view.levels
    data = view.fp if view.fp is not None else view.values
    nonzero = np.abs(levels[levels != 0])
    linthresh = float(nonzero.min()) if nonzero.size else 1e-3
    lo = float(min(levels.min(), data.min()))
    hi = float(max(levels.max(), data.max()))
    pad = 0.04 * (hi - lo or 1.0)
    fig = _figure(12, 9)
    axes = fig.subplots(2, 1)
    bins = int(np.clip(data.size // 6, 20, 80))
    for ax, scale in zip(axes, ("linear", "symlog")):
        if scale == "symlog":
            ax.set_xscale("symlog", base=2, linthresh=linthresh, linscale=1.0)
            edges = _symlog_edges(lo - pad, hi + pad, linthresh, bins)
        else:
            edges = np.linspace(lo - pad, hi + pad, bins + 1)
        if view.fp is not None:
            ax.hist(view.fp, bins=edges, color="C0", alpha=0.8, zorder=2, label="full-precision weights of the row")
            ax.set_ylabel("weights per bin")
        else:
            ax.vlines(levels[used], 0, view.counts[used], lw=8, color="C0", zorder=3,
                      label="quantized weights on each level")
            ax.set_ylabel("weights per level")
        z = 3 if view.fp is not None else 1   # levels over a histogram, but under the per-level bars
        ax.vlines(levels[used], 0, 1, transform=ax.get_xaxis_transform(), colors="C3", lw=1.4, alpha=0.85, zorder=z,
                  label=f"codebook level in use ({int(used.sum())})")
        if (~used).any():
            ax.vlines(levels[~used], 0, 1, transform=ax.get_xaxis_transform(), colors="0.2", lw=1.4, zorder=z,
                      linestyles=(0, (4, 3)), label=f"codebook level not used ({int((~used).sum())})")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.18)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    top, bottom = axes
    top.set_title("linear weight axis")
    top.set_xlabel("weight value (the model's own units)")
    # On the log axis every level gets its own tick (value) and, at the top, the number of weights on it.
    bottom.set_xticks(levels, labels=[f"{v:.3g}" for v in levels], rotation=55, fontsize=8.5)
    bottom.minorticks_off()
    ymax = bottom.get_ylim()[1]
    for v, c in zip(levels, view.counts):
        bottom.annotate(f"{int(c)}", (v, ymax), xytext=(0, -3), textcoords="offset points", ha="center", va="top",
                        fontsize=8, color="C3" if c else "0.3",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.9))
    bottom.set_title(f"symmetric log₂ axis (linear within ±{linthresh:.3g}): a log codebook's levels appear "
                     "evenly spaced; boxed numbers = weights on each level")
    bottom.set_xlabel("weight value (symlog, base 2; ticks at the codebook levels)")
    if view.fp is not None:
        err = view.fp_error
        source = "full-precision weights from --model" + (f" (row error ‖ŵ − w‖/‖w‖ = "
                                                           f"{err:.3f})" if err is not None else "")
    else:
        source = "quantized weights (pass --model to draw the full-precision weights instead)"
    fig.suptitle(f"{view.layer}: row {view.row} of {view.rows} ({view.where}), all {len(levels)} levels of its "
                 f"{view.bits}-bit codebook\n{_row_subtitle(view)}\n{source}")
    fig.legend(*top.get_legend_handles_labels(), loc="outside lower center", ncols=3)
    return _save(fig, path)


ACT_KINDS = ("post-softmax", "post-gelu", "post-layernorm", "matmul", "attention-output")


@_styled
def plot_activations(records: dict, path: Path, per_kind: int = 2) -> Path | None:
    """Activation histograms with the chosen quantizer's levels drawn over them: for each kind of site, its
    first and last site of the run (records from calib/activations.py with a `histogram`)."""
    chosen = []
    for kind in ACT_KINDS:
        names = [n for n, r in records.items() if r.get("site_kind") == kind and "histogram" in r]
        chosen += [(n, records[n]) for n in dict.fromkeys([*names[:1], *names[-1:]][:per_kind])]
    if not chosen:
        return None
    cols = 2
    rows = math.ceil(len(chosen) / cols)
    fig = _figure(11, 2.6 * rows)
    for i, (name, rec) in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        h = rec["histogram"]
        edges, counts = np.array(h["edges"]), np.array(h["counts"], dtype=float)
        shift = h.get("shift", 0.0)
        axis = edges + shift if h["log_axis"] else edges
        ax.stairs(counts, axis, fill=True, color="#9ecae1", label="calibration values")
        levels = np.array(h["levels"]) + (shift if h["log_axis"] else 0.0)
        for v in levels[(levels >= axis[0]) & (levels <= axis[-1])] if h["log_axis"] else levels:
            ax.axvline(v, color="#d62728", lw=0.8, alpha=0.8)
        if h["log_axis"]:
            ax.set_xscale("log")
        ax.set_yscale("log")
        what = rec["kind"] + (f", base 2^({rec['q']}/{rec['r']})" if rec["kind"] == "adalog" else "")
        shifted = f" (x + {shift:g})" if h["log_axis"] and shift else ""
        ax.set_title(f"{name}: {rec['site_kind']}{shifted}\n{what}, {rec['bits']} bits", fontsize=9.5)
        ax.set_ylabel("count")
    fig.suptitle("activations and the quantizer levels (red lines)")
    return _save(fig, path)
