"""Architecture knowledge for decoder-only LMs, found generically (no per-architecture code, DESIGN.md):
the stack of decoder blocks, the Linear layers in a block, and the inputs the first block receives.

The block stack is the ModuleList of same-class modules that holds the most parameters: `model.layers`
(LLaMA, Mistral, Qwen2, Gemma, Phi), `model.decoder.layers` (OPT), `transformer.h` (GPT-2 family). Lists
nested inside a block (MoE experts) always hold fewer parameters than the list of blocks around them.
"""

from __future__ import annotations

import inspect
import torch
from torch import nn

from logart.calib.hooks import StopForward
from logart.errors import LogartError
from logart.models.adapter import BlockInputs


def _is_block_list(module: nn.Module) -> bool:
    """A non-empty ModuleList of same-class composite modules (not of bare layers) that carry parameters."""
    children = list(module.children())
    return (isinstance(module, nn.ModuleList) and len(children) > 0
            and len({type(c) for c in children}) == 1
            and any(True for _ in children[0].children()) and any(True for _ in children[0].parameters()))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in execution order."""
    candidates = [m for m in model.modules() if _is_block_list(m)]
    if not candidates:
        raise LogartError(f"this model has no decoder blocks logart can find: {type(model).__name__} has no "
                          "nn.ModuleList of identical blocks with parameters.",
                          "pass a Hugging Face decoder LM (LLaMA, Mistral, Qwen2, Gemma, Phi, OPT, GPT-2 style).")
    return max(candidates, key=_n_params)


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` of a block by qualified name (`self_attn.q_proj`, ...), in registration order.

    GPT-2's `Conv1D` is not an `nn.Linear` (its weight is transposed) and is not returned.
    """
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _named_arguments(module: nn.Module, args: tuple, kw: dict) -> dict:
    """A block call as one dict by parameter name. GPT-2 passes the attention mask positionally, LLaMA by
    keyword: binding to the signature makes both replayable as `block(hidden, **kwargs)`."""
    signature = inspect.signature(module.forward)
    named = {}
    for name, value in signature.bind(*args, **kw).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def run_until(model: nn.Module, module: nn.Module, windows: torch.Tensor, on_input, with_kwargs: bool = False) -> None:
    """Run each window (batch 1) through `model` only as far as `module`: `on_input(args)` (or
    `on_input(args, kwargs)` with `with_kwargs`) sees what the model passes to it, then the forward stops.
    Nothing after `module` is computed, whatever the architecture."""
    device = next(model.parameters()).device

    def hook(_module, args, kw=None):
        if with_kwargs:
            on_input(args, kw)
        else:
            on_input(args)
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    try:
        # no_grad, not inference_mode: inference tensors could not be reused later under autograd
        # (block reconstruction backpropagates through blocks fed with these inputs).
        with torch.no_grad():
            for window in windows:
                try:
                    model(input_ids=window[None].to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, block: nn.Module | None = None) -> BlockInputs:
    """Run each window (batch 1) into `block` (default: the first decoder block) and record its inputs, then stop
    the forward.

    A forward pre-hook with `with_kwargs=True` sees exactly what the model passes to its first block,
    whatever the architecture: no per-model "Catcher" class as in the reference code.
    """
    first = decoder_layers(model)[0] if block is None else block
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def record(args, kw):
        named = _named_arguments(first, args, kw)
        x = named.pop(next(iter(named)))  # the first parameter is the hidden states in every HF block
        hidden.append(x.detach().float().cpu())
        if not kwargs:
            kwargs.update({k: _detach(v) for k, v in named.items()})

    run_until(model, first, windows, record, with_kwargs=True)
    if len(hidden) != len(windows):
        raise LogartError("the first decoder block was not called for every window.",
                          "check that the model's forward runs its decoder blocks (no cached outputs).")
    # A cache object or use_cache=True in the kwargs would make block-by-block calls grow a KV cache.
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return BlockInputs(torch.cat(hidden), kwargs)


def block_output(output) -> torch.Tensor:
    """The hidden states a block returns: some blocks return a tensor, others a tuple (hidden, attn, ...)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call one block on `hidden[b, seqlen, d]` with the captured kwargs and return its output hidden states."""
    return block_output(block(hidden, **kwargs))
