"""Named quantization recipes: configuration as frozen data, printed into every result row.

A recipe = a codebook (what values exist) + a parameter search (which codebook per row) + a rounding
(which value per weight) + calibration settings. The LogART ablation components map onto it:

    DBS  search over the base split k        (`dbs=True`, method `log_dynamic`; off = `log2`)
    SFS  search over the scale multiplier s  (`sfs=True`)
    ABS  asymmetric extension                (`codebook.symmetric=False`)
    LLR  learned rounding of the exponent    (`rounding="llr"`)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from logart.quant import QuantSpec
from logart.quant.errors import LogartError

ROUNDINGS = ("rtn", "gptq", "llr", "gptq+llr")
SEARCHES = ("fast", "exhaustive")


@dataclass(frozen=True)
class Recipe:
    name: str
    codebook: QuantSpec
    dbs: bool = True                 # search k per row (log_dynamic only)
    sfs: bool = True                 # search the scale multiplier s per row
    search: str = "fast"             # "fast" (pruned, see search/) or "exhaustive" (the original's full grid)
    score: str = "hessian"           # "hessian" (Δw H Δwᵀ) or "weight" (data-free weight SSE)
    rounding: str = "rtn"
    act_order: bool = False          # GPTQ column order by decreasing diag(H)
    llr_iters: int = 500             # the original's default; the `logart` preset uses 200 (see PRESETS)
    llr_lr: float = 0.05
    llr_lambda: float = 1.0
    llr_lambda_qkv: float = 1.5
    damp: float = 0.01               # H += damp * mean(diag H) * I
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0
    ignore: tuple[str, ...] = field(default_factory=tuple)   # regexes of linear layers kept in full precision

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise LogartError(f"unknown rounding {self.rounding!r}.", f"use one of {', '.join(ROUNDINGS)}.")
        if self.search not in SEARCHES:
            raise LogartError(f"unknown search {self.search!r}.", f"use one of {', '.join(SEARCHES)}.")
        if self.score not in ("hessian", "weight"):
            raise LogartError(f"unknown search score {self.score!r}.", "use 'hessian' or 'weight'.")
        if self.nsamples < 1 or self.seqlen < 2:
            raise LogartError(f"calibration needs at least one window of two tokens (got {self.nsamples} x {self.seqlen}).",
                              "use e.g. --nsamples 32 --seqlen 2048.")

    @property
    def searches(self) -> bool:
        """More than one (k, s) candidate per row."""
        return self.sfs or (self.dbs and self.codebook.method == "log_dynamic")

    @property
    def needs_calibration(self) -> bool:
        """Data is needed to score a search or to round; a single candidate with RTN is data-free."""
        return (self.score == "hessian" and self.searches) or self.rounding != "rtn"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["codebook"] = self.codebook.to_dict()
        return d


def _log(bits, group_size, mode, **kw):
    return QuantSpec(method=kw.pop("method", "log_dynamic"), bits=bits, group_size=group_size, mode=mode,
                     symmetric=kw.pop("symmetric", False), hardware_approx=kw.pop("hardware_approx", False))


PRESETS = {
    # The paper's full recipe: DBS + SFS + ABS + LLR, with the original's optional GPTQ initialisation
    # (`--optq_init --act_order`): measured on SmolLM2 layers, act-order GPTQ alone beats 500-iteration LLR on
    # the H-weighted error, and 200 iterations keep 85-95 % of LLR's 500-iteration gain at 40 % of the time.
    "logart": lambda b, g, m: Recipe("logart", _log(b, g, m), rounding="gptq+llr", act_order=True, llr_iters=200),
    # Everything but learned rounding: minutes rather than tens of minutes.
    "logart-fast": lambda b, g, m: Recipe("logart-fast", _log(b, g, m)),
    # The paper's baseline: symmetric log2, round to nearest, no search, no data.
    "log2-rtn": lambda b, g, m: Recipe("log2-rtn", _log(b, g, m, method="log2", symmetric=True), dbs=False,
                                       sfs=False, score="weight"),
    # Uniform integer baselines (asymmetric, min/max range).
    "rtn": lambda b, g, m: Recipe("rtn", QuantSpec("uniform", b, g), dbs=False, sfs=False, score="weight"),
    "gptq": lambda b, g, m: Recipe("gptq", QuantSpec("uniform", b, g), dbs=False, sfs=False, rounding="gptq"),
}


def make_recipe(name: str = "logart", bits: int = 4, group_size: int = -1, mode: str = "strict", **overrides) -> Recipe:
    """A named preset at the given bits / group size / codebook mode, with field overrides
    (e.g. `rounding="gptq"`, `llr_iters=100`, `hardware_approx=True`)."""
    if name not in PRESETS:
        raise LogartError(f"unknown recipe {name!r}.", f"use one of {', '.join(PRESETS)}.")
    recipe = PRESETS[name](bits, group_size, mode)
    cb_fields = {k: overrides.pop(k) for k in ("symmetric", "hardware_approx", "method") if k in overrides}
    if cb_fields:
        recipe = replace(recipe, codebook=replace(recipe.codebook, **cb_fields))
    unknown = set(overrides) - set(Recipe.__dataclass_fields__)
    if unknown:
        raise LogartError(f"unknown recipe option(s): {', '.join(sorted(unknown))}.",
                          f"valid options: {', '.join(sorted(Recipe.__dataclass_fields__))}.")
    return replace(recipe, **overrides)


def ablation_recipe(dbs: bool, sfs: bool, abs_: bool, llr: bool, bits: int = 3, group_size: int = -1,
                    mode: str = "strict") -> Recipe:
    """One row of the LogART README ablation table (spec §9.1). DBS off means log2; ABS off means symmetric."""
    spec = _log(bits, group_size, mode, method="log_dynamic" if dbs else "log2", symmetric=not abs_)
    tag = "".join(n for n, on in (("D", dbs), ("S", sfs), ("A", abs_), ("L", llr)) if on) or "base"
    return Recipe(f"ablation-{tag}", spec, dbs=dbs, sfs=sfs, rounding="llr" if llr else "rtn",
                  score="hessian" if (dbs or sfs) else "weight")
