"""Resumable runs: after every finished block, its quantized weights, codebook choices and the activations
entering the next block are written to `<output>.partial/`; a rerun with the same arguments continues from
the last finished block and ends with exactly the weights of an uninterrupted run.

Runs that quantize activations also keep, per finished block, the whole block's tensors (reparameterizations
move LayerNorm parameters and may give a linear layer a bias) and its activation quantizers, so that the rerun
puts them back before the next block captures its inputs through them.

Crash safety: each block's file and each activation file is written under a temporary name and renamed; the
small state.json that says how many blocks are done is renamed into place *last*, so a kill at any point
leaves either the old or the new state, never a mix. A rerun with different arguments (another recipe,
model, calibration data or logart version) is refused rather than mixing two configurations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from logart.atomic import write_file
from logart.errors import LogartError


def fingerprint(**parts) -> dict:
    """JSON-able description of everything that changes the result; tensors are replaced by their hash."""
    out = {}
    for k, v in parts.items():
        if isinstance(v, torch.Tensor):
            flat = v.detach().contiguous().reshape(-1).numpy()
            v = hashlib.sha256(memoryview(flat).cast("B")).hexdigest()   # hashed in place, not copied to bytes
        out[k] = v
    return json.loads(json.dumps(out, default=str))


BLOCK_TENSOR = "block:"   # prefix of a block file's copy of the block's own tensors


def _assign(model, name: str, value: torch.Tensor) -> None:
    """Set the parameter or buffer `name` of `model` to `value`, creating it where the fresh model has none (a
    bias that a reparameterization gave a bias-free linear layer)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    current = getattr(module, attr, None)
    if current is None:
        setattr(module, attr, torch.nn.Parameter(value.clone()))
    else:
        current.data.copy_(value)   # in place: the tensor keeps its memory format (channels-last convs)


def _atomic_save(tensors: dict, path: Path) -> None:
    write_file(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


class RunState:
    """The partial state of one run, in `folder`."""

    def __init__(self, folder, config: dict):
        self.folder = Path(folder)
        self.config = config
        self.done = 0
        self.records: list[dict] = []
        self.activations: dict = {}   # activation site -> {"entry": how to reinstall its quantizer, "record": ...}
        state = self.folder / "state.json"
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved["config"] != config:
                diff = sorted(k for k in set(saved["config"]) | set(config) if saved["config"].get(k) != config.get(k))
                raise LogartError(f"{self.folder} holds an interrupted run with different settings ({', '.join(diff)}); "
                                  "resuming would mix two configurations.",
                                  f"rerun with the original arguments, or delete {self.folder} to start over.")
            self.done, self.records = saved["done"], saved["records"]
            self.activations = saved.get("activations", {})
        self.folder.mkdir(parents=True, exist_ok=True)

    def _inputs_path(self, block: int) -> Path:
        return self.folder / f"inputs-{block:04d}.safetensors"

    def restore(self, model, block_names: list[str], codebook_of, streamer=None, streamed=()) -> tuple[dict, dict | None]:
        """Write the finished blocks' weights back into `model`; return their params and the saved inputs of
        the first unfinished block ({"hidden": quantized model's, "fp_hidden": full-precision model's, with
        full-precision targets}; None when none were saved). `block_names`: the names of the run's blocks in
        order. `codebook_of(module name)`: that module's codebook (re-resolved from the recipe, which the
        fingerprint pins down). `streamer`: loads and packs the blocks named in `streamed` (see the driver)."""
        params = {}
        for b in range(self.done):
            streaming = streamer is not None and block_names[b] in streamed
            if streaming:
                streamer.load(block_names[b])
            saved = load_file(str(self.folder / f"block-{b:04d}.safetensors"))
            names = sorted(k.rsplit(".", 1)[0] for k in saved
                           if k.endswith(".weight") and not k.startswith(BLOCK_TENSOR))
            block_params = {}
            for key in (k for k in saved if k.startswith(BLOCK_TENSOR)):   # the whole block (activation runs)
                _assign(model, key[len(BLOCK_TENSOR):], saved[key])
            for name in names:
                model.get_submodule(name).weight.data.copy_(saved[f"{name}.weight"])
                if f"{name}.bias" in saved:   # moved by bias correction
                    model.get_submodule(name).bias.data.copy_(saved[f"{name}.bias"])
                codebook = codebook_of(name)
                fields = {f.name: saved[f"{name}.param.{f.name}"] for f in dataclasses.fields(codebook.params_type)}
                block_params[name] = (codebook, codebook.params_type(**fields))
            params.update(block_params)
            if streaming:
                streamer.done(block_names[b], block_params)
        path = self._inputs_path(self.done)
        inputs = load_file(str(path)) if self.done and path.is_file() else None
        return params, inputs

    def commit_block(self, block: int, weights: dict, params: dict, records: list[dict], inputs,
                     fp_inputs=None, biases=None, tensors_of_block=None, activations=None) -> None:
        """`tensors_of_block`: {full name: tensor} of every parameter and buffer of the block, restored before
        its sites' weights; `activations`: the block's activation quantizers ({site: {"entry", "record"}})."""
        tensors = {f"{n}.weight": w.detach().cpu() for n, w in weights.items()}
        tensors.update({f"{n}.bias": b.detach().cpu() for n, b in (biases or {}).items()})
        tensors.update({BLOCK_TENSOR + n: t.detach().cpu().clone() for n, t in (tensors_of_block or {}).items()
                        if n not in tensors})   # the sites' weights and moved biases are there already
        for n, (_, p) in params.items():
            tensors.update({f"{n}.param.{f.name}": getattr(p, f.name).detach().cpu() for f in dataclasses.fields(p)})
        _atomic_save(tensors, self.folder / f"block-{block:04d}.safetensors")
        if inputs is not None:
            saved = {"hidden": inputs} if fp_inputs is None else {"hidden": inputs, "fp_hidden": fp_inputs}
            _atomic_save(saved, self._inputs_path(block + 1))
        self.done, self.records = block + 1, self.records + records
        self.activations = {**self.activations, **(activations or {})}
        state = {"config": self.config, "done": self.done, "records": self.records, "activations": self.activations}
        write_file(self.folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(state)))
        old = self._inputs_path(block)
        if old.exists():
            old.unlink()

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
