"""Tiny randomly initialised decoder LMs and a byte-level tokenizer, for tests without any download.

Every architecture the LLM pipeline claims to support gets a 2-block model with hidden 64, 4 heads (2 KV heads
where the architecture has GQA) and a 256-token vocabulary, so that discovery, capture, calibration and
evaluation run on all of them in CI in seconds. The byte tokenizer maps each UTF-8 byte to one id, matching
the 256-entry vocabulary.
"""

from __future__ import annotations

import torch

VOCAB = 256
HIDDEN = 64
MAX_POSITIONS = 512

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1, pad_token_id=2)
_GQA = dict(_COMMON, intermediate_size=128, num_key_value_heads=2)

# model_type -> config kwargs; the config class comes from transformers' registry (AutoConfig.for_model).
TINY_CONFIGS = {
    "llama": _GQA,
    "mistral": dict(_GQA, sliding_window=None),
    "qwen2": _GQA,
    "gemma": dict(_GQA, head_dim=16),  # Gemma's default head_dim is 256 whatever the hidden size
    "opt": dict(_COMMON, ffn_dim=128, word_embed_proj_dim=HIDDEN, do_layer_norm_before=True),
    "gpt2": dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                 bos_token_id=0, eos_token_id=1),
}
TINY_ARCHS = tuple(TINY_CONFIGS)


def tiny_causal_lm(arch: str = "llama", seed: int = 0, attn_implementation: str = "eager", **config):
    """A seeded, fp32, eval-mode tiny model of `arch` (one of `TINY_ARCHS`), with optional config changes
    (e.g. `num_hidden_layers=6`). The global RNG is left as it was."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_CONFIGS:
        from logart.errors import LogartError

        raise LogartError(f"no tiny model for {arch!r}.", f"use one of {', '.join(TINY_ARCHS)}.")
    config = AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model.eval()


def byte_tokenizer(bos: bool = False):
    """A real `PreTrainedTokenizerFast` with one id per UTF-8 byte (GPT-2's byte-to-unicode alphabet, no
    merges): deterministic, offline, and `decode(encode(s)) == s`.

    `bos=True`: a tokenizer of a model trained with BOS first (Llama-2, Gemma): byte 0 is its BOS token (id 0, the
    tiny configs' `bos_token_id`) and encoding with special tokens puts it first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the alphabet by byte value so ids are the bytes themselves (bytes_to_unicode is a bijection).
    byte_of = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    vocab = {ch: byte_of[ch] for ch in alphabet}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path="logart-byte-tokenizer")
    if bos:
        tokenizer.bos_token = _bytes_to_unicode()[0]
        tokenizer.add_bos_token = True
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
