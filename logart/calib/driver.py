"""The block-sequential driver: one generic loop for every decoder-only model.

    capture the first block's inputs  ->  for each block:
        gather the Gram/Hessian of every distinct linear input (one accumulator per shared input)
        for each linear: search its codebook parameters, round its weights, write them back
        recompute the block's outputs with the quantized weights: the next block's inputs

Memory is bounded by the model, one block's working set and the cached activations
(nsamples x seqlen x hidden floats). Statistics of a block are gathered before any of its layers is
quantized (the original's aespa-style order, spec §4.3).

With full-precision targets (`Recipe.fp_target`, calib/hessian.py) the driver also carries the full-precision
model's stream through a copy of each block, and gathers a block's statistics input group by input group
(q/k/v, o, gate/up, down), each after the groups before it are quantized, so that every layer corrects the
drift of the inputs it will actually see, once.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from logart.calib.attention import AttentionObserver
from logart.calib.ends import opted_in_ends, quantize_embedding, quantize_head
from logart.calib.hessian import HessianAccumulator
from logart.calib.layer import quantize_linear
from logart.models.decoder import (block_output, capture_block_inputs, decoder_layers, forward_until_seen,
                                   linear_layers)
from logart.models.roles import attention_layout
from logart.quant import make_codebook
from logart.recipes import Recipe


@dataclass
class LayerRecord:
    """One line of the per-layer log (printed, and saved in report.json)."""

    name: str
    shape: tuple
    k_hist: dict
    s_range: tuple
    loss_before: float     # Δw H Δwᵀ summed over rows, plain RTN at k = L, s = 1 (the log2 baseline)
    loss_after: float      # the same for the final weights
    seconds: float
    dead_inputs: int = 0
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        ks = " ".join(f"k{k}:{n}" for k, n in sorted(self.k_hist.items(), reverse=True))
        return (f"{self.name:38s} {str(tuple(self.shape)):12s} loss {self.loss_before:10.4g} -> {self.loss_after:10.4g}"
                f"  s {self.s_range[0]:.2f}-{self.s_range[1]:.2f}  {ks}  {self.seconds:5.1f}s")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def propagate(block, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block applied to every cached sample (batch 1: bounded memory, same numerics as evaluation)."""
    out = torch.empty_like(inputs)
    for i in range(inputs.shape[0]):
        out[i] = block_output(block(inputs[i:i + 1], **kwargs))[0]
    return out


@torch.no_grad()
def input_groups(block, linears: dict, sample: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """The layers of `linears` grouped by the input tensor they read (q/k/v share one, gate/up another), groups
    in the order the block's forward reaches them. One probe forward on `sample` (one window)."""
    seen = {}  # name -> the input tensor itself: holding it keeps its memory from being reused mid-forward
    forward_until_seen(block, sample, kwargs, linears, seen.__setitem__, stop_early=True)
    groups: dict[tuple, list[str]] = {}
    for name in [*seen, *(n for n in linears if n not in seen)]:  # call order; never-called layers last
        x = seen.get(name)
        key = (x.data_ptr(), tuple(x.shape), x.stride()) if x is not None else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


@torch.no_grad()
def block_hessians(block, linears: dict, inputs: torch.Tensor, kwargs: dict, observers: tuple = (),
                   fp_inputs: torch.Tensor | None = None, fp_block=None, groups: list | None = None) -> dict:
    """Accumulate H = (2/N) Σ x xᵀ once per *distinct* input: q/k/v (and gate/up) read the same tensor, so only
    the first layer of each group is hooked. `observers`: (module, forward hook) pairs that see the same pass
    (the attention-aware q/k moments). Returns {layer name: accumulator}.

    With `fp_inputs` and `fp_block` (the full-precision model's inputs of this block for the same tokens, and the
    block's full-precision copy) the accumulators also gather the drift statistics of the full-precision target
    (calib/hessian.py): each window goes through `fp_block` first, so the two inputs of every linear pair up
    token by token. `groups`: the layers grouped by shared input, when the caller already knows them (else one
    probe forward finds them, `input_groups`)."""
    groups = groups or input_groups(block, linears, inputs[:1], kwargs)
    accs = {g[0]: HessianAccumulator(linears[g[0]].in_features) for g in groups}
    fp_linears = linear_layers(fp_block) if fp_block is not None else {}
    fp_seen = {}
    stop_early = not observers  # observers hook the attention module, which may run after the last hooked input

    def collect(name, x):
        accs[name].add_batch(x, fp_seen.pop(name, None))

    for i in range(inputs.shape[0]):
        if fp_inputs is not None:
            forward_until_seen(fp_block, fp_inputs[i:i + 1], kwargs, {n: fp_linears[n] for n in accs},
                                fp_seen.__setitem__, stop_early=True)
        handles = [m.register_forward_hook(fn) for m, fn in observers]
        try:
            forward_until_seen(block, inputs[i:i + 1], kwargs, {n: linears[n] for n in accs}, collect, stop_early)
        finally:
            for h in handles:
                h.remove()
    return {name: accs[g[0]] for g in groups for name in g}


def _attention_observer(block, chosen: dict, kwargs: dict, prefix: str):
    """An AttentionObserver when the block's q or k projection is learned-rounded with the attention-aware
    objective (spec §4.4), else None."""
    layout = attention_layout(block)
    if layout is None:
        return None
    wanted = [chosen[n][2] for n in (layout.query, layout.key) if n in chosen]
    if not any(eff.attention_aware and eff.rounding.endswith("llr") for eff in wanted):
        return None
    return AttentionObserver(block, layout, kwargs, prefix)


def quantize_model(model, recipe: Recipe, calib: torch.Tensor | None, progress: bool = True, log=print,
                   on_block_done=None, state=None, streamer=None) -> tuple[list[LayerRecord], dict]:
    """Quantize every linear layer inside the decoder blocks of `model` in place, each with its effective recipe
    (`Recipe.for_module`: ignore list, then the first matching override); norms stay in full precision, and so
    do the token embedding and the lm_head unless opted in (calib/ends.py). Returns the per-layer records and
    {module name: (codebook, params)}.

    state: a `RunState` (calib/resume.py): finished blocks are restored from it instead of recomputed, and
    every block finished here is committed to it. The ends are not committed: they are recomputed exactly
    (the embedding is data-free, the head depends only on the restored blocks and the calibration windows).
    streamer: for models larger than memory, an object with `load(block_name)`, called before a block is
    touched, and `done(block_name, block_params)`, called once the block is finished and propagated (it packs
    the block, dropping its float weights). None: the whole model is in memory."""
    torch.manual_seed(recipe.seed)
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    codebook_of = functools.cache(make_codebook)   # one codebook per distinct spec, shared by its layers
    params, start, records = {}, 0, []
    embedding, head = opted_in_ends(model, recipe, log)
    if embedding is not None:  # before calibration: the blocks then see the embeddings the quantized model uses
        name, module, eff = embedding
        rec, p = quantize_embedding(name, module, eff, codebook_of(eff.codebook))
        records.append(rec)
        params[name] = (codebook_of(eff.codebook), p)
        if log:
            log(rec.line())
    if state is not None and state.done:
        restored_params, restored = state.restore(model, prefix, lambda n: codebook_of(recipe.for_module(n).codebook),
                                                    streamer)
        params.update(restored_params)
        start = state.done
        records += [LayerRecord(**{**r, "shape": tuple(r["shape"]), "s_range": tuple(r["s_range"]),
                                   "k_hist": {int(k): v for k, v in r["k_hist"].items()}}) for r in state.records]
        if log:
            log(f"resuming after block {start - 1}: {len(restored_params)} layers restored from {state.folder}")
    inputs, kwargs, fp_inputs = None, None, None
    if recipe.needs_calibration and start < len(blocks):
        if calib is None:
            raise ValueError("this recipe needs calibration windows")
        captured = capture_block_inputs(model, calib)   # also the kwargs (masks, positions) every block takes
        inputs, kwargs = (restored["hidden"] if start else captured.hidden), captured.kwargs
        if recipe.fp_target:  # the full-precision model's own stream, the target of every layer (calib/hessian.py)
            fp_inputs = restored["fp_hidden"] if start else captured.hidden.clone()
    bar = tqdm(range(start, len(blocks)), desc="blocks", disable=not progress, unit="block")
    for b in bar:
        block = blocks[b]
        if streamer is not None:
            streamer.load(f"{prefix}.{b}")
        chosen = {}  # block-relative name -> (full name, layer, effective recipe); ignored layers left out
        for name, layer in linear_layers(block).items():
            eff = recipe.for_module(f"{prefix}.{b}.{name}")
            if eff is not None:
                chosen[name] = (f"{prefix}.{b}.{name}", layer, eff)
        t0 = time.perf_counter()
        calibrated = {n: layer for n, (_, layer, eff) in chosen.items() if eff.needs_calibration}
        observer = _attention_observer(block, chosen, kwargs, f"{prefix}.{b}.") if inputs is not None else None
        # A layer's time grows with its weight count, so the inner bar counts weights: its ETA holds across the
        # small attention projections and the large MLP ones.
        layer_bar = tqdm(total=sum(layer.weight.numel() for _, layer, _ in chosen.values()), desc=f"block {b}",
                         unit="w", unit_scale=True, leave=False, disable=not progress)
        block_records, block_params = [], {}

        def quantize_group(names, hessians, factors):
            for name in names:
                full, layer, eff = chosen[name]
                bar.set_postfix_str(name)
                layer_bar.set_postfix_str(name)
                cb = codebook_of(eff.codebook)
                rec, p = quantize_linear(layer, cb, eff, hessians.get(name), name=full, G=factors.get(full))
                block_records.append(rec)
                block_params[full] = (cb, p)
                layer_bar.update(layer.weight.numel())
                if log:
                    log(rec.line())

        fp_block = copy.deepcopy(block) if fp_inputs is not None else None  # the block's full-precision copy
        if inputs is None or not calibrated:
            quantize_group(list(chosen), {}, {})
        elif fp_inputs is None:
            # All statistics from one pass of the unquantized block (the original's order, spec §4.3).
            hessians = block_hessians(block, calibrated, inputs, kwargs, observer.hooks() if observer else ())
            quantize_group(list(chosen), hessians, observer.factors() if observer else {})
            del hessians
        else:
            # Full-precision targets: each layer corrects the drift of its actual inputs, so a group's statistics
            # are gathered after the groups before it in the block are quantized (otherwise o_proj and down_proj
            # would correct again what q/k/v and gate/up already corrected), against the block's fp copy.
            for g, group in enumerate(input_groups(block, {n: chosen[n][1] for n in chosen}, inputs[:1], kwargs)):
                wanted = {n: calibrated[n] for n in group if n in calibrated}
                hooks = observer.hooks() if (observer and g == 0) else ()
                hessians = block_hessians(block, wanted, inputs, kwargs, hooks, fp_inputs, fp_block,
                                          groups=[list(wanted)]) if wanted else {}
                quantize_group(group, hessians, observer.factors() if (observer and g == 0) else {})
        layer_bar.close()
        if inputs is not None:
            inputs = propagate(block, inputs, kwargs)
        if fp_block is not None:
            fp_inputs = propagate(fp_block, fp_inputs, kwargs)
            del fp_block
        records += block_records
        params.update(block_params)
        if state is not None:
            state.commit_block(b, {n: model.get_submodule(n).weight for n in block_params}, block_params,
                               [r.to_dict() for r in block_records], inputs, fp_inputs)
        if streamer is not None:
            streamer.done(f"{prefix}.{b}", block_params)
        if on_block_done is not None:
            on_block_done(b, time.perf_counter() - t0)
    if head is not None:  # last: its inputs are the quantized model's final hidden states
        name, module, eff = head
        torch.manual_seed(recipe.seed)  # the same state whether or not this run resumed
        rec, p = quantize_head(model, name, module, eff, codebook_of(eff.codebook), calib)
        records.append(rec)
        params[name] = (codebook_of(eff.codebook), p)
        if log:
            log(rec.line())
    return records, params
