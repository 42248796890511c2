"""Perplexity under the GPTQ protocol (PROTOCOL.md): per window the mean cross-entropy of the next-token
predictions (seqlen - 1 targets), `ppl = exp(mean over windows)`, fp32 logits, batch 1.

Equal windows make the mean of window means the token mean, as in GPTQ's `Σ nll·seqlen / (n·seqlen)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from logart.errors import LogartError


def _device(model) -> torch.device:
    return next(model.parameters()).device


def window_nlls(model, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity") -> torch.Tensor:
    """Mean negative log-likelihood (nats per token) of each window: `Tensor[n]`, fp32 on the CPU."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise LogartError(f"expected windows of shape [n, seqlen >= 2], got {list(windows.shape)}.",
                          "pass the output of logart.data.eval_windows() or eval_set().")
    device = _device(model)
    nlls = torch.empty(windows.shape[0], dtype=torch.float32)
    with torch.inference_mode():
        for i, window in enumerate(tqdm(windows, desc=desc, unit="window", disable=not progress)):
            ids = window[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            nlls[i] = F.cross_entropy(logits.float(), ids[0, 1:]).cpu()
    return nlls


def perplexity(model, windows: torch.Tensor, progress: bool = True) -> float:
    """`exp(mean over windows of the per-window mean CE)`, with a progress bar (ETA) unless `progress=False`."""
    return math.exp(window_nlls(model, windows, progress=progress).mean().item())
