"""One line of the per-layer log (printed, and saved in report.json and in a resumable run's state)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    name: str
    shape: tuple
    k_hist: dict
    s_range: tuple
    loss_before: float     # Δw H Δwᵀ summed over rows, plain RTN at k = L, s = 1 (the log2 baseline)
    loss_after: float      # the same for the final weights
    seconds: float
    dead_inputs: int = 0
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        ks = " ".join(f"k{k}:{n}" for k, n in sorted(self.k_hist.items(), reverse=True))
        return (f"{self.name:38s} {str(tuple(self.shape)):12s} loss {self.loss_before:10.4g} -> {self.loss_after:10.4g}"
                f"  s {self.s_range[0]:.2f}-{self.s_range[1]:.2f}  {ks}  {self.seconds:5.1f}s")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRecord":
        """The inverse of `to_dict` after a JSON round trip (tuples and integer keys restored)."""
        return cls(**{**d, "shape": tuple(d["shape"]), "s_range": tuple(d["s_range"]),
                      "k_hist": {int(k): v for k, v in d["k_hist"].items()}})
