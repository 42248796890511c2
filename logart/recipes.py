"""Named quantization recipes: configuration as frozen data, printed into every result row.

A recipe = a codebook (what values exist) + a parameter search (which codebook per row) + a rounding
(which value per weight) + calibration settings. The LogART ablation components map onto it:

    DBS  search over the base split k        (`dbs=True`, method `log_dynamic`; off = `log2`)
    SFS  search over the scale multiplier s  (`sfs=True`)
    ABS  asymmetric extension                (`codebook.symmetric=False`)
    LLR  learned rounding of the exponent    (`rounding="llr"`)

Per-module control (issue #3). Module names are full names (`model.layers.3.mlp.down_proj`, `lm_head`):

    ignore     regexes of modules kept in full precision; ignore beats every override
    overrides  an ordered list of `Override(pattern, bits, group_size, method, recipe)`: the FIRST rule whose
               regex `re.search`es the name applies (like a firewall rule list), later rules are not consulted.
               `recipe` names a preset whose search/rounding/codebook replace the global ones for that module;
               bits / group_size / method then apply on top. Calibration settings stay global.
    quantize_lm_head, quantize_embeddings
               opt the output head (quantized last, with the Hessian of its real inputs) and the input token
               embeddings (data-free, before calibration) in; both are off by default.

`Recipe.for_module(name)` is the one resolver: the effective recipe of a module, or None when it is ignored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from logart.quant import QuantSpec, make_codebook
from logart.errors import LogartError

ROUNDINGS = ("rtn", "gptq", "llr", "gptq+llr")
RECONSTRUCTIONS = ("none", "block")
SEARCHES = ("fast", "exhaustive")
OVERRIDE_KEYS = ("bits", "group_size", "method", "recipe")


@dataclass(frozen=True)
class Override:
    """One per-module rule: modules whose full name matches `pattern` (re.search) use these settings.
    None keeps the global value."""

    pattern: str
    bits: int | None = None
    group_size: int | None = None
    method: str | None = None
    recipe: str | None = None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise LogartError(f"--override pattern {self.pattern!r} is not a valid regular expression ({e}).",
                              "escape special characters, e.g. 'layers\\.0\\.mlp'.") from e
        if self.recipe is not None and self.recipe not in PRESETS:
            raise LogartError(f"override {self.pattern!r} names an unknown recipe {self.recipe!r}.",
                              f"use one of {', '.join(PRESETS)}.")

    @classmethod
    def parse(cls, text: str) -> "Override":
        """`REGEX:key=value,key=value` (keys: bits, group_size, method, recipe), e.g.
        `mlp\\.down_proj:bits=8` or `layers\\.0\\.:recipe=gptq,group_size=128`. The options follow the LAST
        colon, so the regex itself may contain colons."""
        pattern, sep, options = text.rpartition(":")
        if not sep or not pattern or not options:
            raise LogartError(f"override {text!r} is not of the form REGEX:key=value[,key=value].",
                              "e.g. --override 'mlp\\.down_proj:bits=8,group_size=128'.")
        fields = {}
        for item in options.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            key = key.replace("-", "_")
            if not eq or key not in OVERRIDE_KEYS:
                raise LogartError(f"override {text!r}: {item!r} is not key=value with a key among "
                                  f"{', '.join(OVERRIDE_KEYS)}.", "e.g. --override 'lm_head:bits=8'.")
            if key in ("bits", "group_size"):
                try:
                    value = int(value)
                except ValueError:
                    raise LogartError(f"override {text!r}: {key} must be an integer, not {value!r}.",
                                      f"e.g. {key}=4.") from None
            fields[key] = value
        return cls(pattern, **fields)


class Rounding(StrEnum):
    """How every weight's code is chosen once the codebook parameters are fixed (rounding/)."""

    RTN = "rtn"
    GPTQ = "gptq"
    LLR = "llr"
    GPTQ_LLR = "gptq+llr"

    @property
    def uses_gptq(self) -> bool:
        return self in (Rounding.GPTQ, Rounding.GPTQ_LLR)

    @property
    def learns(self) -> bool:
        """Learned rounding (LLR), alone or refining GPTQ."""
        return self in (Rounding.LLR, Rounding.GPTQ_LLR)


def _choice(value, allowed, what: str, fix: str):
    if value not in allowed:
        raise LogartError(f"unknown {what} {value!r}.", fix or f"use one of {', '.join(map(str, allowed))}.")
    return value


SCORES = ("hessian", "weight", "output")


@dataclass(frozen=True)
class SearchConfig:
    """Which codebook parameters each row gets (search/)."""

    dbs: bool = True                 # search k per row (log_dynamic only)
    sfs: bool = True                 # search the scale multiplier s per row
    strategy: str = "fast"           # "fast" (pruned, see search/) or "exhaustive" (the original's full grid)
    score: str = "hessian"           # "hessian" (Δw H Δwᵀ), "weight" (data-free weight SSE) or "output" (vision
                                     # models: the layer's output error after its activation, the original CNN's
                                     # layer_wise search; search/scores.py LayerOutputScore)
    abs_per_row: bool = False        # strict ABS: each row keeps the asymmetric or the symmetric table, by score

    def __post_init__(self):
        _choice(self.strategy, SEARCHES, "search", "")
        _choice(self.score, SCORES, "search score", f"use one of {', '.join(SCORES)}.")


@dataclass(frozen=True)
class RoundingConfig:
    method: Rounding = Rounding.RTN
    act_order: bool = False          # GPTQ column order by decreasing diag(H)
    llr_iters: int = 500             # the original's default; the `logart` preset uses 200 (see PRESETS)
    llr_lr: float = 0.05
    llr_lambda: float = 1.0
    llr_lambda_qkv: float = 1.5
    attention_aware: bool = False    # LLR of q/k projections weighs errors by their effect on attention scores

    def __post_init__(self):
        object.__setattr__(self, "method", Rounding(_choice(str(self.method), ROUNDINGS, "rounding", "")))
        if not isinstance(self.llr_iters, int) or self.llr_iters < 0 or not self.llr_lr > 0:
            raise LogartError(f"learned rounding needs llr_iters >= 0 and a positive llr_lr, got {self.llr_iters} "
                              f"and {self.llr_lr}.", "pass e.g. --llr-iters 200 (0 keeps the starting rounding).")


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration data and the statistics taken from it (run-wide: an override never changes it)."""

    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0
    damp: float = 0.01               # H += damp * mean(diag H) * I
    fp_target: float = 0.0           # α > 0: layers move toward the full-precision model's outputs (calib/hessian.py)
    bias_correction: bool = False    # each block's biases absorb their outputs' mean shift (calib/bias.py)

    def __post_init__(self):
        if not 0.0 <= self.fp_target <= 1.0:
            raise LogartError(f"the full-precision target strength must lie in [0, 1], got {self.fp_target}.",
                              "use e.g. --fp-target 0.25 (0 turns it off).")
        if self.nsamples < 1 or self.seqlen < 2:
            raise LogartError(f"calibration needs at least one window of two tokens (got {self.nsamples} x {self.seqlen}).",
                              "use e.g. --nsamples 32 --seqlen 2048.")


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block reconstruction after layer-wise rounding (calib/reconstruct.py; run-wide)."""

    kind: str = "none"               # "block": learn the rounding of each block's weights together
    iters: int = 200
    loss: str = "mse"                # "mse" (BRECQ), "nlc" (negative log cosine, LRQuant) or "hessian"
                                     # (the perturbation-Hessian-weighted MSE of the original ViT pipeline)
    qdrop: float = 0.0               # QDrop: probability that a reconstruction input element is full precision
    forward: str = "hard"            # "hard": straight-through on the hard choices; "soft": BRECQ's relaxation
    batch: int = 1                   # samples per step (the original CNN pipeline: 32)
    lr: float = 0.05
    lr_min_ratio: float = 0.0        # cosine down to this fraction of lr (the original CNN pipeline: 0.3)
    reg_weight: float = 0.01         # λ of the rounding regulariser (BRECQ 0.01; the original CNN pipeline: 1)
    reduce: str = "sample"           # "sample": the loss sums a sample's output elements; "position": it sums the
                                     # channels and averages the positions (BRECQ's and the original CNN pipeline's)

    def __post_init__(self):
        _choice(self.kind, RECONSTRUCTIONS, "reconstruction", "")
        _choice(self.reduce, ("sample", "position"), "reconstruction loss reduction", "use sample or position.")
        _choice(self.forward, ("hard", "soft"), "reconstruction forward", "use hard or soft.")
        _choice(self.loss, ("mse", "nlc", "hessian"), "reconstruction loss", "use mse, nlc or hessian.")
        if self.iters < 1 or not 0.0 <= self.qdrop <= 1.0 or self.batch < 1 or not self.lr > 0:
            raise LogartError(f"invalid block reconstruction settings ({self.iters} iterations, QDrop {self.qdrop}).",
                              "use iterations >= 1 and QDrop in [0, 1].")


@dataclass(frozen=True)
class ActivationsConfig:
    """Activation quantization of every weight site's input (calib/activations.py; run-wide). bits None: off."""

    bits: int | None = None
    method: str = "mse"              # step search of CNN sites: "mse" or "percentile"
    learn: bool = True               # train the steps with the rounding during block reconstruction (LSQ)
    softmax: str = "adalog"          # transformer post-softmax sites: adalog, log2, logsqrt2 or uniform
    gelu: str = "adalog"             # transformer post-GELU sites (shifted by c, fc2's bias reparameterized)
    softmax_bits: int | None = None  # post-softmax bits (None: `bits`)
    search: str = "fpcs"             # two-parameter search of transformer sites: fpcs, brute or alternating
    reparam: bool = False            # RepQ-style per-channel -> per-tensor reparameterization of post-LN inputs

    def __post_init__(self):
        if self.bits is None:
            return
        from logart.calib.activations import METHODS
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise LogartError(f"activation bits must be an integer in 2..16, got {self.bits!r}.",
                              "pass e.g. --act-bits 4 or 8.")
        if self.method not in METHODS:
            raise LogartError(f"unknown activation step search {self.method!r}.", f"use one of {', '.join(METHODS)}.")
        from logart.calib.activations import LOG_KINDS
        from logart.search.two_param import STRATEGIES
        for name, value, allowed in (("post-softmax quantizer", self.softmax, LOG_KINDS),
                                     ("post-GELU quantizer", self.gelu, LOG_KINDS),
                                     ("activation search", self.search, STRATEGIES)):
            if value not in allowed:
                raise LogartError(f"unknown {name} {value!r}.", f"use one of {', '.join(allowed)}.")
        if self.softmax_bits is not None and (not isinstance(self.softmax_bits, int)
                                              or not 2 <= self.softmax_bits <= 16):
            raise LogartError(f"post-softmax bits must be an integer in 2..16, got {self.softmax_bits!r}.",
                              "pass e.g. --act-softmax-bits 3.")


@dataclass(frozen=True)
class LMOptions:
    """Family options of causal LMs: the ends, off by default."""

    quantize_lm_head: bool = False
    quantize_embeddings: bool = False


PIECES = {"search": SearchConfig, "rounding": RoundingConfig, "calibration": CalibrationConfig,
          "reconstruction": ReconstructionConfig, "activations": ActivationsConfig, "lm": LMOptions}
# The flat option names of the CLI and of make_recipe(**options): (piece, field).
FLAT = {"dbs": ("search", "dbs"), "sfs": ("search", "sfs"), "search": ("search", "strategy"),
        "score": ("search", "score"), "abs_per_row": ("search", "abs_per_row"),
        "rounding": ("rounding", "method"), **{k: ("rounding", k) for k in (
            "act_order", "llr_iters", "llr_lr", "llr_lambda", "llr_lambda_qkv", "attention_aware")},
        **{k: ("calibration", k) for k in ("nsamples", "seqlen", "seed", "damp", "fp_target", "bias_correction")},
        "reconstruct": ("reconstruction", "kind"), "recon_iters": ("reconstruction", "iters"),
        "recon_loss": ("reconstruction", "loss"), "qdrop": ("reconstruction", "qdrop"),
        "recon_forward": ("reconstruction", "forward"), "recon_batch": ("reconstruction", "batch"),
        "recon_lr": ("reconstruction", "lr"), "recon_lr_min_ratio": ("reconstruction", "lr_min_ratio"),
        "recon_reg": ("reconstruction", "reg_weight"), "recon_reduce": ("reconstruction", "reduce"),
        "act_bits": ("activations", "bits"), "act_method": ("activations", "method"), "act_learn": ("activations", "learn"),
        "act_softmax": ("activations", "softmax"), "act_gelu": ("activations", "gelu"),
        "act_softmax_bits": ("activations", "softmax_bits"), "act_search": ("activations", "search"),
        "act_reparam": ("activations", "reparam"),
        "quantize_lm_head": ("lm", "quantize_lm_head"), "quantize_embeddings": ("lm", "quantize_embeddings")}


@dataclass(frozen=True)
class Recipe:
    """A codebook + small frozen pieces (search, rounding, calibration, reconstruction, LM options) + the
    per-module rules. Printed whole (nested) into every result row and checkpoint config."""

    name: str
    codebook: QuantSpec
    search: SearchConfig = SearchConfig()
    rounding: RoundingConfig = RoundingConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    reconstruction: ReconstructionConfig = ReconstructionConfig()
    activations: ActivationsConfig = ActivationsConfig()
    lm: LMOptions = LMOptions()
    ignore: tuple[str, ...] = field(default_factory=tuple)   # regexes of modules kept in full precision
    overrides: tuple[Override, ...] = field(default_factory=tuple)   # ordered: the first match wins

    def __post_init__(self):
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as e:
                raise LogartError(f"--ignore pattern {pattern!r} is not a valid regular expression ({e}).",
                                  "escape special characters, e.g. 'layers\\.0\\.mlp'.") from e
        # Python callers may write rules as "REGEX:key=value" strings or dicts, like the CLI and config.json do.
        rules = tuple(Override.parse(r) if isinstance(r, str) else Override(**r) if isinstance(r, dict) else r
                      for r in self.overrides)
        object.__setattr__(self, "overrides", rules)
        make_codebook(self.codebook)  # bits the method cannot represent fail here, before the model loads
        applied = []
        for rule in self.overrides:  # every rule must yield a valid recipe now, not after hours of quantization
            try:
                applied.append(self._apply(rule))
            except LogartError as e:
                raise LogartError(f"override {rule.pattern!r}: {e.problem}", e.fix) from None
        if self.search.score == "output" and self.calibration.fp_target:
            raise LogartError(f"recipe {self.name!r} has both the layer-output search score and full-precision "
                              "targets; the layer-output score already measures against the full-precision network.",
                              "drop --fp-target (or pass --fp-target 0), or use --score hessian.")
        if self.rounding.attention_aware and not any(r.rounding.method.learns for r in (self, *applied)):
            raise LogartError(f"attention-aware rounding weighs learned rounding, but recipe {self.name!r} rounds "
                              f"with {self.rounding.method!r}.", "use --recipe logart (or --rounding gptq+llr / llr).")

    def with_options(self, **options) -> "Recipe":
        """This recipe with flat options changed (the names of `FLAT`, e.g. `rounding="gptq"`, `llr_iters=100`,
        or whole pieces, e.g. `search=SearchConfig(...)`, or `ignore` / `overrides`)."""
        unknown = set(options) - set(FLAT) - set(PIECES) - {"ignore", "overrides"}
        if unknown:
            raise LogartError(f"unknown recipe option(s): {', '.join(sorted(unknown))}.",
                              f"valid options: {', '.join(sorted({*FLAT, *PIECES, 'ignore', 'overrides'}))}.")
        top = {k: v for k, v in options.items() if k not in FLAT}
        by_piece: dict[str, dict] = {}
        for k, v in options.items():
            if k in FLAT:
                piece, fld = FLAT[k]
                by_piece.setdefault(piece, {})[fld] = v
        for piece, fields in by_piece.items():
            top[piece] = replace(top.get(piece, getattr(self, piece)), **fields)
        return replace(self, **top)

    def _apply(self, rule: Override) -> "Recipe":
        """This recipe with `rule` applied (the run-wide pieces, calibration and reconstruction, stay this
        recipe's)."""
        base = self
        if rule.recipe is not None:
            spec = self.codebook
            base = replace(make_recipe(rule.recipe, bits=spec.bits, group_size=spec.group_size, mode=spec.mode),
                           calibration=self.calibration, reconstruction=self.reconstruction,
                           activations=self.activations)
        method = rule.method or base.codebook.method
        codebook = replace(base.codebook, method=method,
                           bits=base.codebook.bits if rule.bits is None else rule.bits,
                           group_size=base.codebook.group_size if rule.group_size is None else rule.group_size,
                           # the 1 + 1/2 approximation only exists for log codebooks
                           hardware_approx=base.codebook.hardware_approx and method != "uniform")
        # a rule's own preset inherits the run's attention-aware switch where it learns rounding
        rounding = replace(base.rounding, attention_aware=self.rounding.attention_aware and base.rounding.method.learns)
        return replace(base, codebook=codebook, rounding=rounding, ignore=(), overrides=(), lm=LMOptions())

    def for_module(self, name: str) -> "Recipe | None":
        """The effective recipe of the module with full name `name`: None when `ignore` matches (ignore beats
        every override), else this recipe with the first matching override applied (first match wins)."""
        if any(re.search(p, name) for p in self.ignore):
            return None
        rule = next((r for r in self.overrides if re.search(r.pattern, name)), None)
        return self if rule is None else self._apply(rule)

    @property
    def searches(self) -> bool:
        """More than one (k, s) candidate per row."""
        return self.search.sfs or (self.search.dbs and self.codebook.method in ("log_dynamic", "log_or_uniform"))

    @property
    def quantizes_with_data(self) -> bool:
        """The weights' quantization reads calibration statistics: to score a search, to round or to reconstruct
        (by this recipe or by any override); a single candidate with RTN is data-free."""
        own = (self.search.score != "weight" and self.searches) or self.rounding.method != Rounding.RTN \
            or self.reconstruction.kind != "none" or self.activations.bits is not None
        return own or any(self._apply(r).quantizes_with_data for r in self.overrides)

    @property
    def needs_calibration(self) -> bool:
        """The run needs calibration data: for the quantization itself, or afterwards for bias correction."""
        return self.quantizes_with_data or self.calibration.bias_correction

    def to_dict(self) -> dict:
        d = asdict(self)
        d["codebook"] = self.codebook.to_dict()
        d["rounding"]["method"] = str(self.rounding.method)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """The inverse of `to_dict`; also reads the flat layout that logart wrote before the pieces existed."""
        d = dict(d)
        codebook = QuantSpec(**d.pop("codebook"))
        top = {k: d.pop(k) for k in ("name", "ignore", "overrides") if k in d}
        top["ignore"] = tuple(top.get("ignore", ()))
        top["overrides"] = tuple(top.get("overrides", ()))
        pieces = {k: PIECES[k](**d.pop(k)) for k in list(d) if k in PIECES and isinstance(d[k], dict)}
        flat = {k: v for k, v in d.items() if k in FLAT}
        return cls(codebook=codebook, **top, **pieces).with_options(**flat)


def _log(bits, group_size, mode, **kw):
    return QuantSpec(method=kw.pop("method", "log_dynamic"), bits=bits, group_size=group_size, mode=mode,
                     symmetric=kw.pop("symmetric", False), hardware_approx=kw.pop("hardware_approx", False))


# Settings shared by the whole run, which an override's preset does not replace.
_DATA_FREE = SearchConfig(dbs=False, sfs=False, score="weight")

PRESETS = {
    # The paper's full recipe: DBS + SFS + ABS + LLR, with the original's optional GPTQ initialisation
    # (`--optq_init --act_order`), which LLR refines from the GPTQ codes; 200 LLR iterations instead of 500
    # because the gain saturates early. Beyond the paper, every layer also moves a quarter of the way toward the
    # full-precision model's output (`fp_target`, calib/hessian.py). Measurements: docs/RESULTS.md.
    "logart": lambda b, g, m: Recipe("logart", _log(b, g, m),
                                     rounding=RoundingConfig(Rounding.GPTQ_LLR, act_order=True, llr_iters=200),
                                     calibration=CalibrationConfig(fp_target=0.25)),
    # Everything but learned rounding: minutes rather than tens of minutes.
    "logart-fast": lambda b, g, m: Recipe("logart-fast", _log(b, g, m)),
    # The paper's baseline: symmetric log2, round to nearest, no search, no data.
    "log2-rtn": lambda b, g, m: Recipe("log2-rtn", _log(b, g, m, method="log2", symmetric=True), _DATA_FREE),
    # Uniform integer baselines (asymmetric, min/max range).
    "rtn": lambda b, g, m: Recipe("rtn", QuantSpec("uniform", b, g), _DATA_FREE),
    "gptq": lambda b, g, m: Recipe("gptq", QuantSpec("uniform", b, g), SearchConfig(dbs=False, sfs=False),
                                   RoundingConfig(Rounding.GPTQ)),
    # Uniform learned-rounding baselines through the same engine: AdaRound (layer by layer) and BRECQ (block
    # reconstruction of every block's weights together).
    "adaround": lambda b, g, m: Recipe("adaround", QuantSpec("uniform", b, g), SearchConfig(dbs=False, sfs=False),
                                       RoundingConfig(Rounding.LLR)),
    "brecq": lambda b, g, m: Recipe("brecq", QuantSpec("uniform", b, g), SearchConfig(dbs=False, sfs=False),
                                    reconstruction=ReconstructionConfig(kind="block")),
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
    return recipe.with_options(**overrides)
