"""Token windows: the calibration sampler and the evaluation split of the GPTQ protocol (PROTOCOL.md)."""

from __future__ import annotations

import random
import warnings

import torch

from logart.errors import LogartError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one `LongTensor[1, N]`, without special tokens (no BOS), as the protocol tokenizes it.

    `verbose=False` silences the "longer than the model's maximum length" warning: the text is cut into
    windows afterwards, never fed whole.
    """
    if not isinstance(text, str):
        raise LogartError(f"tokenize() needs a str, got a {type(text).__name__}.",
                          "load the text first, e.g. logart.data.load_text('news').")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"]
    return ids.to(torch.long)


def _flat(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        return tokens[0]
    if tokens.dim() != 1:
        raise LogartError(f"expected token ids of shape [1, N] or [N], got {list(tokens.shape)}.",
                          "pass the output of logart.data.tokenize().")
    return tokens


def _check_length(n_tokens: int, needed: int, what: str) -> None:
    if n_tokens < needed:
        raise LogartError(f"the text has {n_tokens} tokens; {what} needs at least {needed}.",
                          "use a longer text or a smaller seqlen.")


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def calibration_windows(tokens: torch.Tensor, nsamples: int = 32, seqlen: int = 2048, seed: int = 0,
                        bos: int | None = None) -> torch.Tensor:
    """`nsamples` random windows `[nsamples, seqlen]`, drawn like GPTQ/LogART: after `random.seed(seed)`,
    `start = randint(0, n_tokens - seqlen - 1)` for each sample.

    `bos`: a token id that starts every window (models trained with BOS first, data/bos.py); the window then
    holds `seqlen - 1` text tokens, so its length stays `seqlen`.

    A private `random.Random(seed)` gives the same starts as seeding the global generator, without
    disturbing the caller's random state. The `- 1` (inherited) means the window never ends on the last
    token, so one window needs seqlen + 1 tokens; we ask for that instead of crashing in randint (Q9).
    """
    if nsamples < 1 or seqlen < 1 + (bos is not None):
        raise LogartError(f"nsamples and seqlen must be positive (seqlen >= 2 with BOS), got {nsamples} and {seqlen}.",
                          "pass nsamples >= 1 and seqlen >= 1.")
    flat = _flat(tokens)
    width = seqlen - (bos is not None)
    _check_length(flat.numel(), width + 1, f"one calibration window of {seqlen}")
    if flat.numel() < nsamples * width:
        warnings.warn(f"logart: the calibration text has {flat.numel()} tokens, fewer than {nsamples} windows x "
                      f"{seqlen}: its windows overlap (they repeat text). Use a longer text for independent windows.",
                      stacklevel=2)
    rng = random.Random(seed)
    starts = torch.tensor([rng.randint(0, flat.numel() - width - 1) for _ in range(nsamples)])
    return _with_bos(flat[starts[:, None] + torch.arange(width)], bos)


def eval_windows(tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = 16,
                 bos: int | None = None) -> torch.Tensor:
    """The first non-overlapping windows `[n, seqlen]`; the remainder is dropped. `max_windows=None`: all.

    `bos`: every window is BOS + the next `seqlen - 1` text tokens. The number of scored tokens per window is
    the same either way (the first position is never a label), and every text token is scored once.
    """
    if seqlen < 1 + (bos is not None) or (max_windows is not None and max_windows < 1):
        raise LogartError(f"seqlen and max_windows must be positive (seqlen >= 2 with BOS), got {seqlen} and "
                          f"{max_windows}.", "pass seqlen >= 1 and max_windows >= 1 (or None for every window).")
    flat = _flat(tokens)
    width = seqlen - (bos is not None)
    _check_length(flat.numel(), width, f"one evaluation window of {seqlen}")
    n = flat.numel() // width
    if max_windows is not None:
        n = min(n, max_windows)
    return _with_bos(flat[: n * width].reshape(n, width), bos)
