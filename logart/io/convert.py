"""Write any model logart can load (the embedded SmolLM2, a .gguf file, a local folder) as a plain Hugging Face
folder of sharded float safetensors: the input the larger-than-memory path (`--max-memory`) streams from.

    logart convert smollm2-135m models/smollm2 [--shard-size 100MB] [--dtype float32]

Converting loads the model once, so it needs its memory once; run it where that memory exists (or take the
shards from wherever the model came from). Written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import time
from pathlib import Path


def convert(name_or_path, out_dir, shard_size: str = "100MB", dtype: str = "float32", overwrite: bool = False) -> Path:
    import torch

    from logart.atomic import refuse_to_overwrite, write_folder
    from logart.models import detach_gguf, load_causal_lm

    out_dir = Path(out_dir)
    refuse_to_overwrite(out_dir, overwrite)
    model, tokenizer = load_causal_lm(name_or_path, dtype=getattr(torch, dtype))
    model = detach_gguf(model)

    def write(tmp: Path):
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)

    write_folder(out_dir, write, overwrite)
    return out_dir


def cmd_convert(args):
    t = time.perf_counter()
    out = convert(args.model, args.output, args.shard_size, args.dtype, args.overwrite)
    shards = sorted(p.name for p in Path(out).glob("*.safetensors"))
    size = sum((Path(out) / s).stat().st_size for s in shards)
    print(f"converted {args.model} -> {out}: {len(shards)} safetensors shard(s), {size / 2**20:.1f} MiB "
          f"({time.perf_counter() - t:.1f} s). Quantize it block by block with "
          f"`logart quantize --model {out} --max-memory SIZE`.")


def add_convert_parser(sub):
    c = sub.add_parser("convert", help="write a model as a sharded float safetensors folder (input for --max-memory)")
    c.add_argument("model", help="smollm2-135m, a .gguf file or a local Hugging Face folder")
    c.add_argument("output", help="the new folder (never overwritten by accident)")
    c.add_argument("--shard-size", default="100MB", help="largest shard file (default 100MB)")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_convert)
    return c
