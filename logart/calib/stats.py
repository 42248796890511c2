"""Statistics of a block's weight sites: H = (2/N) Σ x xᵀ of each site's input rows, one accumulator per
*distinct* input (q/k/v read one tensor, gate/up another), gathered by hooks while the block runs each sample.

`run(x)` runs the block on a batch of its inputs (the adapter's `run` with the block's kwargs bound); it is
stopped as soon as every hooked site has seen its input, so the block's tail is skipped.
"""

from __future__ import annotations

import torch

from logart.calib.hessian import HessianAccumulator
from logart.calib.hooks import forward_until_seen


@torch.no_grad()
def propagate(run, inputs: torch.Tensor) -> torch.Tensor:
    """The block applied to every sample (batch 1: bounded memory, same numerics as evaluation). The output may
    have another shape than the input (a Swin patch merging halves the grid and doubles the width)."""
    out = None
    for i in range(inputs.shape[0]):
        y = run(inputs[i:i + 1])[0]
        if out is None:
            out = inputs.new_empty((inputs.shape[0], *y.shape)) if y.shape != inputs.shape[1:] \
                else torch.empty_like(inputs)
        out[i] = y
    return out


@torch.no_grad()
def input_groups(run, sites: dict, sample: torch.Tensor) -> list[list[str]]:
    """The sites of `sites` ({name: WeightSite}) grouped by the input tensor they read and the way they turn it into
    rows (`WeightSite.row_key`), groups in the order the forward reaches them; sites never called come last, each alone. One probe forward on `sample`."""
    seen = {}  # name -> the input tensor itself: holding it keeps its memory from being reused mid-forward
    forward_until_seen(lambda: run(sample), {n: s.module for n, s in sites.items()}, seen.__setitem__, True)
    groups: dict[tuple, list[str]] = {}
    for name in [*seen, *(n for n in sites if n not in seen)]:
        x = seen.get(name)
        key = (x.data_ptr(), tuple(x.shape), x.stride(), sites[name].row_key) if x is not None else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


@torch.no_grad()
def block_hessians(run, sites: dict, inputs: torch.Tensor, observers: tuple = (), fp_inputs=None, fp_run=None,
                   fp_modules: dict | None = None, groups: list | None = None) -> dict:
    """{site name: HessianAccumulator} for `sites` over every sample of `inputs`. Sites that share an input share
    one accumulator (only the first of each group is hooked). `observers`: (module, forward hook) pairs that see
    the same pass (the attention-aware q/k moments).

    Full-precision targets (calib/hessian.py): `fp_inputs` are the full-precision model's inputs of this block
    for the same samples, `fp_run` runs the block's full-precision copy and `fp_modules` ({site name: module of
    that copy}) are hooked in it; each sample goes through the copy first, so the two inputs of every site pair
    up row by row. `groups`: the sites grouped by shared input when the caller knows them."""
    groups = groups or input_groups(run, sites, inputs[:1])
    accs = {g[0]: HessianAccumulator(sites[g[0]].columns) for g in groups}
    fp_seen = {}
    stop_early = not observers  # observers hook modules that may run after the last hooked input

    def collect(name, x):
        fp = fp_seen.pop(name, None)
        accs[name].add_batch(sites[name].rows(x), None if fp is None else sites[name].rows(fp))

    for i in range(inputs.shape[0]):
        if fp_inputs is not None:
            forward_until_seen(lambda: fp_run(fp_inputs[i:i + 1]), {n: fp_modules[n] for n in accs},
                               fp_seen.__setitem__, stop_early=True)
        handles = [m.register_forward_hook(fn) for m, fn in observers]
        try:
            forward_until_seen(lambda: run(inputs[i:i + 1]), {n: sites[n].module for n in accs}, collect, stop_early)
        finally:
            for h in handles:
                h.remove()
    return {name: accs[g[0]] for g in groups for name in g}
