"""Interrupted runs (issue #14): a `logart quantize` subprocess is stopped with SIGINT or SIGKILL at random points,
then the same command is rerun. The final checkpoint must be byte-identical to an uninterrupted run's, and no
temporary (`.NAME.tmp-PID-*`, `NAME.partial`) may be left behind."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from logart.models import byte_tokenizer, tiny_causal_lm

BLOCKS = 4
FINAL = ("model.safetensors", "quant_params.safetensors", "config.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    tiny_causal_lm("llama", num_hidden_layers=BLOCKS).save_pretrained(root / "tiny")
    byte_tokenizer().save_pretrained(root / "tiny")
    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over a lazy dog while logart quantizes every weight".split()
    (root / "text.txt").write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=g)))
    reference = _final(_run(root, root / "reference"))
    return root, reference


def _argv(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "logart.cli", "quantize", "--model", str(root / "tiny"), "--recipe", "logart",
            "--bits", "3", "--llr-iters", "40", "--nsamples", "4", "--seqlen", "64", "--calib",
            str(root / "text.txt"), "--no-eval", "--quiet", "--threads", "1", "--output", str(out),
            "--results", str(root / "results.csv")]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LOGART_CACHE": os.environ.get("LOGART_CACHE", "")}


def _run(root: Path, out: Path) -> Path:
    done = subprocess.run(_argv(root, out), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def _final(out: Path) -> dict:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FINAL}


def _blocks_done(out: Path) -> int:
    try:
        return json.loads((Path(f"{out}.partial") / "state.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def _interrupt(root: Path, out: Path, sig: int, after_blocks: int, delay: float) -> int:
    """Start the run, wait until `after_blocks` blocks are finished and `delay` more seconds, send `sig`."""
    proc = subprocess.Popen(_argv(root, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    while _blocks_done(out) < after_blocks and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT and proc.returncode == 130:
        assert "rerun the same command to resume" in err and "Traceback" not in err, err
    return proc.returncode


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or p.name.endswith((".partial", ".tmp"))
                  or ".old-" in p.name)


# Seeded "random points": a number of finished blocks, then a random extra delay (which also lands in the save).
POINTS = [(s, *p) for s, p in zip((signal.SIGINT, signal.SIGKILL, signal.SIGKILL),
                                  [(r.randint(1, BLOCKS - 1), round(r.uniform(0, 0.4), 2))
                                   for r in [random.Random(14)] for _ in range(3)])]


@pytest.mark.parametrize("sig, after_blocks, delay", POINTS,
                         ids=[f"{signal.Signals(s).name}-after-{b}-blocks-plus-{d}s" for s, b, d in POINTS])
def test_an_interrupted_run_resumes_to_the_same_bytes(setup, tmp_path, sig, after_blocks, delay):
    root, reference = setup
    run_root = tmp_path / "runs"
    run_root.mkdir()
    out = run_root / "q"
    code = _interrupt(root, out, sig, after_blocks, delay)
    assert code in (0, 130, -signal.SIGKILL), code
    if code != 0:   # the run was stopped (it may also have finished first: then there is nothing to resume)
        _run(root, out)   # the same command again: resumes after the last finished block
    assert _final(out) == reference
    assert _leftovers(run_root) == []


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    from logart.atomic import remove_stale, write_folder

    target = tmp_path / "q"
    dead = 2 ** 22 + 12345   # above the default pid_max: no such process
    (tmp_path / f".q.tmp-{dead}-abc").mkdir()
    (tmp_path / f".q.tmp-{dead}-abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".q.old-{dead}-").mkdir()
    live = tmp_path / f".q.tmp-{os.getpid()}-xyz"
    live.mkdir()
    users = [tmp_path / ".q.tmp-notes", tmp_path / "q.tmp-1-mine", tmp_path / f".other.tmp-{dead}-x"]
    for f in users:
        f.write_text("the user's")
    write_folder(target, lambda tmp: (tmp / "a.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "new"
    assert live.is_dir() and all(f.read_text() == "the user's" for f in users)
    assert not (tmp_path / f".q.tmp-{dead}-abc").exists() and not (tmp_path / f".q.old-{dead}-").exists()
    assert remove_stale(target) == []
