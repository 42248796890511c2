"""Fixtures shared by the vision tests: synthetic Fashion-MNIST files and untrained cached Fashion models, so that
the command-line paths run end to end without the real dataset or a training run."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session", autouse=True)
def _keep_user_cache_clean(tmp_path_factory):
    """Tests write their token windows into a temporary cache, not into ~/.cache/logart, where every run would leave
    new entries behind. The user's compiled kernels and trained Fashion-MNIST models are linked in: building them
    again would cost minutes a session. Session-wide, so that module fixtures see it too."""
    from logart.data import cache_dir

    root = tmp_path_factory.mktemp("logart-cache")
    for shared in ("kernels", "fashion"):
        try:
            (cache_dir() / shared).mkdir(parents=True, exist_ok=True)
            (root / shared).symlink_to(cache_dir() / shared, target_is_directory=True)
        except OSError:   # a read-only home: the tests build what they need in the temporary cache
            pass
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOGART_CACHE", str(root))
        yield root


@pytest.fixture
def write_idx():
    """write_idx(path, uint8 array): an idx file as Fashion-MNIST ships them (gzip)."""
    return _write_idx


@pytest.fixture
def synthetic_fashion(tmp_path, monkeypatch):
    """Random Fashion-MNIST files (64 training, 40 test images) in $LOGART_FASHION_MNIST and an empty
    $LOGART_CACHE; returns cache_untrained(name), which puts an untrained model where the trained one is cached."""
    from safetensors.torch import save_file

    from logart.models import fashion

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 40)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    monkeypatch.setenv("LOGART_FASHION_MNIST", str(tmp_path))
    monkeypatch.setenv("LOGART_CACHE", str(tmp_path / "cache"))

    def cache_untrained(name: str) -> None:
        cfg = fashion.TRAINING.get(name, fashion.TrainConfig())
        stem = tmp_path / "cache" / "fashion" / f"{name}-{fashion._key(name, cfg)}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_file(fashion.ARCHS[name]().state_dict(), stem.with_suffix(".safetensors"))
        stem.with_suffix(".json").write_text(json.dumps({"accuracy": 10.0}))

    return cache_untrained
