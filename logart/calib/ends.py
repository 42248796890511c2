"""The opt-in ends of the model (`Recipe.quantize_embeddings`, `Recipe.quantize_lm_head`; both off by default).

    token embedding  data-free (weight-SSE search, round to nearest: an embedding has no input statistics),
                     quantized *before* calibration so that the blocks are calibrated on the embeddings the
                     quantized model will use
    output head      quantized after the last block with the Hessian of its real inputs: the hidden states
                     after the model's final norm (whatever the architecture calls it), captured by a hook on
                     the head while the already quantized model runs each window; the forward stops there, so
                     no logits are computed

Tied weights (SmolLM2, GPT-2: the head *is* the embedding matrix): when either end is opted in, the two are
untied and the config says `tie_word_embeddings=False`, so the checkpoint reloads exactly what was packed.
The end that is not opted in keeps its full-precision copy; when both are, each gets its own packed copy
(the head's codes chosen with its Hessian, the embedding's without data), which costs one extra low-bit matrix.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from logart.calib.hessian import HessianAccumulator
from logart.calib.layer import quantize_linear
from logart.models.decoder import run_until
from logart.models.ends import head_is_tied, input_embedding, output_head, untie_head
from logart.quant import LogartError


def opted_in_ends(model, recipe, log=print):
    """(embedding, head): each `(full name, module, effective recipe)` when opted in and not ignored, else None.
    Unties a tied head first and says what happens to each end."""
    ends = []
    for wanted, find, what in ((recipe.quantize_embeddings, input_embedding, "a token embedding (nn.Embedding)"),
                               (recipe.quantize_lm_head, output_head, "an output head (nn.Linear)")):
        found = find(model) if wanted else None
        if wanted and found is None:
            raise LogartError(f"{type(model).__name__} has no {what} that logart can quantize.",
                              "drop --embeddings / --lm-head for this model.")
        effective = recipe.for_module(found[0]) if found else None
        ends.append((*found, effective) if effective is not None else None)
    embedding, head = ends
    if (embedding or head) and head_is_tied(model):
        head_name, emb_name = output_head(model)[0], input_embedding(model)[0]
        untie_head(model)
        if log:
            kept = (f"{emb_name} keeps the full-precision weight" if head and not embedding else
                    f"{head_name} keeps the full-precision weight" if embedding and not head else
                    "each is packed on its own")
            log(f"{head_name} and {emb_name} share one weight: untied ({kept}); the checkpoint records "
                "tie_word_embeddings=false")
    return embedding, head


def quantize_embedding(name, module, recipe, codebook):
    """Data-free: the effective recipe's codebook and search, scored by weight SSE, rounded to nearest."""
    return quantize_linear(module, codebook, replace(recipe, rounding="rtn"), None, name=name)


def head_hessian(model, head, windows: torch.Tensor) -> HessianAccumulator:
    """H of the head's inputs over the calibration windows (batch 1, as the blocks)."""
    acc = HessianAccumulator(head.in_features)
    run_until(model, head, windows, lambda args: acc.add_batch(args[0]))
    return acc


def quantize_head(model, name, module, recipe, codebook, calib):
    hessian = None
    if recipe.needs_calibration:
        if calib is None:
            raise ValueError("this recipe needs calibration windows for the output head")
        hessian = head_hessian(model, module, calib)
    return quantize_linear(module, codebook, recipe, hessian, name=name)
