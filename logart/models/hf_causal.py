"""The adapter for Hugging Face decoder-only LMs (LLaMA, Mistral, Qwen2, Gemma, Phi, OPT, GPT-2 families, found
generically: models/decoder.py).

Plan: [token embedding] + decoder blocks (chained) + [output head], the ends only when opted in.

    token embedding  data-free (an embedding's input is token ids): quantized first, so that the blocks are
                     calibrated on the embeddings the quantized model will use
    output head      last, with the statistics of its real inputs (the hidden states after the final norm,
                     captured by running the already quantized model up to the head)

Tied weights (SmolLM2, GPT-2: the head *is* the embedding matrix): when either end is opted in, `prepare` unties
them and the config says `tie_word_embeddings=False`, so the checkpoint reloads exactly what was packed. The end
that is not opted in keeps its full-precision copy; when both are, each gets its own packed copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from logart.errors import LogartError
from logart.models.adapter import AttentionSites, Block, BlockInputs
from logart.models.decoder import block_output, capture_block_inputs, decoder_layers, linear_layers, run_until
from logart.models.ends import head_is_tied, input_embedding, output_head, untie_head
from logart.models.roles import attention_layout, block_rope, role_of
from logart.models.sites import WeightSite


@dataclass
class HFCausalLM:
    """`embeddings` / `lm_head`: opt the ends in. `selects(name)`: False for modules kept in full precision (an
    ignored end is not untied). `log`: where the untying is announced (None: silent)."""

    embeddings: bool = False
    lm_head: bool = False
    selects: Callable[[str], bool] = lambda name: True
    log: Callable | None = print
    family: str = "causal-lm"

    def _ends(self, model) -> tuple:
        found = []
        for wanted, find, what in ((self.embeddings, input_embedding, "a token embedding (nn.Embedding)"),
                                   (self.lm_head, output_head, "an output head (nn.Linear)")):
            end = find(model) if wanted else None
            if wanted and end is None:
                raise LogartError(f"{type(model).__name__} has no {what} that logart can quantize.",
                                  "drop --embeddings / --lm-head for this model.")
            found.append(end if end is not None and self.selects(end[0]) else None)
        return tuple(found)

    def prepare(self, model: nn.Module) -> None:
        embedding, head = self._ends(model)
        if (embedding or head) and head_is_tied(model):
            head_name, emb_name = output_head(model)[0], input_embedding(model)[0]
            untie_head(model)
            if self.log:
                kept = (f"{emb_name} keeps the full-precision weight" if head and not embedding else
                        f"{head_name} keeps the full-precision weight" if embedding and not head else
                        "each is packed on its own")
                self.log(f"{head_name} and {emb_name} share one weight: untied ({kept}); the checkpoint records "
                         "tie_word_embeddings=false")

    def plan(self, model: nn.Module) -> list[Block]:
        embedding, head = self._ends(model)
        blocks = decoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        plan = [Block(embedding[0], embedding[1], [WeightSite(*embedding)], chained=False)] if embedding else []
        for b, block in enumerate(blocks):
            name = f"{prefix}.{b}"
            sites = [WeightSite(f"{name}.{n}", m, role_of(n)) for n, m in linear_layers(block).items()]
            plan.append(Block(name, block, sites))
        if head:
            plan.append(Block(head[0], head[1], [WeightSite(*head)], chained=False))
        return plan

    def capture(self, model: nn.Module, block: Block, windows: torch.Tensor) -> BlockInputs:
        if block.chained:   # a decoder block: its hidden states and the masks / positions every block takes
            return capture_block_inputs(model, windows, block.module)
        hidden = []
        run_until(model, block.module, windows, lambda args: hidden.append(args[0].detach().float().cpu()))
        return BlockInputs(torch.cat(hidden))

    def run(self, block: Block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return block_output(block.module(x, **kwargs))

    def attention(self, block: Block, kwargs: dict) -> AttentionSites | None:
        layout = attention_layout(block.module)
        if layout is None:
            return None
        if layout.qk_norm:
            raise LogartError("this model normalises queries and keys per head after their projections (q_norm / "
                              "k_norm, as Qwen3 and OLMo2 do); attention-aware rounding does not model that.",
                              "run without --attention-aware for this model.")
        cos, sin = block_rope(kwargs, layout.head_dim)
        return AttentionSites(f"{block.name}.{layout.query}", f"{block.name}.{layout.key}", layout.heads,
                              layout.kv_heads, layout.head_dim, cos, sin)
