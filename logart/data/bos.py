"""Whether a model's token windows start with its BOS token.

Some families are trained with BOS at the start of every sequence (Llama-2, Gemma): calibrating or evaluating
them without it inflates their perplexity and gathers statistics on inputs the model never sees. Others
(SmolLM2, GPT-2, OPT in the protocol) are measured without it. The model's own convention decides:

what the tokenizer itself does, i.e. whether encoding with special tokens puts BOS first. A GGUF file states it
in `tokenizer.ggml.add_bos_token`, which transformers does not carry over to the tokenizer it builds (true in a
Gemma-3 GGUF, false in the SmolLM2 one): `carry_gguf_bos` sets it on the tokenizer when a model is loaded, so
the saved checkpoint, generation and evaluation all follow it.

`choice` forces either way ("yes" / "no"); "auto" follows the convention.
"""

from __future__ import annotations

from logart.errors import LogartError

CHOICES = ("auto", "yes", "no")


def gguf_add_bos(path) -> bool | None:
    """`tokenizer.ggml.add_bos_token` of a GGUF file, or None when the file does not say."""
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers needs gguf to read the file at all; without it there is nothing to ask
        return None
    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None or not field.data:
        return None
    return bool(field.parts[field.data[0]][0])


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` (special tokens on, as the model's users call it) starts with BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def carry_gguf_bos(tokenizer, gguf_path) -> None:
    """Make `tokenizer` add BOS exactly when the GGUF file says the model expects it."""
    flag = gguf_add_bos(gguf_path)
    if flag is not None and flag != tokenizer_adds_bos(tokenizer) and getattr(tokenizer, "bos_token_id", None) is not None:
        tokenizer.add_bos_token = flag


def resolve_bos(tokenizer, choice: str = "auto") -> tuple[int | None, str]:
    """(the BOS id every window starts with, or None; how that was decided, for the results row)."""
    if choice not in CHOICES:
        raise LogartError(f"bos must be one of {', '.join(CHOICES)}, got {choice!r}.",
                          "pass --bos auto (the model's convention), yes or no.")
    bos = getattr(tokenizer, "bos_token_id", None)
    if choice == "no":
        return None, "forced off"
    if choice == "yes":
        if bos is None:
            raise LogartError("--bos yes, but the tokenizer has no BOS token.",
                              "drop --bos yes, or use a tokenizer with a bos_token.")
        return bos, "forced on"
    return (bos if tokenizer_adds_bos(tokenizer) else None), "the tokenizer's convention"
