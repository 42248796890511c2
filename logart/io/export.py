"""Export a logart model as a plain Hugging Face checkpoint: dequantized float weights, no logart needed to load.

    export_dequantized("runs/w3", "runs/w3-fp16")                 # a logart checkpoint folder
    export_dequantized(packed_model, "out", dtype=torch.float32)  # or a model holding LogLinear layers
    logart export runs/w3 runs/w3-fp16 [--dtype float16|bfloat16|float32] [--overwrite]

Every `LogLinear` becomes an `nn.Linear` whose weight is the layer's exact dequantized weight (cast to `dtype`;
in float32 the values are those the packed model computes with). The folder is written by transformers'
`save_pretrained` into a temporary folder beside the target and renamed into place; an existing non-empty
folder is never replaced unless `overwrite=True`. Its config.json has no `quantization_config`; a
`logart_dequantized` entry records where the weights came from.
"""

from __future__ import annotations

from pathlib import Path

_DTYPES = ("float16", "bfloat16", "float32")


def _dtype(dtype):
    import torch

    if dtype is None:
        return torch.float16
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            from logart.errors import LogartError
            raise LogartError(f"cannot export in {dtype!r}.", f"use one of {', '.join(_DTYPES)}.")
        return getattr(torch, dtype.removeprefix("torch."))
    return dtype


def dequantized_model(model, dtype=None, quantization_config: dict | None = None):
    """A plain transformers model (same class, config without `quantization_config`) with `model`'s weights,
    every `LogLinear` replaced by an `nn.Linear` holding its dequantized weight. `model` is left unchanged.
    `quantization_config` (the logart one, where the model's config no longer carries it) is summarised in
    the config's `logart_dequantized` entry."""
    from accelerate import init_empty_weights

    from logart.io.linear import LogLinear

    dtype = _dtype(dtype)
    packed = {name: m for name, m in model.named_modules() if isinstance(m, LogLinear)}
    state = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in packed:
            if leaf == "bias":
                state[key] = t.detach().to(dtype).clone()
            continue  # qweight / row_scale / table_index / tables become `.weight` below
        state[key] = t.detach().to(dtype).clone() if t.is_floating_point() else t.detach().clone()
    for name, m in packed.items():
        state[f"{name}.weight"] = m.dequantize().detach().to(dtype)

    config = model.config.__class__.from_dict(model.config.to_dict())
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        del config.quantization_config
    qc = quantization_config or qc
    if qc is not None:
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
        config.logart_dequantized = {k: qc.get(k) for k in ("producer", "bits", "group_size", "method", "mode")}
    for attr in ("_is_quantized", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    with init_empty_weights():  # parameters on "meta" (nothing initialised twice), buffers real (RoPE tables)
        plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        from logart.errors import LogartError
        raise LogartError(f"the dequantized weights do not fit a plain {type(model).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}.", "export from the model or folder logart produced.")
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    plain.to(dtype)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.eval()


def export_dequantized(model_or_dir, out_dir, dtype=None, overwrite: bool = False, tokenizer=None) -> Path:
    """Write a plain Hugging Face checkpoint of dequantized weights to `out_dir` (float16 by default; `dtype`
    takes a torch dtype or "float16" / "bfloat16" / "float32"). `model_or_dir`: a logart checkpoint folder
    (its tokenizer is exported too) or an in-memory model with `LogLinear` layers (pass `tokenizer` to include
    one). Returns `out_dir`."""
    from logart.atomic import refuse_to_overwrite, write_folder
    from logart.io.checkpoint import load_quantized, read_quantization_config

    qc = None
    if isinstance(model_or_dir, (str, Path)):
        qc = read_quantization_config(model_or_dir)["quantization_config"]
        model, tok = load_quantized(model_or_dir)
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        model = model_or_dir
    out_dir = Path(out_dir)
    refuse_to_overwrite(out_dir, overwrite)  # before the (slow) dequantization
    plain = dequantized_model(model, dtype, qc)

    def write(tmp: Path):
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_folder(out_dir, write, overwrite)
    return out_dir


# --- command line: `logart export DIR OUT` (wired into logart/cli.py by `add_export_parser(sub)`) ---------------

def cmd_export(args):
    import time

    t = time.perf_counter()
    out = export_dequantized(args.dir, args.output, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"exported {args.dir} -> {out} ({args.dtype}, {size / 2**20:.1f} MiB, {time.perf_counter() - t:.1f} s); "
          "load it with transformers.AutoModelForCausalLM.from_pretrained, no logart needed")


def add_export_parser(sub):
    x = sub.add_parser("export", help="write a plain (dequantized) Hugging Face checkpoint from a logart checkpoint")
    x.add_argument("dir", help="a logart checkpoint folder")
    x.add_argument("output", help="the new folder (never overwritten by accident)")
    x.add_argument("--dtype", default="float16", choices=list(_DTYPES))
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)
    return x
