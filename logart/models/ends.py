"""The two ends of a causal LM, found through the Hugging Face model API rather than per-architecture names:
the input token embedding (`get_input_embeddings`) and the output head (`get_output_embeddings`), with their
full module names (`model.embed_tokens` / `lm_head` in LLaMA, `model.decoder.embed_tokens` in OPT,
`transformer.wte` in GPT-2)."""

from __future__ import annotations

from torch import nn


def _named(model: nn.Module, module) -> tuple[str, nn.Module] | None:
    if module is None:
        return None
    return next(((n, m) for n, m in model.named_modules() if m is module), None)


def input_embedding(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    """(full name, module) of the token embedding, or None when the model has no `nn.Embedding` there."""
    get = getattr(model, "get_input_embeddings", None)
    found = _named(model, get()) if get is not None else None
    return found if found is not None and isinstance(found[1], nn.Embedding) else None


def output_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(full name, module) of the output projection to the vocabulary, or None when it is not an `nn.Linear`."""
    get = getattr(model, "get_output_embeddings", None)
    found = _named(model, get()) if get is not None else None
    return found if found is not None and isinstance(found[1], nn.Linear) else None


def head_is_tied(model: nn.Module) -> bool:
    """True when the output head and the token embedding share one weight tensor (SmolLM2, GPT-2)."""
    head, emb = output_head(model), input_embedding(model)
    return head is not None and emb is not None and head[1].weight is emb[1].weight


def untie_head(model: nn.Module) -> None:
    """Give the output head its own copy of the shared weight and record it in the config, so that
    transformers does not tie the two again on save, on load or in `tie_weights()`."""
    head = output_head(model)[1]
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
