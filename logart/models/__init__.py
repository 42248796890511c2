"""models: architecture knowledge and nothing else (see DESIGN.md): loading, decoder discovery, tiny test models."""

from logart.models.adapter import Block, BlockInputs
from logart.models.decoder import (block_output, capture_block_inputs, decoder_layers,
                                   linear_layers, run_block)
from logart.models.loading import EMBEDDED, detach_gguf, load_causal_lm
from logart.models.tiny import TINY_ARCHS, byte_tokenizer, tiny_causal_lm

__all__ = [
    "EMBEDDED", "TINY_ARCHS", "Block", "BlockInputs", "block_output", "byte_tokenizer", "capture_block_inputs",
    "decoder_layers", "detach_gguf", "linear_layers", "load_causal_lm", "run_block", "tiny_causal_lm",
]
