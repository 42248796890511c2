"""Byte identity of packed checkpoints across a refactor: sha256 of every safetensors file a run writes.

    python bench/identity.py --record bench/results/identity.json             # on the commit before the change
    python bench/identity.py --check bench/results/identity.json              # after it: exit 1 on any difference
    python bench/identity.py --check ... --real                                # also the SmolLM2 cases (minutes)
    python bench/identity.py --side-by-side OLD_TREE --only smollm2-logart-fast-w4-pc --reps 2 --out F.json
        # the real cases from a checkout of the old commit (git worktree add OLD_TREE COMMIT) and from this one,
        # alternating old, new, new, old, ...: hashes equal? quantization time ratio of the medians

Tiny cases (seconds each): seeded tiny decoders through `logart.quantize` + `save_quantized`, covering the
recipes and options that touch the driver (search, GPTQ, LLR, full-precision targets, attention-aware rounding,
overrides, ignore, both ends). Real cases: `logart quantize` on SmolLM2-135M under PROTOCOL.md's calibration
(the two checkpoints issue #13 names: `logart-fast` W4 per channel and `log2-rtn` W3), timed.

Hashes are of the safetensors files only: config.json prints the recipe, whose layout may change while the
weights must not. They hold on one machine (one BLAS); compare runs of the same machine. Each file is hashed in
canonical form (metadata sorted by key, then every tensor's name, dtype, shape and bytes in name order): the
safetensors writer serialises its metadata map in a per-process random order (a Rust HashMap), so the raw
bytes of two runs of the same code already differ in the header.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

TINY_CASES = {
    "llama-logart-fast-w4": ("llama", "logart-fast", dict(bits=4)),
    "llama-log2-rtn-w3": ("llama", "log2-rtn", dict(bits=3)),
    "llama-gptq-w3-g32": ("llama", "gptq", dict(bits=3, group_size=32)),
    "llama-rtn-w4-g48": ("llama", "rtn", dict(bits=4, group_size=48)),
    "llama-logart-w3": ("llama", "logart", dict(bits=3, llr_iters=20)),
    "llama-logart-w3-attention": ("llama", "logart", dict(bits=3, llr_iters=20, attention_aware=True)),
    "llama-logart-w3-nofp": ("llama", "logart", dict(bits=3, llr_iters=20, fp_target=0.0)),
    "llama-llr-w3-abs-row": ("llama", "logart-fast", dict(bits=3, rounding="llr", llr_iters=20, abs_per_row=True)),
    "llama-ends-overrides": ("llama", "logart-fast", dict(
        bits=3, quantize_lm_head=True, quantize_embeddings=True, ignore=(r"layers\.1\.mlp\.up_proj",),
        overrides=(r"down_proj:bits=4,recipe=gptq", r"layers\.0\.self_attn:method=log2,group_size=32"))),
    "opt-logart-w3": ("opt", "logart", dict(bits=3, llr_iters=20)),
    "gpt2-logart-fast-w4-head": ("gpt2", "logart-fast", dict(bits=4, quantize_lm_head=True)),
    "gemma-logart-fast-w3-g32": ("gemma", "logart-fast", dict(bits=3, group_size=32)),
}

REAL_CASES = {
    "smollm2-logart-fast-w4-pc": ["--recipe", "logart-fast", "--bits", "4"],
    "smollm2-log2-rtn-w3-pc": ["--recipe", "log2-rtn", "--bits", "3"],
}


def canonical_sha256(path: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _hashes(folder: Path) -> dict:
    return {f.name: canonical_sha256(f) for f in sorted(folder.glob("*.safetensors"))}


def tiny_case(arch: str, recipe: str, options: dict) -> dict:
    import logart
    from logart.models import tiny_causal_lm

    model = tiny_causal_lm(arch)
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    result = logart.quantize(model, recipe, calib, progress=False, log=None, nsamples=4, seqlen=32, **options)
    with tempfile.TemporaryDirectory() as tmp:
        logart.save_quantized(model, Path(tmp) / "ckpt", result.params, result.recipe)
        return _hashes(Path(tmp) / "ckpt")


def real_case(args: list[str], threads: int, tree: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        cmd = [sys.executable, "-m", "logart.cli", "quantize", "--model", "smollm2-135m", *args, "--no-eval",
               "--output", str(out), "--threads", str(threads), "--results", str(Path(tmp) / "results.csv")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                       cwd=tree or None)
        seconds = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text())
        return {"hashes": _hashes(out), "wall_seconds": round(seconds, 1), "quant_seconds": report["quant_seconds"]}


def side_by_side(old_tree: Path, cases: dict, reps: int, threads: int) -> dict:
    """Each real case from `old_tree` and from this tree, alternating (old, new, new, old, ...)."""
    import statistics

    new_tree = Path(__file__).resolve().parent.parent
    out = {}
    for name, case in cases.items():
        runs = {"old": [], "new": []}
        for rep in range(reps):
            for which in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                run = real_case(case, threads, old_tree if which == "old" else new_tree)
                runs[which].append(run)
                print(f"{name:32s} {which}: quant {run['quant_seconds']} s", file=sys.stderr)
        med = {k: statistics.median(r["quant_seconds"] for r in v) for k, v in runs.items()}
        hashes = [r["hashes"] for r in runs["old"] + runs["new"]]
        out[name] = {"same_checkpoint": all(h == hashes[0] for h in hashes), "median_quant_seconds": med,
                     "new_over_old": round(med["new"] / med["old"], 4), "runs": runs}
        print(f"{name}: same checkpoint {out[name]['same_checkpoint']}, quant time new/old "
              f"{out[name]['new_over_old']} (medians {med['new']} / {med['old']} s)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", type=Path)
    g.add_argument("--check", type=Path)
    g.add_argument("--side-by-side", type=Path, metavar="OLD_TREE")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON of the side-by-side run")
    p.add_argument("--real", action="store_true", help="also the SmolLM2 cases (about 10 minutes on 2 cores)")
    p.add_argument("--only", nargs="*", help="case names to run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import logart
    print(f"logart from {Path(logart.__file__).parent}", file=sys.stderr)
    cases = dict(TINY_CASES)
    if args.real:
        cases.update(REAL_CASES)
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    if args.side_by_side:
        from logart.report import now, versions, write_json

        cases = {k: v for k, v in REAL_CASES.items() if not args.only or k in args.only}
        out = side_by_side(args.side_by_side, cases, args.reps, args.threads)
        if args.out:
            write_json(args.out, {"date": now(), "versions": versions(), "threads": args.threads, "cases": out})
        return 0 if all(c["same_checkpoint"] for c in out.values()) else 1
    results = {}
    for name, case in cases.items():
        t0 = time.perf_counter()
        results[name] = real_case(case, args.threads) if name in REAL_CASES else {"hashes": tiny_case(*case)}
        print(f"{name:32s} {time.perf_counter() - t0:7.1f} s", file=sys.stderr)
    if args.record:
        old = json.loads(args.record.read_text()) if args.record.is_file() else {}
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({**old, **results}, indent=1) + "\n")
        return 0
    recorded = json.loads(args.check.read_text())
    bad = 0
    for name, got in results.items():
        want = recorded.get(name)
        same = want is not None and want["hashes"] == got["hashes"]
        bad += not same
        timing = ""
        if "quant_seconds" in got and want is not None:
            timing = f"  quant {got['quant_seconds']} s (recorded {want['quant_seconds']} s)"
        print(f"{name:32s} {'same' if same else 'DIFFERENT' if want else 'not recorded'}{timing}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
