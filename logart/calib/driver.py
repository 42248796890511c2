"""The block driver: one loop for every model family. It knows weight sites and blocks, never architectures.

    adapter.prepare(model); plan = adapter.plan(model)        # blocks in order, ends as one-site blocks
    for each block:
        inputs: captured from the model (the first chained block, and every block that is not chained) or the
                previous chained block's outputs
        statistics: H of every distinct site input (one pass of the unquantized block: the original's order,
                spec §4.3), or group by group against the full-precision stream (full-precision targets)
        per site: search its codebook parameters, round its weights, write them back (calib/layer.py)
        optional: block reconstruction of all its sites together (calib/reconstruct.py)
        propagate: the block's outputs with the quantized weights are the next chained block's inputs

Memory is bounded by the model, one block's working set and the cached activations. With full-precision
targets (`Recipe.calibration.fp_target`, calib/hessian.py) the driver also carries the full-precision model's stream through
a copy of each chained block, and gathers a block's statistics input group by input group, each after the
groups before it are quantized, so that every site corrects the drift of the inputs it will actually see, once.

Resume: every finished block is committed to a `RunState` (calib/resume.py) and restored from it on a rerun.
Streaming: a `streamer` loads a chained block before it is touched and packs it once it is finished.
"""

from __future__ import annotations

import copy
import functools
import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from logart.calib.attention import AttentionObserver
from logart.calib.bias import correct_biases
from logart.calib.layer import quantize_site
from logart.calib.record import LayerRecord
from logart.calib.hooks import forward_until_seen
from logart.calib.stats import block_hessians, input_groups, propagate
from logart.errors import LogartError
from logart.quant import make_codebook

SEARCH_SAMPLES = 32   # inputs of the layer-output search score (the original CNN's --search_samples)

if TYPE_CHECKING:   # the recipe is handed in by the caller; calib/ does not import the layer above it
    from logart.recipes import Recipe


class _Stream:
    """The activations that flow between chained blocks: the quantized model's, the kwargs every block takes,
    and the full-precision model's (full-precision targets only)."""

    def __init__(self):
        self.inputs = self.kwargs = self.fp_inputs = None


class BlockDriver:
    def __init__(self, model, adapter, recipe: Recipe, data, progress=True, log=print, state=None, streamer=None,
                 reconstruct=None, activations=None):
        self.model, self.adapter, self.recipe, self.data = model, adapter, recipe, data
        self.progress, self.log, self.state, self.streamer = progress, log, state, streamer
        self.reconstruct = reconstruct   # called (driver, block, chosen, inputs, kwargs, fp_inputs, fp_module), or None
        self.activations = activations   # calib/activations.py ActivationQuantization, or None
        self.codebook_of = functools.cache(make_codebook)   # one codebook per distinct spec, shared by its sites
        self.records: list[LayerRecord] = []
        self.params: dict = {}
        self.stream = _Stream()
        # The full-precision stream: the target of every site (full-precision targets) or of every block
        # (reconstruction).
        self.carries_fp = bool(recipe.calibration.fp_target) or reconstruct is not None \
            or recipe.search.score == "output" or recipe.calibration.bias_correction
        self.fp_model = None   # a full-precision copy, for adapters whose blocks are captured one by one

    def chosen_sites(self, block) -> dict:
        """{site name: (site, effective recipe)}; sites kept in full precision (ignore) are left out. A site
        without input statistics (an embedding) is rounded to nearest, data-free."""
        chosen = {}
        for site in block.sites:
            eff = self.recipe.for_module(site.name)
            if eff is not None:
                chosen[site.name] = (site, eff if site.takes_inputs else eff.with_options(rounding="rtn"))
        return chosen

    def _needs_data(self, chosen: dict) -> bool:
        return self.activations is not None or any(site.takes_inputs and eff.needs_calibration
                                                   for site, eff in chosen.values())

    def inputs_for(self, index: int, block, chosen: dict):
        """(inputs, kwargs, fp inputs) of the block, or (None, {}, None) when no site of it needs data."""
        chained_calib = block.chained and self.recipe.needs_calibration
        if not (chained_calib or self._needs_data(chosen)):
            return None, {}, None
        if self.data is None:
            raise LogartError(f"{block.name} needs calibration data for this recipe, and none was given.",
                              "pass calibration windows (or use a data-free recipe such as log2-rtn).")
        s = self.stream
        if not block.chained:
            hidden = self.adapter.capture(self.model, block, self.data).hidden
            fp = None
            if self.fp_model is not None:   # the full-precision network's own inputs of this block: its targets
                fp_block = replace(block, module=self.fp_model.get_submodule(block.name))
                fp = self.adapter.capture(self.fp_model, fp_block, self.data).hidden
            return hidden, {}, fp
        if s.kwargs is None:   # the first chained block of this run: also the kwargs every block takes
            captured = self.adapter.capture(self.model, block, self.data)
            s.kwargs = captured.kwargs
            if s.inputs is None:
                s.inputs = captured.hidden
                if self.carries_fp:  # the full-precision model's own stream: targets of sites and blocks
                    s.fp_inputs = captured.hidden.clone()
        return s.inputs, s.kwargs, s.fp_inputs

    def observer(self, block, chosen: dict, kwargs: dict):
        """An AttentionObserver when the block's q or k site is learned-rounded with the attention-aware
        objective (spec §4.4), else None."""
        wanted = [eff for site, eff in chosen.values() if site.role in ("query", "key")]
        if not any(eff.rounding.attention_aware and eff.rounding.method.learns for eff in wanted):
            return None
        attention = self.adapter.attention(block, kwargs)
        if attention is None or not {attention.query, attention.key} & set(chosen):
            return None
        return AttentionObserver(attention, {s.name: s.module for s in block.sites})

    def quantize_sites(self, names, chosen, hessians: dict, factors: dict, bars, outputs: dict | None = None) -> None:
        for name in names:
            site, eff = chosen[name]
            for bar in bars:
                bar.set_postfix_str(name)
            cb = self.codebook_of(eff.codebook)
            rec, p = quantize_site(site, cb, eff, hessians.get(name), G=factors.get(name),
                                   outputs=(outputs or {}).get(name))
            self.block_records.append(rec)
            self.block_params[name] = (cb, p)
            bars[-1].update(site.numel)
            if self.log:
                self.log(rec.line())

    def quantize_block(self, index: int, block, bar) -> None:
        chosen = self.chosen_sites(block)
        inputs, kwargs, fp_inputs = self.inputs_for(index, block, chosen)
        run = functools.partial(self.adapter.run, block, kwargs=kwargs)
        # sites whose own quantization reads statistics (bias correction alone needs the inputs, not H)
        calibrated = {n: s for n, (s, eff) in chosen.items() if eff.quantizes_with_data and s.takes_inputs}
        observer = self.observer(block, chosen, kwargs) if inputs is not None else None
        # A site's time grows with its weight count, so the inner bar counts weights: its ETA holds across small
        # attention projections and large MLP ones.
        layer_bar = tqdm(total=sum(s.numel for s, _ in chosen.values()), desc=block.name, unit="w",
                         unit_scale=True, leave=False, disable=not self.progress)
        bars = (bar, layer_bar)
        self.block_records, self.block_params, self.block_biases = [], {}, {}
        fp_block = copy.deepcopy(block.module) if (fp_inputs is not None or self.reconstruct
                                                   or self.recipe.calibration.bias_correction) else None
        if self.activations is not None and inputs is not None:   # after the copy: it stays full precision
            self.activations.calibrate(run, block, inputs)
        if inputs is None or not calibrated:
            self.quantize_sites(list(chosen), chosen, {}, {}, bars)
        elif fp_inputs is None or not self.recipe.calibration.fp_target:
            hooks = observer.hooks() if observer else ()
            hessians = block_hessians(run, calibrated, inputs, hooks)
            factors = observer.factors() if observer else {}
            if any(chosen[n][1].search.score == "output" for n in calibrated):
                self.quantize_by_output(block, chosen, calibrated, kwargs, (inputs, fp_inputs, fp_block), hessians,
                                        factors, bars)
            else:
                self.quantize_sites(list(chosen), chosen, hessians, factors, bars)
            del hessians
        else:
            self.quantize_against_fp(block, chosen, calibrated, kwargs, (inputs, fp_inputs, fp_block), observer, bars)
        layer_bar.close()
        if self.reconstruct is not None and inputs is not None and calibrated:
            self.reconstruct(self, block, chosen, inputs, kwargs, fp_inputs, fp_block)
        if self.recipe.calibration.bias_correction and inputs is not None:
            self.correct_biases(block, chosen, kwargs, (inputs, fp_inputs, fp_block))
        if block.chained and inputs is not None:
            self.stream.inputs = propagate(run, inputs)
            if fp_inputs is not None:
                fp_run = functools.partial(self.adapter.run, replace(block, module=fp_block), kwargs=kwargs)
                self.stream.fp_inputs = propagate(fp_run, fp_inputs)

    def quantize_by_output(self, block, chosen, calibrated, kwargs, streams, hessians, factors, bars):
        """The layer-output search score (the original CNN's `layer_wise`): one site after the other, each searched
        on its input from the block with the sites before it already quantized, against the full-precision
        network's output of that layer (after its activation), on the first SEARCH_SAMPLES inputs."""
        inputs, fp_inputs, fp_block = streams
        if fp_inputs is None:
            raise LogartError(f"{block.name}: the layer-output search score needs the full-precision network's "
                              "inputs of this block, and this run does not carry them.",
                              "use --score hessian for this model.")
        n = min(SEARCH_SAMPLES, inputs.shape[0])
        run = functools.partial(self.adapter.run, block, kwargs=kwargs)
        fp_run = functools.partial(self.adapter.run, replace(block, module=fp_block), kwargs=kwargs)
        for name, (site, eff) in chosen.items():
            outputs = None
            if name in calibrated and eff.search.score == "output":
                fp_layer = fp_block.get_submodule(_relative(name, block.name))
                with torch.no_grad():
                    y = fp_layer(input_of(fp_run, fp_layer, fp_inputs[:n]))
                    outputs = {name: (input_of(run, site.module, inputs[:n]), site.act(y) if site.act else y)}
            self.quantize_sites([name], chosen, hessians, factors, bars, outputs)

    def quantize_against_fp(self, block, chosen, calibrated, kwargs, streams, observer, bars):
        """Full-precision targets: each group's statistics are gathered after the groups before it in the block
        are quantized (otherwise o_proj and down_proj would correct again what q/k/v and gate/up already
        corrected), against the block's full-precision copy."""
        inputs, fp_inputs, fp_block = streams
        run = functools.partial(self.adapter.run, block, kwargs=kwargs)
        fp_run = functools.partial(self.adapter.run, replace(block, module=fp_block), kwargs=kwargs)
        fp_modules = {n: fp_block.get_submodule(_relative(n, block.name)) for n in calibrated}
        for g, group in enumerate(input_groups(run, {n: s for n, (s, _) in chosen.items()}, inputs[:1])):
            wanted = {n: calibrated[n] for n in group if n in calibrated}
            hooks = observer.hooks() if (observer and g == 0) else ()
            hessians = block_hessians(run, wanted, inputs, hooks, fp_inputs, fp_run, fp_modules,
                                      groups=[list(wanted)]) if wanted else {}
            self.quantize_sites(group, chosen, hessians, observer.factors() if (observer and g == 0) else {}, bars)

    def correct_biases(self, block, chosen, kwargs, streams) -> None:
        """Empirical bias correction of the block's sites (calib/bias.py), after their rounding and reconstruction:
        each bias absorbs its output's mean shift from the full-precision network's."""
        inputs, fp_inputs, fp_block = streams
        fp_run = functools.partial(self.adapter.run, replace(block, module=fp_block), kwargs=kwargs)
        sites = {n: s.module for n, (s, _) in chosen.items() if s.takes_inputs}
        fp_sites = {n: fp_block.get_submodule(_relative(n, block.name)) for n in sites}
        shifts = correct_biases(functools.partial(self.adapter.run, block, kwargs=kwargs), fp_run, sites, fp_sites,
                                inputs, inputs if fp_inputs is None else fp_inputs,
                                batch=getattr(self.adapter, "batch_size", 1))   # the adapter's capture batch
        self.block_biases = {n: sites[n].bias for n in shifts}
        if self.log and shifts:
            worst = max(shifts, key=shifts.get)
            self.log(f"{block.name}: bias correction of {len(shifts)} sites; largest shift {shifts[worst]:.3g} of "
                     f"the largest bias ({worst})")

    def restore(self, plan) -> int:
        """Blocks finished by an interrupted run, written back from the state; the index to continue from."""
        if self.state is None or not self.state.done:
            return 0
        chained = {b.name for b in plan if b.chained}
        restored, saved = self.state.restore(
            self.model, [b.name for b in plan], lambda n: self.codebook_of(self.recipe.for_module(n).codebook),
            self.streamer, chained)
        self.params.update(restored)
        self.records += [LayerRecord.from_dict(r) for r in self.state.records]
        if saved is not None:
            self.stream.inputs, self.stream.fp_inputs = saved["hidden"], saved.get("fp_hidden")
        if self.activations is not None:   # the later blocks' inputs pass through these quantizers
            self.activations.restore(self.model, self.state.activations,
                                     started=any(b.act_sites for b in plan[:self.state.done]))
        if self.log:
            self.log(f"resuming after block {self.state.done - 1}: {len(restored)} layers restored from "
                     f"{self.state.folder}")
        return self.state.done

    def commit(self, index: int, block) -> None:
        self.records += self.block_records
        self.params.update(self.block_params)
        if self.state is not None:
            weights = {n: self.model.get_submodule(n).weight for n in self.block_params}
            block_tensors, acts = None, None
            if self.activations is not None:   # activation calibration may have changed more than the sites
                from logart.calib.activations import saved_quantizers
                prefix = f"{block.name}." if block.name else ""
                block_tensors = {prefix + k: v for k, v in block.module.state_dict().items()}
                new = set(self.activations.quantizers) - set(self.state.activations)
                acts = {n: {"entry": e, "record": self.activations.records.get(n)}
                        for n, e in saved_quantizers(self.model, self.activations, new).items()}
            self.state.commit_block(index, weights, self.block_params, [r.to_dict() for r in self.block_records],
                                    self.stream.inputs, self.stream.fp_inputs, self.block_biases, block_tensors, acts)
        if self.streamer is not None and block.chained:
            self.streamer.done(block.name, self.block_params)

    def run(self, on_block_done=None) -> tuple[list[LayerRecord], dict]:
        torch.manual_seed(self.recipe.calibration.seed)
        self.adapter.prepare(self.model)
        if self.carries_fp and getattr(self.adapter, "captures_fp", False):
            # Small models (CNNs, ViTs) whose blocks are captured from the model itself: the targets come from
            # the full-precision network, as in BRECQ, not from the full-precision block on quantized inputs.
            self.fp_model = copy.deepcopy(self.model)
        plan = self.adapter.plan(self.model)
        check_rules(self.recipe, [site.name for block in plan for site in block.sites])
        start = self.restore(plan)
        bar = tqdm(range(start, len(plan)), desc="blocks", disable=not self.progress, unit="block")
        for index in bar:
            block = plan[index]
            t0 = time.perf_counter()
            if self.streamer is not None and block.chained:
                self.streamer.load(block.name)
            self.quantize_block(index, block, bar)
            self.commit(index, block)
            if on_block_done is not None:
                on_block_done(index, time.perf_counter() - t0)
        return self.records, self.params


def check_rules(recipe, names: list[str]) -> None:
    """Every --ignore and --override pattern must match at least one weight the run quantizes: a typo in a
    module name would otherwise quantize everything as if the rule were not there."""
    rules = [("--ignore", p) for p in recipe.ignore] + [("--override", r.pattern) for r in recipe.overrides]
    for option, pattern in rules:
        if not any(re.search(pattern, n) for n in names):
            examples = ", ".join(names[:2] + names[-1:])
            raise LogartError(f"{option} pattern {pattern!r} matches none of the {len(names)} weights this run "
                              f"quantizes (full names such as {examples}).",
                              "fix the pattern (it is searched in the full module name), or drop the rule.")


@torch.no_grad()
def input_of(run, module, x: torch.Tensor) -> torch.Tensor:
    """The input `module` receives when `run(x)` runs (the forward stops there)."""
    seen = []
    forward_until_seen(lambda: run(x), {"layer": module}, lambda _n, t: seen.append(t), stop_early=True)
    if not seen:
        raise LogartError(f"the block never called {type(module).__name__} on these inputs.",
                          "check the adapter's block plan.")
    return seen[0]


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if name != prefix else ""


def quantize_blocks(model, adapter, recipe: Recipe, data, progress: bool = True, log=print, on_block_done=None,
                    state=None, streamer=None, reconstruct=None, activations=None) -> tuple[list[LayerRecord], dict]:
    """Quantize every weight site the adapter lists, in place, each with its effective recipe
    (`Recipe.for_module`: ignore list, then the first matching override). Returns the per-site records and
    {site name: (codebook, params)}, what `save_quantized` packs.

    data: what `adapter.capture` runs through the model (token windows for LMs, image batches for CNNs/ViTs);
    None for data-free recipes. state: a `RunState` (calib/resume.py) that makes the run resumable. streamer:
    for models larger than memory, `load(block name)` before a chained block is touched and `done(block name,
    block params)` once it is finished (it packs the block, dropping its float weights). reconstruct: block
    reconstruction after the sites of a block are quantized (calib/reconstruct.py)."""
    driver = BlockDriver(model, adapter, recipe, data, progress, log, state, streamer, reconstruct, activations)
    return driver.run(on_block_done)
