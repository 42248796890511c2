"""`log_or_uniform`: every row takes LogART's mixed-base log table or a uniform grid, whichever its score prefers.

Beyond the paper. On BN-folded CNN weights a searched uniform grid fits many output channels better than any log
table, and others worse (docs/RESULTS.md, "What each codebook can represent": LogART's table fits better on 11
to 48 % of the channels). Both tables have 2^n entries, so a row of either kind is one n-bit code and packs the
same way (row scale x relative table, io/linear.py); only the rows that keep the log table keep the
multiplier-free decoding of the paper's hardware.

The parameters are both codebooks' fields side by side plus the per-row choice `uniform`; each row's table reads
only its own kind's fields. The search (calib/layer.py) searches the two codebooks on the same score and keeps,
per row, the lower score (`merge`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, replace

import torch

from logart.errors import LogartError
from logart.quant.codebook import Codebook
from logart.quant.log import LogCodebook, LogParams
from logart.quant.spec import QuantSpec
from logart.quant.uniform import UniformCodebook, UniformParams


@dataclass
class UnionParams:
    s: torch.Tensor        # the log table's fields (LogParams)
    k: torch.Tensor
    top: torch.Tensor
    asym: torch.Tensor
    scale: torch.Tensor    # the uniform grid's fields (UniformParams)
    zero: torch.Tensor
    uniform: torch.Tensor  # bool [R]: the row uses the uniform grid

    def log(self) -> LogParams:
        return LogParams(self.s, self.k, self.top, self.asym)

    def grid(self) -> UniformParams:
        return UniformParams(self.scale, self.zero)

    def to(self, device) -> "UnionParams":
        return UnionParams(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def select(self, index) -> "UnionParams":
        return UnionParams(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @property
    def num_rows(self) -> int:
        return self.s.shape[0]


def join(log: LogParams, grid: UniformParams, uniform: torch.Tensor) -> UnionParams:
    return UnionParams(log.s, log.k, log.top, log.asym, grid.scale, grid.zero, uniform.to(torch.bool))


class UnionCodebook(Codebook):
    params_type = UnionParams

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.log = LogCodebook(replace(spec, method="log_dynamic"))
        self.grid = UniformCodebook(replace(spec, method="uniform", hardware_approx=False))

    def table_size(self) -> int:
        return 2 ** self.bits

    def fit_rows(self, rows: torch.Tensor, **choice) -> UnionParams:
        """Without a search: each part's data-free fit, and per row the one of lower weight error. Searched choices
        (k, s) belong to one part each, so they are refused here rather than silently dropped."""
        if choice:
            raise LogartError(f"a log_or_uniform codebook takes no single choice ({', '.join(sorted(choice))}): its "
                              "rows mix two codebooks.", "search its parts cb.log and cb.grid on the same rows and "
                              "join them with logart.quant.union.merge (as calib/layer.py does).")
        log, grid = self.log.fit_rows(rows), self.grid.fit_rows(rows)
        err_log = (self.log.fake_quant_rows(rows, log) - rows).pow(2).sum(1)
        err_grid = (self.grid.fake_quant_rows(rows, grid) - rows).pow(2).sum(1)
        return join(log, grid, err_grid < err_log)

    def _where(self, uniform: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(uniform.reshape(-1, *([1] * (a.dim() - 1))), a, b)

    def tables(self, p: UnionParams):
        (lu, bu), (ll, bl) = self.grid.tables(p.grid()), self.log.tables(p.log())
        return self._where(p.uniform, lu, ll), self._where(p.uniform, bu, bl)

    def factored_tables(self, p: UnionParams):
        (su, ru), (sl, rl) = self.grid.factored_tables(p.grid()), self.log.factored_tables(p.log())
        return self._where(p.uniform, su, sl), self._where(p.uniform, ru, rl)

    def log_rows(self, p: UnionParams) -> torch.Tensor:
        return ~p.uniform


def merge(log_found, grid_found):
    """One SearchResult from the searches of the two parts on the same rows and score: per row the lower score
    (ties keep the log table). The baseline score and `k` stay the log search's; the k histogram counts the rows
    that keep the log table."""
    uniform = grid_found.score.nan_to_num(nan=float("inf")) < log_found.score.nan_to_num(nan=float("inf"))
    k = log_found.k[~uniform]
    return dataclasses.replace(
        log_found, params=join(log_found.params, grid_found.params, uniform),
        score=torch.where(uniform, grid_found.score, log_found.score),
        s=torch.where(uniform, grid_found.s, log_found.s),
        exact_evals=log_found.exact_evals + grid_found.exact_evals,
        proxy_evals=log_found.proxy_evals + grid_found.proxy_evals,
        k_hist=dict(Counter(k.tolist())))
