"""io: see DESIGN.md.

`install_transformers_hook()` (called by `import logart`) makes `transformers.AutoModelForCausalLM.from_pretrained`
load logart checkpoints (logart/io/hf.py) without importing transformers now: a one-shot finder on
`sys.meta_path` imports logart.io.hf right after `transformers.quantizers.auto` has been executed.
"""

import sys

_TRIGGER = "transformers.quantizers.auto"


def _register() -> None:
    try:
        import logart.io.hf  # noqa: F401  (registers at import)
    except Exception as e:  # never break transformers itself: say why logart checkpoints will not load
        import warnings
        warnings.warn(f"logart: could not register the 'logart' quantization method with transformers "
                      f"({type(e).__name__}: {e}); load logart checkpoints with logart.load_quantized.")


class _TransformersHook:
    """A meta path finder that only watches `transformers.quantizers.auto` and chains its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # this loader instance serves this one module
        return spec


def install_transformers_hook() -> None:
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _TransformersHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersHook())
