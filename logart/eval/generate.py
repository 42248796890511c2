"""A quick look at what a (quantized) model says: greedy continuation of a short prompt.

Greedy, so the text is deterministic and two models (fp32 vs quantized) can be compared side by side.
"""

from __future__ import annotations

import torch

from logart.errors import LogartError


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of `prompt` (only the new text, special tokens removed)."""
    from transformers import GenerationConfig

    if not isinstance(prompt, str) or not prompt:
        raise LogartError("generate_text() needs a non-empty prompt string.", "pass e.g. 'The capital of France is'.")
    if tokenizer is None:
        raise LogartError("there is no tokenizer to turn the prompt into tokens (the checkpoint folder has no "
                          "tokenizer files).", "save the tokenizer into the folder (tokenizer.save_pretrained(DIR)); "
                          "logart quantize --output saves it.")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # An explicit config: the model's own generation_config may ask for sampling (temperature, top_p).
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
