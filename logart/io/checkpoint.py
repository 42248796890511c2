"""The logart checkpoint: a Hugging Face style folder that holds real n-bit packed weights.

    DIR/config.json          the model config + `quantization_config` (quant_method "logart", format version,
                             codebook, recipe (with its ordered overrides), the packed module names, producer
                             version, and `module_specs`: the codebook of every packed module whose spec differs
                             from the global one, i.e. where an override applied; absent in older checkpoints)
    DIR/model.safetensors    packed codes, row scales, dequant tables, and the untouched fp tensors;
                             its metadata holds a sha256 per tensor, so corruption is detected on load
    DIR/tokenizer files, generation_config.json

Writes go to a temporary folder beside DIR and are renamed into place; an existing DIR is never replaced
unless the caller says so. Loading checks every tensor's presence, shape, dtype and checksum and fails with
one clear message; it never leaves a weight randomly initialised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from logart.atomic import refuse_to_overwrite, write_folder  # noqa: F401 (re-exported)
from logart.version import __version__
from logart.io.embedding import packed_class
from logart.io.linear import LogLinear
from logart.quant.spec import QuantSpec
from logart.errors import LogartError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PARAMS = "quant_params.safetensors"  # per-row codebook choices (k, s, top, asym / scale, zero): reports, not inference


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _module(model, name: str):
    return model.get_submodule(name)


def _set_module(model, name: str, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def pack_model(model, layers: dict) -> list[str]:
    """Replace every quantized `nn.Linear` / `nn.Embedding` (name -> (codebook, params)) by a `LogLinear` /
    `LogEmbedding` in place."""
    for name, (codebook, params) in layers.items():
        module = _module(model, name)
        if not isinstance(module, LogLinear):
            packed = packed_class(module).from_linear(module, codebook, params)
            # an activation quantizer hooked on the float layer stays on the packed one (W4A4 keeps running)
            packed._forward_pre_hooks.update(module._forward_pre_hooks)
            packed._forward_hooks.update(module._forward_hooks)
            _set_module(model, name, packed)
    return sorted(layers)


def module_spec(qc: dict, name: str) -> dict:
    """The codebook of packed module `name`: its `module_specs` entry where an override applied, else the global
    one (a checkpoint written before overrides existed has no `module_specs`)."""
    return {**qc, **(qc.get("module_specs") or {}).get(name, {})}


def packed_shell(module, name: str, qc: dict, n_tables: int) -> LogLinear:
    """The empty packed module that replaces `module` of the skeleton, with `name`'s own bits and group size."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
        raise LogartError(f"{name} is a {type(module).__name__}, not a Linear, Conv2d or Embedding layer.",
                          "the config and the architecture do not belong together; re-export the checkpoint.")
    spec = module_spec(qc, name)
    return packed_class(module).empty_like(module, spec["bits"], spec["group_size"], n_tables)


def _unique_state(model) -> dict:
    """The state dict without aliases (tied embeddings share storage; safetensors refuses shared tensors)."""
    # named_parameters() lists a shared parameter once (by identity), which also works on the meta device.
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in keep}


def quantization_config(codebook_spec: dict, recipe: dict, modules: list[str], module_specs: dict | None = None) -> dict:
    return {"quant_method": "logart", "format_version": FORMAT_VERSION, **codebook_spec, "recipe": recipe,
            "modules": modules, "module_specs": module_specs or {}, "producer": f"logart {__version__}"}


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, then its header's `__metadata__` in sorted key order: the writer keeps it in a
    hash map whose order changes from process to process, and the same checkpoint should be the same bytes.
    Only the order changes, so the header keeps its length and every data offset stays valid."""
    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= n:   # always, unless the writer's JSON spelling differs from ours: then keep its bytes
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def save_quantized(model, directory, layers: dict, recipe, tokenizer=None, overwrite: bool = False,
                   config: dict | None = None) -> Path:
    """Pack `model` in place (see `pack_model`) and write the checkpoint folder. `layers` maps module names
    to (codebook, params) as returned by `logart.quantize`; `recipe` is the `Recipe` used. The per-row choices
    also go to quant_params.safetensors, for `logart report`. `config`: what rebuilds the architecture, for a
    model without a Hugging Face config (a vision model: {"logart_vision": {...}}, models/vision.py)."""
    modules = pack_model(model, layers)
    state = _unique_state(model)
    meta = {"format": "pt", "logart.format_version": str(FORMAT_VERSION),
            "logart.sha256": json.dumps({k: _sha256(v) for k, v in state.items()})}
    config = dict(config) if config is not None else model.config.to_dict()
    config.pop("quantization_config", None)
    own_specs = {name: cb.spec.to_dict() for name, (cb, _) in layers.items() if cb.spec != recipe.codebook}
    config["quantization_config"] = quantization_config(recipe.codebook.to_dict(), recipe.to_dict(), modules,
                                                        own_specs)

    choices = {f"{name}.{f.name}": getattr(p, f.name).detach().cpu().contiguous()
               for name, (_, p) in layers.items() for f in dataclasses.fields(p)}

    def write(tmp: Path):
        save_safetensors(state, tmp / WEIGHTS, metadata=meta)
        if choices:
            save_safetensors(choices, tmp / PARAMS)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_folder(Path(directory), write, overwrite)
    return Path(directory)


def read_quantization_config(directory) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise LogartError(f"{directory} has no config.json, so it is not a logart checkpoint.",
                          "pass the folder written by `logart quantize --output`.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:   # invalid JSON or not UTF-8
        raise LogartError(f"{path} is not valid JSON ({e}).", "the checkpoint is damaged; re-export it.") from e
    if not isinstance(config, dict):
        raise LogartError(f"{path} holds a JSON {type(config).__name__}, not a model config.",
                          "the checkpoint is damaged; re-export it.")
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise LogartError(f"{path}: quantization_config is a {type(qc).__name__}, not an object.",
                          "the checkpoint is damaged; re-export it.")
    if qc.get("quant_method") != "logart":
        raise LogartError(f"{directory} is not a logart checkpoint (quant_method {qc.get('quant_method')!r}).",
                          "load it with transformers directly, or pass a folder written by logart.")
    if qc.get("format_version") != FORMAT_VERSION:
        raise LogartError(f"{directory} uses logart format version {qc.get('format_version')}; this logart "
                          f"({__version__}) reads version {FORMAT_VERSION}.",
                          "re-export the checkpoint with this logart version.")
    _check_quantization_config(qc, path)
    return config


def _check_quantization_config(qc: dict, path: Path) -> None:
    """The fields the loader builds the packed layers from: a list of module names, and a valid codebook spec
    (bits, group size, method, mode) globally and for every module with its own."""
    modules = qc.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise LogartError(f"{path}: quantization_config.modules is missing or not a list of module names.",
                          "the checkpoint is damaged; re-export it.")
    specs = qc.get("module_specs") or {}
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise LogartError(f"{path}: quantization_config.module_specs is not a mapping of module -> codebook.",
                          "the checkpoint is damaged; re-export it.")
    names = {f.name for f in dataclasses.fields(QuantSpec)}
    for name in [None, *specs]:
        spec = module_spec(qc, name) if name else qc
        try:
            QuantSpec(**{k: v for k, v in spec.items() if k in names})
        except LogartError as e:
            where = f"module_specs[{name!r}]" if name else "quantization_config"
            raise LogartError(f"{path}: {where}: {e.problem}", "the checkpoint is damaged; re-export it.") from e


def _read_tensors(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise LogartError(f"{path} is missing.", "the checkpoint is incomplete; re-export it.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise LogartError(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupted.",
                          "re-export the checkpoint.") from e
    return tensors, meta


def check_tensor_names(expected, present) -> None:
    """Raise unless the checkpoint's tensor names `present` are exactly the model's `expected` ones."""
    missing = [k for k in expected if k not in present]
    extra = [k for k in present if k not in expected]
    if missing:
        raise LogartError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}.",
                          "the file is incomplete or from another model; re-export it (logart never fills "
                          "missing weights at random).")
    if extra:
        raise LogartError(f"the checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[:3]}.",
                          "the weights belong to another model or format; re-export the checkpoint.")


def check_header(expected: dict, found: dict) -> None:
    """Names, shapes and dtypes of the file's tensors against the skeleton's (both {name: (shape, dtype)})."""
    check_tensor_names(expected, found)
    for k, want in expected.items():
        if tuple(found[k]) != tuple(want):
            raise LogartError(f"tensor {k} has shape {found[k][0]} / {found[k][1]} in the file, the model expects "
                              f"{want[0]} / {want[1]}.", "the checkpoint does not match its config; re-export it.")


def check_loaded(model, found: dict, meta: dict, expected: dict | None = None) -> None:
    """The one load check of a packed checkpoint, for every way it is read (`load_quantized`, transformers'
    `from_pretrained`): `model` must hold exactly the tensors the file has, none left on the meta device, each
    with the shape and dtype the model's skeleton expects, finite (NaN / inf in a float tensor is an error, whatever
    the checksum says), and with the checksum `save_quantized` recorded. A file without checksums loads with a
    warning that it cannot be verified (a checkpoint re-saved by transformers' save_pretrained has none).

    found: {tensor name: (shape, dtype)} as read from the file's header; meta: its metadata; expected:
    {name: (shape, dtype)} of the empty skeleton before loading (default: the tensors as loaded)."""
    state = _unique_state(model)
    # the tensors as loaded name what must be there; the skeleton's shapes (where known) what they must look like
    check_header({k: (expected or {}).get(k, (tuple(t.shape), t.dtype)) for k, t in state.items()}, found)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise LogartError(f"{len(leftover)} weight(s) were not filled by the checkpoint, e.g. {leftover[:3]}.",
                          "the checkpoint is incomplete; re-export it.")
    if "logart.sha256" not in meta and "logart.format_version" in meta:
        raise LogartError("the checkpoint was written by logart but its checksum metadata (logart.sha256) is gone: "
                          "the file header is damaged.", "re-export the checkpoint.")
    if "logart.sha256" not in meta:
        warnings.warn("logart: this checkpoint carries no checksums (logart.sha256 metadata), so its tensors cannot "
                      "be verified; it loads, but a damaged file would go unnoticed. Re-save it with "
                      "logart.save_quantized to restore the checks.", stacklevel=3)
    try:
        sums = json.loads(meta.get("logart.sha256", "{}"))
    except ValueError as e:
        raise LogartError(f"the checkpoint's checksum metadata (logart.sha256) is not valid JSON ({e}).",
                          "the file is damaged; re-export the checkpoint.") from e
    if sums and set(sums) != set(state):
        odd = sorted(set(sums) ^ set(state))[:3]
        raise LogartError(f"the checkpoint's checksums do not list exactly its tensors (e.g. {odd}): the file header "
                          "is damaged.", "re-export the checkpoint.")
    for k, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LogartError(f"tensor {k} holds NaN or inf values: the checkpoint is damaged (a valid logart "
                              "checkpoint has finite weights, scales and tables).", "re-export the checkpoint.")
        want = (expected or {}).get(k, (tuple(t.shape), t.dtype))
        if (tuple(t.shape), t.dtype) != want:   # the file's own shape was checked above; this is what got loaded
            raise LogartError(f"tensor {k} was loaded as {tuple(t.shape)} / {t.dtype}, the model expects "
                              f"{want[0]} / {want[1]}.", "the checkpoint does not match its config; re-export it.")
        if k in sums and _sha256(t.detach().cpu()) != sums[k]:
            raise LogartError(f"tensor {k} fails its checksum: the file is corrupted or was converted on the way.",
                              "re-export the checkpoint.")
    _check_table_indices(model)


def _check_table_indices(model) -> None:
    """Every packed row must point at one of its layer's tables (an index out of range would read past them)."""
    for name, m in model.named_modules():
        if isinstance(m, LogLinear) and m.table_index.numel():
            low, high = int(m.table_index.min()), int(m.table_index.max())
            if low < 0 or high >= m.tables.shape[0]:
                raise LogartError(f"tensor {name}.table_index points at tables {low}..{high}, but the layer has "
                                  f"{m.tables.shape[0]}.", "the checkpoint is damaged; re-export it.")


def _install_activations(model, saved) -> None:
    """The activation quantizers a W?A? vision checkpoint stores (config.json logart_vision.activations)."""
    from logart.calib.activations import install_saved

    try:
        if not isinstance(saved, dict):
            raise TypeError("not a mapping")
        install_saved(model, saved)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise LogartError(f"config.json: the activation quantizers cannot be installed ({type(e).__name__}: "
                          f"{str(e)[:120]}).", "the checkpoint is damaged; re-export it.") from e


def build_skeleton(config: dict):
    """The model's architecture without weights (meta device), its quantized linears replaced by empty
    `LogLinear` shells of the right shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = config["quantization_config"]
    if "logart_vision" in config:
        from logart.models.vision import vision_skeleton
        return vision_skeleton(config["logart_vision"]), qc
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        hf_config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise LogartError(f"config.json describes no architecture this transformers can build (model_type "
                          f"{cfg.get('model_type')!r}: {str(e)[:120]}).",
                          "the config is damaged, or needs a newer transformers; re-export the checkpoint.") from e
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    # init_empty_weights re-creates every registered parameter, which unties tied embeddings (SmolLM2's
    # lm_head); tie them again so that the expected tensors are those save_quantized wrote.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model, qc


def load_quantized(directory, device: str = "cpu"):
    """(model, tokenizer or None) from a folder written by `save_quantized`, weights checked one by one.
    Every refusal names the folder."""
    directory = Path(directory)
    try:
        return _load_quantized(directory, device)
    except LogartError as e:
        if str(directory) in e.problem:
            raise
        raise LogartError(f"{directory}: {e.problem}", e.fix) from e


def _load_quantized(directory: Path, device: str):
    config = read_quantization_config(directory)
    tensors, meta = _read_tensors(directory / WEIGHTS)
    model, qc = build_skeleton(config)
    for name in qc["modules"]:
        try:
            module = _module(model, name)
        except AttributeError as e:
            raise LogartError(f"the checkpoint lists a quantized module {name!r} that this architecture lacks.",
                              "the config and weights do not belong together; re-export the checkpoint.") from e
        tables = tensors.get(f"{name}.tables")
        n_tables = tables.shape[0] if tables is not None and tables.dim() == 2 else 1
        _set_module(model, name, packed_shell(module, name, qc, n_tables))
    expected = {k: (tuple(t.shape), t.dtype) for k, t in _unique_state(model).items()}
    found = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    check_header(expected, found)   # before loading: load_state_dict fails on a shape with a deep traceback
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    check_loaded(model, found, meta, expected)
    saved_acts = (config.get("logart_vision") or {}).get("activations")
    if saved_acts:
        _install_activations(model, saved_acts)
    model.to(device).eval()
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # tokenizers raises its own exception types for a damaged file
            raise LogartError(f"the tokenizer files cannot be read ({type(e).__name__}: {str(e)[:160]}).",
                              "copy the tokenizer files of the original model into the folder.") from e
    return model, tokenizer
