"""What the packed checkpoint costs: effective bits per weight and the size against full precision.

Effective bits of the quantized linears = 8 x (bytes of their qweight + row_scale + table_index + tables) /
their number of weights (out x in): the n-bit codes (with the padding to 32 codes per row), plus the per-row
float32 scale and int32 table index, plus the small per-layer dequant tables. Biases stay in full precision and
are counted with the other fp tensors, not in the effective bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logart.errors import LogartError
from logart.io.checkpoint import PARAMS, WEIGHTS
from logart.reporting.run import PACKED_PARTS, RunFolder


@dataclass
class Sizes:
    weights: int = 0                                  # quantized weights (sum of out x in)
    parts: dict = field(default_factory=dict)         # packed bytes by part (qweight, row_scale, ...)
    per_layer: dict = field(default_factory=dict)     # name -> effective bits of that layer
    tensor_bytes: int = 0                             # every tensor of model.safetensors, as stored
    fp32_bytes: int = 0                               # the same tensors in float32 (packed linears as out x in)
    file_bytes: int = 0                               # model.safetensors on disk (with its header)
    params_file_bytes: int = 0                        # quant_params.safetensors (for reports, not inference)

    @property
    def packed_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def effective_bits(self) -> float:
        return 8 * self.packed_bytes / self.weights if self.weights else float("nan")

    def bits_of(self, part: str) -> float:
        return 8 * self.parts.get(part, 0) / self.weights if self.weights else float("nan")

    @property
    def linear_fp32_bytes(self) -> int:
        return 4 * self.weights


def measure(run: RunFolder) -> Sizes | None:
    """Sizes of the run's packed checkpoint (read from the file header), or None when the run wrote none."""
    if not run.packed:
        return None
    info = run.tensor_info()
    sizes = Sizes(parts={p: 0 for p in PACKED_PARTS})
    packed_names = set()
    for name in (run.quant_config or {}).get("modules", []):
        out, inp = run.shape(name)
        keys = [f"{name}.{p}" for p in PACKED_PARTS]
        missing = [k for k in keys if k not in info]
        if missing:
            raise LogartError(f"{run.path / WEIGHTS} lacks {missing[0]} although config.json lists {name} as packed.",
                              "the checkpoint is incomplete; rerun logart quantize.")
        for part, key in zip(PACKED_PARTS, keys):
            sizes.parts[part] += info[key][1]
        packed_names.update(keys)
        sizes.weights += out * inp
        sizes.per_layer[name] = 8 * sum(info[k][1] for k in keys) / (out * inp)
    sizes.tensor_bytes = sum(nbytes for _, nbytes in info.values())
    sizes.fp32_bytes = 4 * sizes.weights + sum(4 * numel for k, (numel, _) in info.items() if k not in packed_names)
    sizes.file_bytes = (run.path / WEIGHTS).stat().st_size
    params = run.path / PARAMS
    sizes.params_file_bytes = params.stat().st_size if params.is_file() else 0
    return sizes
