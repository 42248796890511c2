"""The joint DBS x SFS search: per row, the (k, s) of least score. Spec: logart-reference.md §3.1, §4.5.

    k_values, s_values = default_k_values(cb), default_s_values(cb)
    res = search(cb, cb.rows(W), HessianScore(H))          # strategy="fast" by default
    W_hat = cb.fake_quant(W, res.params)
    print(res.line())                                      # loss before / after, chosen k and s

Grid and order (the LLM original): outer k descending (L -> 0), inner s descending (1.00, 0.99, ..., 0.01);
the best score starts at +inf and only a strictly smaller score replaces it, so ties keep the first
candidate in that order. A row whose every score is +inf or NaN keeps the first candidate.

Uniform codebooks have no k; their grid is the clip ratio alone, 1.00, 0.99, ..., 0.21 by default: the 80
shrink steps of GPTQ's MSE clip search (`grid=100, maxshrink=0.8`), scored by our score instead of |dW|^2.4.

Strategies:
* `exhaustive`: every candidate scored exactly (fake-quant, then the score's matmul). The reference
  behaviour; |K| x |S| exact evaluations (500 at 4-bit), each a [R, C] x [C, C] matmul.
* `fast` (alias `fpcs`), the default: (1) the score's proxy (diagonal of H plus its top eigen-directions,
  scores.py) is evaluated for many candidates from sorted prefix sums, without forming dW (proxy.py);
  (2) FPCS picks the candidates (coarse_to_fine.py): every k at every 4th s, the 3 best k per row kept, then
  every s inside the row's 30 best coarse cells of those k (215 of 500 candidates at 4-bit, 165 of 300 at
  3-bit); (3) the `exact_top` (6) best by proxy and the baseline candidate are scored exactly and the best
  is kept. So it is never worse than the baseline (k = L, s = 1) when that is in the grid, and it
  equals `exhaustive` whenever the exact argmin is among the exact-scored candidates.
  Measured on SmolLM2-135M layers (bench/search_speed.py): total Hessian loss 0.1-0.2% above exhaustive
  (worst layer 0.9%), 15-25x faster.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from logart.errors import LogartError
from logart.quant import Codebook
from logart.search.coarse_to_fine import fpcs
from logart.search.proxy import SortedRows
from logart.search.scores import Proxy, WeightSSE

STRATEGIES = ("exhaustive", "fast", "fpcs")
# Candidates x rows x cols scored exactly at once by the exhaustive sweep (float32 elements).
EXACT_CHUNK_ELEMS = 1 << 22
# Rows x cols x features of sorted prefix sums held at once by the fast strategy (float32 elements, 256 MB).
FAST_CHUNK_ELEMS = 1 << 26


def default_k_values(cb, dbs: bool = True) -> list[int] | None:
    """K_n in the original order when DBS is on; otherwise the method's single split (L for log2 and
    log_dynamic, i.e. pure base 2; 0 for log_sqrt2). None for codebooks without a base split (uniform)."""
    ks = cb.k_candidates()
    return None if ks is None else ks if dbs else ks[:1]


def default_s_values(cb, sfs: bool = True) -> torch.Tensor:
    """The codebook's own s axis (`Codebook.s_candidates`: {1.00, ..., 0.01} for log codebooks, {1.00, ..., 0.21}
    for uniform ones); {1.0} when SFS is off."""
    return cb.s_candidates() if sfs else torch.ones(1)


@dataclass(frozen=True)
class FastConfig:
    """The fast strategy's knobs (see coarse_to_fine.fpcs). stride: coarse s step; keep_k: base splits kept per
    row after the coarse level; cells: coarse cells of the kept k searched at every s (0: all); beam / expand:
    beam > 0 replaces the cells by AdaLog's progressive expansion; rank: eigen-directions of H in the proxy;
    exact_top: candidates per row scored exactly after the proxy search (at most 2 when the proxy is exact,
    as for WeightSSE). `FastConfig(stride=1)` puts every candidate through the proxy."""

    stride: int = 4
    keep_k: int = 3
    cells: int = 30
    beam: int = 0
    expand: int = 4
    rank: int = 8
    exact_top: int = 6


@dataclass(frozen=True)
class Grid:
    """The candidates: flat index i = ki * len(s_values) + si, in the original search order."""

    k_values: tuple            # (None,) for codebooks without k
    s_values: torch.Tensor     # float32 [ns]

    @staticmethod
    def make(cb, k_values=None, s_values=None, device=None) -> "Grid":
        ks = default_k_values(cb) if k_values is None else list(k_values)
        if ks is None:
            ks = [None]
        s = default_s_values(cb) if s_values is None else torch.as_tensor(s_values, dtype=torch.float32).reshape(-1)
        if not ks or s.numel() == 0:
            raise LogartError("the search grid is empty.", "pass at least one k and one s value (or None for the defaults).")
        return Grid(tuple(ks), s.to(device))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.k_values), self.s_values.numel()

    def index(self, k, s: float) -> int | None:
        """Flat index of candidate (k, s), or None if it is not in the grid."""
        hit = (self.s_values == s).nonzero()
        if k not in self.k_values or hit.numel() == 0:
            return None
        return self.k_values.index(k) * self.shape[1] + int(hit[0])

    def fit(self, cb, ext: torch.Tensor, flat: torch.Tensor):
        """Parameters for candidates `flat` (int64 [n, R]) of every row: n * R rows, candidate-major.
        `ext` [R, 2] holds each row's (min, max): codebook parameters depend on the row only through them."""
        return self.fit_flat(cb, ext.repeat(flat.shape[0], 1), flat.reshape(-1))

    def fit_flat(self, cb, ext: torch.Tensor, flat: torch.Tensor):
        """Parameters for candidate flat[i] of the row with extremes ext[i] (ext [N, 2], flat [N])."""
        s = self.s_values[flat % self.shape[1]]
        if self.k_values[0] is None:
            return cb.fit_rows(ext, s=s)
        k = torch.tensor(self.k_values, dtype=torch.int64, device=ext.device)[flat // self.shape[1]]
        return cb.fit_rows(ext, k=k, s=s)

    def tables(self, cb, ext: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row tables of candidates `flat` (int64 [R, n], row-major): levels [R, n, M], bounds [R, n, M-1].

        For scale-equivariant codebooks (see `scale_equivariant`) the tables are built once per distinct
        (row, k, asym) at s = 1 and multiplied by s: a row's 100 scales share about 8 distinct asym values, so
        this is 5x cheaper than building every candidate's table."""
        R, n = flat.shape
        p = self.fit_flat(cb, ext.repeat_interleave(n, 0), flat.reshape(-1))
        if not scale_equivariant(cb):
            levels, bounds = cb.tables(p)
        else:
            row = torch.arange(R, device=ext.device).repeat_interleave(n)
            key = (row * 64 + p.k) * 1024 + p.asym + 512                 # k < 64, |asym| <= 2^n <= 16
            uniq, inv = torch.unique(key, return_inverse=True)
            rep = torch.empty_like(uniq).scatter_(0, inv, torch.arange(key.numel(), device=key.device))
            unit = p.select(rep)
            unit = replace(unit, s=torch.ones_like(unit.s))
            l1, b1 = cb.tables(unit)
            levels, bounds = l1[inv] * p.s[:, None], b1[inv] * p.s[:, None]
        return levels.view(R, n, -1), bounds.view(R, n, -1)


def scale_equivariant(cb) -> bool:
    """Whether the codebook's tables scale with s: tables(k, s, top, asym) = s * tables(k, 1, top, asym).
    True for strict log codebooks (levels s * 2^(e/2), bounds at their geometric or linear midpoints; up to
    one rounding of the bounds). Not for reference mode, whose base switch compares the unscaled |w| (Q7)."""
    spec = getattr(cb, "spec", None)
    return spec is not None and spec.is_log and spec.mode == "strict"


@dataclass
class SearchResult:
    """Per-row choice. params: the codebook's parameters [R]; score / baseline_score: exact scores [R] of the
    choice and of the baseline candidate (k = first of K_n, s = 1); k, s: the choice [R] (k None for
    uniform); index: its flat grid index [R] (k index * len(s_values) + s index); exact_evals / proxy_evals:
    candidates scored per row, exactly and by proxy."""

    params: object
    score: torch.Tensor
    baseline_score: torch.Tensor
    k: torch.Tensor | None
    s: torch.Tensor
    index: torch.Tensor
    strategy: str
    exact_evals: int
    proxy_evals: int = 0
    k_hist: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return float(self.score.double().sum())

    @property
    def baseline_loss(self) -> float:
        return float(self.baseline_score.double().sum())

    def line(self) -> str:
        """One log line: loss before (baseline) and after the search, the k histogram and the mean s."""
        before, after = self.baseline_loss, self.loss
        gain = f" ({100 * (after - before) / before:+.1f}%)" if before > 0 and math.isfinite(before) else ""
        ks = f", k {dict(sorted(self.k_hist.items(), reverse=True))}" if self.k_hist else ""
        return f"loss {before:.4g} -> {after:.4g}{gain}{ks}, mean s {float(self.s.mean()):.3f} [{self.strategy}]"


def row_extremes(rows: torch.Tensor) -> torch.Tensor:
    """[R, 2]: each row's (min, max), the only statistics codebook parameters are fitted from."""
    return torch.stack([rows.amin(1), rows.amax(1)], 1)


def exact_scores(cb, rows: torch.Tensor, score, grid: Grid, ext: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Exact scores [n, R] of candidates `flat` [n, R]; NaN counts as +inf."""
    n = flat.shape[0]
    R, C = rows.shape
    big = rows.repeat(n, 1)
    dw = cb.fake_quant_rows(big, grid.fit(cb, ext, flat)) - big
    return score(dw.view(n, R, C)).nan_to_num(nan=math.inf)


def exhaustive(cb, rows: torch.Tensor, score, grid: Grid, ext: torch.Tensor | None = None):
    """(flat index [R], exact score [R]) of every row's best candidate over the whole grid."""
    R, C = rows.shape
    ext = row_extremes(rows) if ext is None else ext
    total = grid.shape[0] * grid.shape[1]
    step = max(1, EXACT_CHUNK_ELEMS // (R * C))
    best = torch.full((R,), math.inf, device=rows.device)
    arg = torch.zeros(R, dtype=torch.int64, device=rows.device)
    for i0 in range(0, total, step):
        flat = torch.arange(i0, min(total, i0 + step), device=rows.device)[:, None].expand(-1, R)
        sc = exact_scores(cb, rows, score, grid, ext, flat)
        j = sc.argmin(0)                                   # first minimum within the chunk
        v = sc.gather(0, j[None]).squeeze(0)
        better = v < best                                  # strict: earlier chunks win ties
        arg = torch.where(better, i0 + j, arg)
        best = torch.where(better, v, best)
    return arg, best


def fast(cb, rows: torch.Tensor, score, grid: Grid, ext: torch.Tensor | None = None, config: FastConfig = FastConfig(),
         baseline: int | None = None):
    """(flat index [R], exact score [R], exact scores of `baseline` [R] or None, proxy evaluations per row,
    exact evaluations per row): FPCS on the proxy, then exact scoring of the best few. Rows are independent,
    so they are processed in chunks that bound the memory (about FAST_CHUNK_ELEMS floats of sorted features)."""
    R, C = rows.shape
    ext = row_extremes(rows) if ext is None else ext
    # A score without a proxy is pre-screened by weight SSE (not exact for it, so exact_top still applies).
    proxy = score.proxy(C, config.rank) if hasattr(score, "proxy") else Proxy(torch.ones(1, C, device=rows.device))
    G = proxy.diag.shape[0]                                # chunks must hold whole output channels
    step = max(G, FAST_CHUNK_ELEMS // (C * (3 + config.rank)) // G * G)
    if getattr(score, "whole_layer", False):              # a forward of the layer scores all its rows at once
        step = R
    parts = [_fast_rows(cb, rows[i:i + step], score, grid, ext[i:i + step], config, baseline, proxy)
             for i in range(0, R, step)]
    arg, best, base = (torch.cat([p[i] for p in parts]) for i in range(3))
    return arg, best, (base if baseline is not None else None), parts[0][3], parts[0][4]


def _fast_rows(cb, rows, score, grid, ext, config, baseline, proxy):
    R = rows.shape[0]
    sorted_rows = SortedRows(rows, proxy)
    ns = grid.shape[1]

    def evaluate(ki, si):                                  # [R, n] grid indices -> proxy [R, n]
        return sorted_rows(*grid.tables(cb, ext, ki * ns + si))

    table = fpcs(evaluate, R, grid.shape, config.stride, config.keep_k, config.cells, config.beam, config.expand,
                 rows.device).view(R, -1)
    proxy_evals = int(torch.isfinite(table[0]).sum())
    m = min(min(2, config.exact_top) if proxy.exact else config.exact_top, table.shape[1])
    cand = table.topk(m, dim=1, largest=False).indices
    if baseline is not None:
        cand = torch.cat([cand, torch.full((R, 1), baseline, device=rows.device)], 1)
    cand = cand.sort(1).values                             # original order, so argmin's first-wins is the tie-break
    n = cand.shape[1]
    if type(cb).fake_quant_rows is Codebook.fake_quant_rows:  # the table path: reuse the sorted rows
        levels, bounds = cb.tables(grid.fit_flat(cb, ext.repeat_interleave(n, 0), cand.reshape(-1)))
        q = sorted_rows.fake_quant(levels.view(R, n, -1), bounds.view(R, n, -1))
        sc = score((q - rows[:, None]).transpose(0, 1)).nan_to_num(nan=math.inf)      # [n, R]
    else:
        sc = exact_scores(cb, rows, score, grid, ext, cand.T)
    j = sc.argmin(0)
    base = sc[(cand == baseline).int().argmax(1), torch.arange(R, device=rows.device)] if baseline is not None \
        else sc[0]
    return cand.gather(1, j[:, None]).squeeze(1), sc.gather(0, j[None]).squeeze(0), base, proxy_evals, n


def search(cb, rows: torch.Tensor, score=None, k_values=None, s_values=None, strategy: str = "fast",
           config: FastConfig = FastConfig()) -> SearchResult:
    """Per row, the (k, s) of least `score` (default WeightSSE) over k_values x s_values (defaults: the full
    DBS x SFS grid of `cb`). `rows` is the codebook's rows view [R, C] of the weight (`cb.rows(W)`)."""
    if strategy not in STRATEGIES:
        raise LogartError(f"unknown search strategy {strategy!r}.", f"use one of {', '.join(STRATEGIES)}.")
    score = WeightSSE() if score is None else score
    rows = rows.to(torch.float32)
    grid = Grid.make(cb, k_values, s_values, device=rows.device)
    ext = row_extremes(rows)
    k0 = default_k_values(cb)
    k_base = None if k0 is None else k0[0]
    nk, ns = grid.shape
    if strategy == "exhaustive" or nk * ns <= config.exact_top + 1:  # small grids: exact is as cheap
        strategy = "exhaustive"
        arg, best = exhaustive(cb, rows, score, grid, ext)
        base, proxy_evals, exact_evals = None, 0, nk * ns
    else:
        arg, best, base, proxy_evals, exact_evals = fast(cb, rows, score, grid, ext, config, grid.index(k_base, 1.0))
    if base is None:  # score the baseline on its own (exhaustive, or not in the grid)
        p = cb.fit_rows(ext, s=1.0) if k_base is None else cb.fit_rows(ext, k=k_base, s=1.0)
        base = score((cb.fake_quant_rows(rows, p) - rows)[None])[0].nan_to_num(nan=math.inf)
    params = grid.fit(cb, ext, arg[None])
    k = getattr(params, "k", None)
    return SearchResult(params=params, score=best, baseline_score=base, k=k, s=grid.s_values[arg % ns], index=arg,
                        strategy=strategy, exact_evals=exact_evals,
                        proxy_evals=proxy_evals, k_hist=dict(Counter(k.tolist())) if k is not None else {})
