"""Inference speed and size of packed logart checkpoints on the CPU, side by side with fp32 (SmolLM2-135M).

    python bench/inference.py [--out bench/results/inference.json] [--threads 2,1] [--repeats 5]

One process measures, for the fp32 model, packed W4 and W3 on the compiled LUT kernel, and packed W4 on the
pure-PyTorch path (`kernel.disable`):
  decode   batch-1 greedy decoding with a KV cache: an 8-token prompt is prefilled (not timed), then
           `--new-tokens` single-token steps are timed (tokens/s = new tokens / seconds; the slow PyTorch
           path times `--fallback-tokens` steps);
  prefill  one forward of `--prefill` tokens with a fresh cache and only the last position's logits (as
           `generate` does), tokens/s = prefill tokens / seconds;
  layers   one [576,576], [1536,576] and [576,1536] layer at batch 1 and 512: `F.linear` fp32 vs the kernel
           (the same weights again and again, so fp32 is cache-resident here: a best case for fp32);
  sizes    the packed linear layers' bytes against their fp32 bytes (target (n + 0.5) / 32), and the checkpoint
           file against an fp32 safetensors of the same model.
Decode and prefill are measured at each of `--threads` (the first is the headline `results`; all are under
`runs`). Repeats are interleaved across the four models so that load from other processes spreads evenly;
every number is the median of `--repeats`. The weights come from the data-free `log2-rtn` recipe: speed does
not depend on which codebook values were chosen.

The machine is shared: before measuring, the script waits (up to `--wait` s) until other processes use at
most `--max-busy` of the CPUs, and it records the load averages and the other processes' CPU share between
repeats. With more runnable threads than cores every OpenMP parallel region can stall for milliseconds (a
descheduled worker holds up the barrier), so multi-threaded numbers from a busy machine mean little; the
1-thread run is the one that stays comparable under load.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import environment, median_time, write_json  # noqa: E402

import logart  # noqa: E402
from logart.io import kernel  # noqa: E402
from logart.io.checkpoint import WEIGHTS, _unique_state, pack_model, save_quantized  # noqa: E402
from logart.io.linear import LogLinear  # noqa: E402
from logart.models import load_causal_lm  # noqa: E402

PROMPT = "The history of the city begins with a small settlement on the river, where"


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _quiet(*args, **kwargs):
    pass


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat), while this process sleeps: other load."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    i0, t0 = sample()
    time.sleep(seconds)
    i1, t1 = sample()
    return round(1 - (i1 - i0) / max(1, t1 - t0), 3)


def wait_until_quiet(max_busy: float, timeout_s: float) -> dict:
    """Sleep until other processes use at most `max_busy` of the CPUs (or `timeout_s` passes)."""
    t0 = time.perf_counter()
    busy = cpu_busy()
    while busy > max_busy and time.perf_counter() - t0 < timeout_s:
        print(f"  waiting for a quiet machine: {busy:.0%} of the CPUs busy, load {_load()}", flush=True)
        time.sleep(10)
        busy = cpu_busy()
    return {"waited_s": round(time.perf_counter() - t0, 1), "cpu_busy_before": busy, "quiet": busy <= max_busy}


def quantized_copy(base, bits: int):
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    result = logart.quantize(model, "log2-rtn", None, bits=bits, progress=False, log=_quiet)
    pack_model(model, result.params)
    return model.eval(), result, time.perf_counter() - t0


@torch.inference_mode()
def decode_seconds(model, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for `new_tokens` greedy single-token steps after an (untimed) prompt prefill, and the tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    tokens = []
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    return time.perf_counter() - t0, tokens


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    from transformers import DynamicCache

    return model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)


def layer_times(packed_model, fp32_model, repeats: int) -> list[dict]:
    """Kernel vs fp32 F.linear on the model's three linear shapes, batch 1 (fused GEMV) and 512 (dequant+BLAS)."""
    rows = []
    names = {"[576,576] q_proj": "model.layers.0.self_attn.q_proj", "[1536,576] gate_proj": "model.layers.0.mlp.gate_proj",
             "[576,1536] down_proj": "model.layers.0.mlp.down_proj"}
    for label, name in names.items():
        layer, ref = packed_model.get_submodule(name), fp32_model.get_submodule(name)
        for batch in (1, 512):
            x = torch.randn(batch, layer.in_features)
            n = 200 if batch == 1 else 5
            with torch.inference_mode():
                t_fp32, _ = median_time(lambda: [F.linear(x, ref.weight, ref.bias) for _ in range(n)], repeats)
                t_kernel, _ = median_time(lambda: [kernel.lut_forward(layer, x) for _ in range(n)], repeats)
            rows.append({"layer": label, "bits": layer.bits, "batch": batch, "fp32_us": round(t_fp32 / n * 1e6, 1),
                         "kernel_us": round(t_kernel / n * 1e6, 1), "speedup": round(t_fp32 / t_kernel, 2)})
            print(f"  {label:22s} W{layer.bits} B={batch:3d}  fp32 {rows[-1]['fp32_us']:8.1f} us  "
                  f"kernel {rows[-1]['kernel_us']:8.1f} us  x{rows[-1]['speedup']}")
    return rows


def packed_sizes(model, bits: int) -> dict:
    packed = fp32 = codes = 0
    for m in model.modules():
        if isinstance(m, LogLinear):
            packed += sum(b.numel() * b.element_size() for b in (m.qweight, m.row_scale, m.table_index, m.tables))
            codes += m.qweight.numel() * 4
            fp32 += m.in_features * m.out_features * 4
            if m.bias is not None:
                packed += m.bias.numel() * 4
                fp32 += m.bias.numel() * 4
    return {"bits": bits, "linear_fp32_bytes": fp32, "linear_packed_bytes": packed, "ratio": round(packed / fp32, 5),
            "codes_only_ratio": round(codes / fp32, 5), "target_ratio": (bits + 0.5) / 32,
            "meets_target": packed / fp32 <= (bits + 0.5) / 32}


def checkpoint_sizes(base, quantized: dict) -> dict:
    from safetensors.torch import save_file

    out = {}
    with tempfile.TemporaryDirectory(prefix="logart-bench-") as tmp:
        f = Path(tmp) / "fp32.safetensors"
        save_file(_unique_state(base), str(f))
        out["fp32_file_bytes"] = f.stat().st_size
        for label, (model, result) in quantized.items():
            d = save_quantized(model, Path(tmp) / label, result.params, result.recipe)
            size = (d / WEIGHTS).stat().st_size
            out[label] = {"file_bytes": size, "ratio_vs_fp32": round(size / out["fp32_file_bytes"], 4),
                          "folder_bytes": sum(p.stat().st_size for p in d.iterdir()),
                          "note": "model.safetensors: packed linears + fp32 embeddings (tied lm_head) and norms"}
    return out


def measure(configs, prompt, long_ids, threads: int, args) -> dict:
    """Interleaved repeats of decode and prefill for every configuration at `threads` torch threads."""
    torch.set_num_threads(threads)
    for label, model, on in configs:  # warm-up: first calls allocate caches, touch pages, pick BLAS paths
        use_kernel(model, on)
        decode_seconds(model, prompt, 4)
        prefill(model, long_ids)
    n_new = {label: args.fallback_tokens if on is False else args.new_tokens for label, _, on in configs}
    decode = {label: [] for label, _, _ in configs}
    pre = {label: [] for label, _, _ in configs}
    tokens = {}
    loads, busy = [_load()], []
    for r in range(args.repeats):
        for label, model, on in configs:
            use_kernel(model, on)
            seconds, tokens[label] = decode_seconds(model, prompt, n_new[label])
            decode[label].append(seconds)
            t, _ = median_time(lambda: prefill(model, long_ids), repeats=1, warmup=0)
            pre[label].append(t)
        loads.append(_load())
        busy.append(cpu_busy(1.0))
        print(f"  {threads} threads, repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {n_new[k] / decode[k][-1]:.1f} tok/s" for k in decode) + f"  load {loads[-1]}, others busy {busy[-1]:.0%}",
            flush=True)
    results = {}
    for label, _, _ in configs:
        d, p = statistics.median(decode[label]), statistics.median(pre[label])
        results[label] = {"decode_tokens_per_s": round(n_new[label] / d, 2), "decode_new_tokens": n_new[label],
                          "decode_s": [round(t, 4) for t in decode[label]],
                          "prefill_tokens_per_s": round(args.prefill / p, 1), "prefill_s": [round(t, 4) for t in pre[label]]}
    for label in results:
        for key in ("decode", "prefill"):
            results[label][f"{key}_vs_fp32"] = round(results[label][f"{key}_tokens_per_s"]
                                                     / results["fp32"][f"{key}_tokens_per_s"], 3)
    agree = {k: sum(a == b for a, b in zip(tokens[k], tokens["fp32"])) / len(tokens[k]) for k in tokens}
    # the same packed weights on both paths: the tokens should be the same
    same = tokens["w4_kernel"][:len(tokens["w4_pytorch"])] == tokens["w4_pytorch"]
    return {"threads": threads, "results": results, "greedy_tokens_agreeing_with_fp32": agree,
            "w4_kernel_tokens_equal_pytorch_path": same,
            "loadavg_during": loads,  # includes this benchmark's own threads
            "cpu_busy_between_repeats": busy}  # other processes only (sampled while this one sleeps 1 s)


def use_kernel(model, on):
    if on is True:
        kernel.enable(model)
    elif on is False:
        kernel.disable(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/inference.json")
    ap.add_argument("--threads", default="2,1", help="torch thread counts to measure, the first is the headline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--fallback-tokens", type=int, default=16, help="decode steps timed on the slow PyTorch path")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--max-busy", type=float, default=0.15,
                    help="before measuring, wait until other processes use at most this share of the CPUs")
    ap.add_argument("--wait", type=float, default=1800, help="longest wait for a quiet machine, seconds")
    args = ap.parse_args()
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    torch.set_num_threads(thread_counts[0])
    torch.manual_seed(0)
    env = environment()
    env["loadavg_at_start"] = _load()
    env["nproc"] = os.cpu_count()
    print(f"threads {thread_counts}, load average {env['loadavg_at_start']}")

    base, tok = load_causal_lm("smollm2-135m")
    t0 = time.perf_counter()
    if kernel.load() is None:
        raise SystemExit("the logart CPU kernel could not be built; this benchmark measures it")
    env["kernel_load_s"] = round(time.perf_counter() - t0, 2)
    w4, r4, q4 = quantized_copy(base, 4)
    w3, r3, q3 = quantized_copy(base, 3)
    print(f"quantized + packed: W4 {q4:.1f} s, W3 {q3:.1f} s ({sum(isinstance(m, LogLinear) for m in w4.modules())} layers)")
    sizes = {"linear": {"w4": packed_sizes(w4, 4), "w3": packed_sizes(w3, 3)},
             "checkpoint": checkpoint_sizes(base, {"w4": (w4, r4), "w3": (w3, r3)})}

    prompt = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids[:, :args.prompt_tokens]
    long_ids = tok((PROMPT + " ") * 64, return_tensors="pt", add_special_tokens=False).input_ids[:, :args.prefill]
    assert long_ids.shape[1] == args.prefill
    configs = [("fp32", base, None), ("w4_kernel", w4, True), ("w3_kernel", w3, True), ("w4_pytorch", w4, False)]

    env["quiet_wait"] = wait_until_quiet(args.max_busy, args.wait)
    print(f"measuring ({env['quiet_wait']})")
    print(f"layers at {thread_counts[0]} threads (batch 1: fused GEMV; batch 512: dequant + BLAS):")
    kernel.enable(w4)
    kernel.enable(w3)
    layers = {"threads": thread_counts[0], "before_load": _load(),
              "rows": layer_times(w4, base, args.repeats) + layer_times(w3, base, args.repeats), "after_load": _load()}
    runs = [measure(configs, prompt, long_ids, t, args) for t in thread_counts]
    results = runs[0]["results"]
    targets = {"w4_kernel_decode_vs_fp32_min": 1.5, "w4_kernel_prefill_vs_fp32_min": 0.8,
               "decode_met": results["w4_kernel"]["decode_vs_fp32"] >= 1.5,
               "prefill_met": results["w4_kernel"]["prefill_vs_fp32"] >= 0.8}
    env["loadavg_at_end"] = _load()
    payload = {"benchmark": "inference", "model": "smollm2-135m (fp32, dequantized from the embedded GGUF)",
               "recipe": "log2-rtn per channel (data-free), packed with pack_model", "env": env,
               "settings": {"threads": thread_counts, "repeats": args.repeats, "new_tokens": args.new_tokens,
                            "fallback_new_tokens": args.fallback_tokens, "prompt_tokens": int(prompt.shape[1]),
                            "prefill_tokens": args.prefill,
                            "decode": "greedy, DynamicCache, batch 1, prompt prefill not timed",
                            "prefill": "one forward, fresh cache, logits_to_keep=1"},
               "results": results, "targets": targets, "runs": runs, "layers": layers, "sizes": sizes,
               "quantize_seconds": {"w4": round(q4, 1), "w3": round(q3, 1)}}
    write_json(args.out, payload)
    for run in runs:
        print(f"{run['threads']} threads: {'model':12s} {'decode tok/s':>13s} {'x fp32':>7s} {'prefill tok/s':>14s} {'x fp32':>7s}")
        for label, r in run["results"].items():
            print(f"           {label:12s} {r['decode_tokens_per_s']:13.2f} {r['decode_vs_fp32']:7.3f} "
                  f"{r['prefill_tokens_per_s']:14.1f} {r['prefill_vs_fp32']:7.3f}")
    for b in ("w4", "w3"):
        s, c = sizes["linear"][b], sizes["checkpoint"][b]
        print(f"{b}: linears {s['ratio']:.4f} of fp32 (target {s['target_ratio']:.4f}); checkpoint "
              f"{c['file_bytes'] / 2**20:.1f} MiB = {c['ratio_vs_fp32']:.3f} of fp32 "
              f"({sizes['checkpoint']['fp32_file_bytes'] / 2**20:.1f} MiB)")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
