"""Models larger than memory: the architecture on the meta device, one decoder block's weights at a time.

`open_streaming(folder, budget)` builds the model with accelerate's `init_empty_weights` (no memory for the
weights), loads everything outside the decoder blocks (embeddings, final norm, lm_head: needed to capture the
first block's inputs and to evaluate), and hands back a `BlockWeights`. The driver asks it to `load` a block
just before quantizing it; the tensors are read one by one from the memory-mapped safetensors shards and put
in place with accelerate's `set_module_tensor_to_device`. Once the block is done the caller packs its linears
(io/), which drops their float weights: resident weights stay at the non-block tensors, one float block and
the packed blocks so far.

`budget` (bytes, optional) is the ceiling the loader honours for resident weights: it refuses, with the
number it would need, to load a block that would cross it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from logart.errors import LogartError
from logart.models.decoder import decoder_layers

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def parse_size(text) -> int:
    """'300MB', '1.5GiB', '2G', '123456' -> bytes (decimal units for MB/GB, binary for MiB/GiB)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise LogartError(f"cannot read the memory size {text!r}.", "write it like 300MB, 1.5GB or 2GiB.")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = " KMGT".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def shard_index(folder) -> dict[str, Path]:
    """{tensor name: shard file} of a Hugging Face safetensors checkpoint folder."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    if (folder / SINGLE).is_file():
        from safetensors import safe_open
        with safe_open(str(folder / SINGLE), framework="pt") as f:
            return {name: folder / SINGLE for name in f.keys()}
    raise LogartError(f"{folder} has no safetensors weights ({INDEX} or {SINGLE}); streaming reads them block by block.",
                      "convert the model first: `logart convert MODEL FOLDER` writes a sharded safetensors folder.")


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers that are really in memory (not on meta), each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _malloc_trim() -> None:
    """glibc keeps freed heap memory for reuse; without a trim the process grows by tens of MiB per block
    (measured on SmolLM2: 50 MiB per block untrimmed, flat with the trim). A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor(model, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


class BlockWeights:
    """Loads the weights of one decoder block (by its module name) from the shards, within a budget."""

    def __init__(self, model, index: dict[str, Path], dtype: torch.dtype, budget: int | None = None):
        self.model, self.index, self.dtype, self.budget = model, index, dtype, budget
        self.peak = resident_bytes(model)

    def _load_tensors(self, names) -> None:
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        by_shard = defaultdict(list)
        for name in names:
            by_shard[self.index[name]].append(name)
        for shard, members in by_shard.items():
            with safe_open(str(shard), framework="pt") as f:
                for name in members:
                    # clone: a tensor read from the memory-mapped shard keeps the whole mapping alive, so the
                    # norms that stay resident would pin every page of the shard that was ever touched.
                    set_module_tensor_to_device(self.model, name, "cpu", value=f.get_tensor(name).clone(),
                                                dtype=self.dtype)

    def names_under(self, prefix: str) -> list[str]:
        return [n for n in self.index if n.startswith(prefix + ".")]

    def _bytes(self, names) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(_tensor(self.model, n).numel() for n in names) * size

    def _check_budget(self, what: str, names) -> None:
        if self.budget is None:
            return
        now, need = resident_bytes(self.model), self._bytes(names)
        if now + need > self.budget:
            raise LogartError(f"loading {what} needs {need / 2**20:.1f} MiB on top of the {now / 2**20:.1f} MiB of "
                              f"weights already in memory, over the budget of {self.budget / 2**20:.1f} MiB.",
                              f"raise --max-memory to at least {(now + need) / 2**20 * 1.05:.1f}MiB.")

    def load(self, prefix: str) -> None:
        """Put the weights of the module `prefix` (a decoder block) in memory."""
        names = self.names_under(prefix)
        self._check_budget(prefix, names)
        self._load_tensors(names)
        self.peak = max(self.peak, resident_bytes(self.model))

    def release(self) -> None:
        """After the caller packed or dropped a block: hand the freed memory back to the system and record the
        resident size."""
        gc.collect()
        _malloc_trim()
        self.peak = max(self.peak, resident_bytes(self.model))


def open_streaming(folder, budget: int | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, BlockWeights): the model of a local Hugging Face folder with only its non-block
    weights in memory. Blocks are loaded by `BlockWeights.load(block module name)`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LogartError(f"streaming needs a local Hugging Face folder with config.json; {folder} is not one.",
                          "convert the model first: `logart convert MODEL FOLDER` (works for the embedded "
                          "smollm2-135m and .gguf files).")
    index = shard_index(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with init_empty_weights():   # parameters on meta; buffers (RoPE frequencies) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    blocks = decoder_layers(model)
    block_prefix = next(n for n, m in model.named_modules() if m is blocks) + "."
    weights = BlockWeights(model, index, dtype, budget)
    outside = [n for n in index if not n.startswith(block_prefix)]
    weights._check_budget("the weights outside the decoder blocks", outside)
    weights._load_tensors(outside)
    if hasattr(model, "tie_weights"):
        model.tie_weights()   # a tied lm_head points at the embedding just loaded
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(block_prefix)]
    if missing:
        raise LogartError(f"{folder} lacks {len(missing)} weight(s) outside the decoder blocks, e.g. {missing[:3]}.",
                          "the checkpoint is incomplete; convert or download it again.")
    weights.release()
    return model, tokenizer, weights
