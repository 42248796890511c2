"""Running a module only as far as it is needed: forward pre-hooks that hand over inputs and stop the forward.

Used by the statistics passes (every hooked weight has seen its input: the rest of the block is skipped) and by
the adapters' input capture (the model runs only up to the block being captured).
"""

from __future__ import annotations

from typing import Callable

from torch import nn


class StopForward(Exception):
    """Raised by a pre-hook once the forward has reached every module it was run for."""


def forward_until_seen(call: Callable[[], object], modules: dict[str, nn.Module], on_input, stop_early: bool) -> None:
    """Run `call()` calling `on_input(name, input)` before each module of `modules` ({name: module}); with
    `stop_early`, stop as soon as every one of them has been reached (blocks call each layer once per forward).
    What `on_input` sees is the same either way; only the unneeded tail is skipped."""
    pending = set(modules)

    def pre(name):
        def hook(_m, args):
            on_input(name, args[0])
            pending.discard(name)
            if stop_early and not pending:
                raise StopForward
        return hook

    handles = [modules[n].register_forward_pre_hook(pre(n)) for n in modules]
    try:
        call()
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
