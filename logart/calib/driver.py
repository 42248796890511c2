"""The block-sequential driver: one generic loop for every decoder-only model.

    capture the first block's inputs  ->  for each block:
        gather the Gram/Hessian of every distinct linear input (one accumulator per shared input)
        for each linear: search its codebook parameters, round its weights, write them back
        recompute the block's outputs with the quantized weights: the next block's inputs

Memory is bounded by the model, one block's working set and the cached activations
(nsamples x seqlen x hidden floats). Statistics of a block are gathered before any of its layers is
quantized (the original's aespa-style order, spec §4.3).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from logart.calib.attention import AttentionObserver
from logart.calib.ends import opted_in_ends, quantize_embedding, quantize_head
from logart.calib.hessian import HessianAccumulator
from logart.calib.layer import quantize_linear
from logart.models.decoder import block_output, capture_block_inputs, decoder_layers, linear_layers
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
def block_hessians(block, linears: dict, inputs: torch.Tensor, kwargs: dict, observers: tuple = ()) -> dict:
    """Accumulate H = (2/N) Σ x xᵀ once per *distinct* input: q/k/v (and gate/up) read the same tensor, so one
    probe forward groups the layers by input and only the first of each group is hooked. `observers`:
    (module, forward hook) pairs that see the same pass (the attention-aware q/k moments)."""
    seen = {}  # name -> the input tensor itself: holding it keeps its memory from being reused mid-forward

    def probe(name):
        def hook(_m, args):
            seen[name] = args[0]
        return hook

    handles = [m.register_forward_pre_hook(probe(n)) for n, m in linears.items()]
    try:
        block(inputs[:1], **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for name in linears:
        x = seen.get(name)
        key = (x.data_ptr(), tuple(x.shape), x.stride()) if x is not None else (name,)
        groups.setdefault(key, []).append(name)
    seen.clear()
    accs = {members[0]: HessianAccumulator(linears[members[0]].in_features) for members in groups.values()}

    def collect(name):
        def hook(_m, args):
            accs[name].add_batch(args[0])
        return hook

    handles = [linears[n].register_forward_pre_hook(collect(n)) for n in accs]
    handles += [m.register_forward_hook(fn) for m, fn in observers]
    try:
        for i in range(inputs.shape[0]):
            block(inputs[i:i + 1], **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: accs[members[0]] for members in groups.values() for name in members}


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
    inputs, kwargs = (None, None)
    if recipe.needs_calibration and start < len(blocks):
        if calib is None:
            raise ValueError("this recipe needs calibration windows")
        captured = capture_block_inputs(model, calib)   # also the kwargs (masks, positions) every block takes
        inputs, kwargs = (restored if start else captured.hidden), captured.kwargs
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
        hessians = block_hessians(block, calibrated, inputs, kwargs, observer.hooks() if observer else ()) \
            if inputs is not None and calibrated else {}
        factors = observer.factors() if observer else {}
        block_records, block_params = [], {}
        # A layer's time grows with its weight count, so the inner bar counts weights: its ETA holds across the
        # small attention projections and the large MLP ones.
        layer_bar = tqdm(total=sum(layer.weight.numel() for _, layer, _ in chosen.values()), desc=f"block {b}",
                         unit="w", unit_scale=True, leave=False, disable=not progress)
        for name, (full, layer, eff) in chosen.items():
            bar.set_postfix_str(name)
            layer_bar.set_postfix_str(name)
            cb = codebook_of(eff.codebook)
            rec, p = quantize_linear(layer, cb, eff, hessians.get(name), name=full, G=factors.get(full))
            block_records.append(rec)
            block_params[full] = (cb, p)
            layer_bar.update(layer.weight.numel())
            if log:
                log(rec.line())
        layer_bar.close()
        del hessians
        if inputs is not None:
            inputs = propagate(block, inputs, kwargs)
        records += block_records
        params.update(block_params)
        if state is not None:
            state.commit_block(b, {n: model.get_submodule(n).weight for n in block_params}, block_params,
                               [r.to_dict() for r in block_records], inputs)
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
