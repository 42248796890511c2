"""search: choosing codebook parameters per row (DBS x SFS grid, FPCS). See grid.py and DESIGN.md."""

from logart.search.coarse_to_fine import fpcs
from logart.search.proxy import SortedRows
from logart.search.grid import (STRATEGIES, FastConfig, Grid, SearchResult, default_k_values, default_s_values,
                                exhaustive, search)
from logart.search.scores import HessianScore, LayerOutputScore, Proxy, WeightSSE

__all__ = ["FastConfig", "Grid", "HessianScore", "LayerOutputScore", "Proxy", "STRATEGIES", "SearchResult", "SortedRows", "WeightSSE",
           "default_k_values", "default_s_values", "exhaustive", "fpcs", "search"]
