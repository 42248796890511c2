"""Reading a finished run folder (`logart quantize --output DIR`) for the report: report.json, the packed
layers in model.safetensors and the per-row choices in quant_params.safetensors. Nothing here plots."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from logart.errors import LogartError
from logart.io.checkpoint import PARAMS, WEIGHTS, read_quantization_config

REPORT = "report.json"
PACKED_PARTS = ("qweight", "row_scale", "table_index", "tables")
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def layer_kind(name: str) -> str:
    """The projection a layer name ends with, without `_proj`: q, k, v, o, gate, up, down (fc1, ... elsewhere)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf[:-5] if leaf.endswith("_proj") and len(leaf) > 5 else leaf


def recorded_recipe(recipe: dict):
    """The `Recipe` recorded in report.json, or None where it cannot be rebuilt (a report of an older version)."""
    from logart.recipes import Recipe
    try:
        return Recipe.from_dict(recipe)
    except (TypeError, KeyError, ValueError):
        return None


def quantized_with_data(recipe: dict) -> bool:
    """Whether the recorded recipe's quantization read calibration statistics (then loss_before/after are
    H-weighted, else weight errors; bias correction alone leaves them weight errors)."""
    r = recorded_recipe(recipe)
    return True if r is None else r.quantizes_with_data


def block_of(name: str) -> int | None:
    """The decoder block index in a layer name (the first purely numeric component), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


@dataclass
class RunFolder:
    path: Path
    report: dict
    layers: list[dict]                      # per-layer records in execution order (k_hist keys as int)
    config: dict | None = None              # config.json, when the run wrote a packed checkpoint
    _info: dict = field(default_factory=dict, repr=False)
    _param_keys: set = field(default_factory=set, repr=False)

    @property
    def quant_config(self) -> dict | None:
        return (self.config or {}).get("quantization_config")

    @property
    def codebook(self) -> dict:
        """The codebook spec: from the checkpoint, else from the recipe recorded in report.json."""
        qc = self.quant_config
        if qc:
            return {k: qc[k] for k in ("method", "bits", "group_size", "symmetric", "hardware_approx", "mode") if k in qc}
        return dict((self.report.get("recipe") or {}).get("codebook") or {})

    @property
    def is_log(self) -> bool:
        return self.codebook.get("method", "log_dynamic") != "uniform"

    @property
    def packed(self) -> bool:
        return self.quant_config is not None and (self.path / WEIGHTS).is_file()

    @property
    def modules(self) -> list[str]:
        """Quantized layers in execution order (the report's order; checkpoint-only names go last)."""
        names = [r["name"] for r in self.layers]
        extra = [n for n in (self.quant_config or {}).get("modules", []) if n not in set(names)]
        return names + sorted(extra)

    def record(self, name: str) -> dict | None:
        return next((r for r in self.layers if r["name"] == name), None)

    def shape(self, name: str) -> tuple[int, int]:
        """(out, in) of a quantized layer: from its record, else from the model config (no weights loaded)."""
        rec = self.record(name)
        if rec is not None:
            return int(rec["shape"][0]), int(rec["shape"][1])
        from logart.io.checkpoint import build_skeleton
        out, inp = build_skeleton(self.config)[0].get_submodule(name).weight.shape  # Linear and Embedding alike
        return int(out), int(inp)

    def tensor_info(self) -> dict[str, tuple[int, int]]:
        """{name: (elements, bytes)} of every tensor in model.safetensors, from its header (nothing loaded)."""
        if not self._info:
            self._info = _info(self.path / WEIGHTS)
        return self._info

    def tensors(self, names) -> dict[str, torch.Tensor]:
        """Selected tensors of model.safetensors (only those are read)."""
        return _read(self.path / WEIGHTS, names, set(self.tensor_info()))

    def packed_layer(self, name: str) -> dict[str, torch.Tensor]:
        """{qweight, row_scale, table_index, tables} of one quantized layer."""
        if not self.packed:
            raise LogartError(f"{self.path} has no packed checkpoint ({WEIGHTS} + config.json), so the codebook of "
                              f"{name} cannot be read.", "quantize in strict mode with --output to write one.")
        got = self.tensors([f"{name}.{p}" for p in PACKED_PARTS])
        return {p: got[f"{name}.{p}"] for p in PACKED_PARTS}

    def row_choices(self, name: str) -> dict[str, torch.Tensor]:
        """The per-row codebook choices of one layer ({s, k, top, asym} or {scale, zero}); {} when not saved."""
        path = self.path / PARAMS
        if not path.is_file():
            return {}
        if not self._param_keys:
            self._param_keys = set(_info(path))
        wanted = [k for k in self._param_keys if k.rsplit(".", 1)[0] == name]
        return {k.rsplit(".", 1)[1]: t for k, t in _read(path, wanted, self._param_keys).items()}

    def pick(self, patterns=()) -> list[str]:
        """Layers for the codebook plots: those matching any regex, or a few representative ones."""
        names = self.modules
        if patterns:
            try:
                regexes = [re.compile(p) for p in patterns]
            except re.error as e:
                raise LogartError(f"--layers pattern is not a valid regular expression ({e}).",
                                  "pass a Python regex such as 'layers\\.0\\.self_attn\\.q_proj'.") from e
            chosen = [n for n in names if any(r.search(n) for r in regexes)]
            if not chosen:
                raise LogartError(f"no quantized layer matches {', '.join(map(repr, patterns))}.",
                                  f"pick from the layer names, e.g. {names[0]!r} or {names[-1]!r}.")
            return chosen
        downs = [n for n in names if layer_kind(n) in ("down", "fc2")]
        picks = [next((n for n in names if layer_kind(n) in ("q", "q_proj", "query")), names[0]),
                 downs[(len(downs) - 1) // 2] if downs else names[len(names) // 2], names[-1]]
        return list(dict.fromkeys(picks))


def _info(path: Path) -> dict[str, tuple[int, int]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                view = f.get_slice(key)
                numel = math.prod(view.get_shape())
                out[key] = (numel, numel * _ITEMSIZE.get(view.get_dtype(), 4))
            return out
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise LogartError(f"{path} cannot be read ({type(e).__name__}: {e}).", "the run folder is damaged; rerun it.") from e


def _read(path: Path, names, keys: set) -> dict[str, torch.Tensor]:
    names = list(names)
    missing = [n for n in names if n not in keys]
    if missing:
        raise LogartError(f"{path} lacks {len(missing)} tensor(s), e.g. {missing[:2]}.",
                          "the checkpoint does not belong to this report.json; rerun logart quantize.")
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


def load_run(folder) -> RunFolder:
    """The run folder, checked: report.json must exist; the packed checkpoint is optional (reference mode)."""
    path = Path(folder)
    fix = ("pass the --output folder of a finished `logart quantize` run (report.json is written when the run "
           "ends), or run `logart quantize --output DIR` first.")
    if not path.is_dir():
        raise LogartError(f"{path} is not a folder.", fix)
    report_path = path / REPORT
    if not report_path.is_file():
        hint = f" ({path.name} looks like an unfinished run's state)" if path.name.endswith(".partial") else ""
        raise LogartError(f"{path} has no {REPORT}{hint}, so it is not a finished logart run folder.", fix)
    try:
        report = json.loads(report_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LogartError(f"{report_path} is not valid JSON ({e}).", "rerun logart quantize to rewrite it.") from e
    layers = []
    for r in report.get("layers") or []:
        layers.append({**r, "k_hist": {int(k): int(v) for k, v in (r.get("k_hist") or {}).items()}})
    config = None
    if (path / "config.json").is_file() and (path / WEIGHTS).is_file():
        config = read_quantization_config(path)
    if not layers and config is None:
        raise LogartError(f"{report_path} has no per-layer records and the folder has no checkpoint: nothing to plot.",
                          "rerun logart quantize with this logart version (it records every layer).")
    return RunFolder(path=path, report=report, layers=layers, config=config)
