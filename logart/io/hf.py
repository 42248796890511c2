"""transformers integration: `AutoModelForCausalLM.from_pretrained(DIR)` on a folder written by `save_quantized`.

    import logart                                   # installs a cheap import hook, nothing heavy
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/w4")   # LogLinear layers, weights bit-identical
    logart.io.kernel.enable(model)                  # optional: the compiled CPU kernel

`import logart` does not import transformers: it puts a one-shot finder on `sys.meta_path` that imports this
module right after `transformers.quantizers.auto` has loaded (or at once where transformers is already
imported). Importing this module registers `LogartConfig` (`register_quantization_config("logart")`) and
`LogartHfQuantizer` (`register_quantizer("logart")`).

The quantizer swaps every packed module named in `quantization_config["modules"]` for an empty `LogLinear`
(or `LogEmbedding`) shell with that module's own bits and group size (`module_specs`) before the weights load
(its table count read from the safetensors header), then checks the result
as strictly as `load_quantized` does: every tensor present, none extra, same shape and dtype, checksum equal
to the one recorded at save time. transformers would only log a missing key and fill it at random (and with a
quantizer present it does not even flag a wrong shape); here that is an error.

Only transformers' quantizer modules are imported at the top: this file can be imported while
`transformers.modeling_utils` is still being imported.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from logart.io.checkpoint import (FORMAT_VERSION, _unique_state, check_header, check_loaded, module_spec,
                                  packed_shell)
from logart.io.linear import LogLinear
from logart.errors import LogartError
from logart.version import __version__

logger = logging.getLogger(__name__)
QUANT_METHOD = "logart"


class LogartConfig(QuantizationConfigMixin):
    """The `quantization_config` of a logart checkpoint, as transformers holds it. Every key written by
    `save_quantized` (bits, group_size, method, mode, symmetric, hardware_approx, recipe, modules, producer, ...)
    is kept as an attribute and written back unchanged by `to_dict`."""

    def __init__(self, bits: int = 4, group_size: int = -1, modules=None, format_version: int = FORMAT_VERSION,
                 **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.bits = bits
        self.group_size = group_size
        self.modules = list(modules or [])
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


def _header(files: list[str]) -> tuple[dict, dict]:
    """({tensor name: (shape, torch dtype)}, merged metadata) of the checkpoint files."""
    from safetensors import safe_open

    shapes, meta = {}, {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise LogartError(f"{path} is not a safetensors file; logart checkpoints are safetensors only.",
                              "load the folder written by logart.save_quantized.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta.update(f.metadata() or {})
                for k in f.keys():
                    s = f.get_slice(k)
                    shapes[k] = (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
        except LogartError:
            raise
        except Exception as e:  # truncated or garbled header
            raise LogartError(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupted.",
                              "re-export the checkpoint.") from e
    return shapes, meta


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class LogartHfQuantizer(HfQuantizer):
    """Loads pre-quantized logart checkpoints (packed n-bit codes + dequant tables) into `LogLinear` layers.
    Quantizing on the fly inside `from_pretrained` is not supported: run `logart.quantize` first."""

    requires_calibration = True  # transformers then refuses pre_quantized=False with its own message

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []
        self.expected: dict = {}  # tensor name -> (shape, dtype) of the skeleton, before loading

    def validate_environment(self, *args, **kwargs):
        qc = self.quantization_config
        if getattr(qc, "format_version", None) != FORMAT_VERSION:
            raise LogartError(f"this checkpoint uses logart format version {getattr(qc, 'format_version', None)}; "
                              f"this logart ({__version__}) reads version {FORMAT_VERSION}.",
                              "re-export the checkpoint with this logart version.")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise LogartError("logart checkpoints cannot be offloaded to disk.", "load on the CPU or a GPU.")

    def update_dtype(self, dtype):
        # The packed layers hold fp32 scales and tables and compute in fp32; the unquantized tensors were saved
        # in fp32. Casting any of them would break the bit-exact round trip.
        if dtype is not None and dtype != torch.float32:
            logger.warning("logart: packed checkpoints load in float32 (requested %s); for a float16 model use "
                           "logart.io.export.export_dequantized.", dtype)
        return torch.float32

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # everything arrives packed

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_files = [str(f) for f in (checkpoint_files or [])]
        shapes, _ = _header(self.checkpoint_files)
        qc = self.quantization_config.to_dict()
        for name in qc["modules"]:
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise LogartError(f"the checkpoint lists a quantized module {name!r} that this "
                                  f"{type(model).__name__} lacks.",
                                  "load it with the model class it was saved from (AutoModelForCausalLM).") from e
            if isinstance(module, LogLinear):
                continue
            table_shape = shapes.get(f"{name}.tables", ((1, 2 ** module_spec(qc, name)["bits"]), None))[0]
            n_tables = table_shape[0] if len(table_shape) == 2 else 1
            with torch.device("meta"):
                shell = packed_shell(module, name, qc, n_tables)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, shell)
        # With a quantizer present transformers assigns a tensor of the wrong shape without a word: keep the
        # skeleton's shapes to check against after loading.
        self.expected = {k: (tuple(t.shape), t.dtype) for k, t in _unique_state(model).items()}
        # Names, shapes and dtypes now, before transformers loads anything: otherwise it would first print its own
        # "newly initialized weights" table for a missing tensor, a misleading message before logart's refusal.
        # Tied targets (an lm_head tied to the embeddings) are not in the file; transformers ties them after loading.
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        _in_files(self.checkpoint_files, check_header,
                  {k: v for k, v in self.expected.items() if k not in tied or k in shapes}, shapes)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        verify_loaded(model, self.checkpoint_files, self.expected)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True  # the buffers are plain tensors: save_pretrained writes a loadable logart checkpoint

    @property
    def is_trainable(self) -> bool:
        return False


def _in_files(files: list[str], check, *args) -> None:
    """Run `check(*args)`; its refusal names the checkpoint file(s)."""
    try:
        check(*args)
    except LogartError as e:
        raise LogartError(f"{', '.join(map(str, files))}: {e.problem}", e.fix) from e


def verify_loaded(model, files: list[str], expected_shapes: dict | None = None) -> None:
    """`check_loaded` (io/checkpoint.py) against the headers of the checkpoint `files`."""
    shapes, meta = _header(files)
    _in_files(files, check_loaded, model, shapes, meta, expected_shapes)


def register() -> None:
    """Make transformers aware of quant_method "logart" (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LogartConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LogartHfQuantizer)


register()
