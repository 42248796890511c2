"""logart.models: loading, generic decoder discovery and first-block capture, on tiny random models of every
supported architecture (and, marked slow, on the packaged SmolLM2)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from logart.errors import LogartError
from logart.models import (TINY_ARCHS, byte_tokenizer, capture_block_inputs, decoder_layers, detach_gguf,
                           linear_layers, load_causal_lm, run_block, tiny_causal_lm)

LLAMA_LIKE = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
EXPECTED_LINEARS = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gemma": LLAMA_LIKE,
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt2": [],  # GPT-2 uses transformers' Conv1D, not nn.Linear
}
BLOCK_PATHS = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request):
    return request.param, tiny_causal_lm(request.param)


def test_decoder_layers_found_generically(tiny):
    arch, model = tiny
    layers = decoder_layers(model)
    assert layers is model.get_submodule(BLOCK_PATHS.get(arch, "model.layers"))
    assert len(layers) == model.config.num_hidden_layers == 2


def test_linear_layers_in_registration_order(tiny):
    arch, model = tiny
    block = decoder_layers(model)[0]
    linears = linear_layers(block)
    assert list(linears) == EXPECTED_LINEARS[arch]
    assert all(block.get_submodule(name) is m for name, m in linears.items())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_capture_replays_first_block(tiny, attn):
    """The captured inputs, fed back through the first block, give exactly the model's own hidden states."""
    arch, _ = tiny
    model = tiny_causal_lm(arch, attn_implementation=attn)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, windows)
    assert captured.hidden.shape == (3, 40, model.config.hidden_size)
    assert captured.hidden.dtype == torch.float32 and not captured.hidden.is_inference()
    assert captured.kwargs.get("use_cache", False) is False
    assert "past_key_values" not in captured.kwargs
    first = decoder_layers(model)[0]
    with torch.no_grad():
        for i in range(len(windows)):
            states = model(input_ids=windows[i:i + 1], output_hidden_states=True).hidden_states
            torch.testing.assert_close(captured.hidden[i:i + 1], states[0])
            torch.testing.assert_close(run_block(first, captured.hidden[i:i + 1], captured.kwargs), states[1])


def test_capture_removes_its_hook(tiny):
    _, model = tiny
    capture_block_inputs(model, torch.zeros(1, 8, dtype=torch.long))
    assert not decoder_layers(model)[0]._forward_pre_hooks
    with torch.no_grad():
        assert model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 256)


def test_no_decoder_blocks_raises():
    with pytest.raises(LogartError, match="no decoder blocks"):
        decoder_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_tiny_models_are_seeded_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (decoder_layers(m)[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(LogartError, match="use one of"):
        tiny_causal_lm("bloom")


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = "Grüße, 東京! 123"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text


def test_load_local_folder(tmp_path):
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_causal_lm(tmp_path)
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert tok("ab", add_special_tokens=False)["input_ids"] == [97, 98]


@pytest.mark.parametrize("name", ["no-such-model", "/no/such/dir", "/no/such/model.gguf"])
def test_unknown_model_names_the_fix(name):
    with pytest.raises(LogartError, match="smollm2-135m.*local folder or .gguf"):
        load_causal_lm(name)


def test_broken_local_folder(tmp_path):
    with pytest.raises(LogartError, match="cannot load"):
        load_causal_lm(tmp_path)


def test_detach_keeps_outputs_and_saves(tmp_path):
    model = tiny_causal_lm("llama")
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    plain = detach_gguf(model)
    assert not hasattr(plain.config, "quantization_config")
    assert hasattr(model.config, "quantization_config")
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits)
    assert not any(t.is_meta for t in list(plain.parameters()) + list(plain.buffers()))
    plain.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


# ---------------------------------------------------------------- the packaged model (slow)

@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return load_causal_lm("smollm2-135m")


@pytest.mark.slow
def test_smollm2_structure(smollm2):
    model, tok = smollm2
    layers = decoder_layers(model)
    assert len(layers) == 30
    assert sum(len(linear_layers(b)) for b in layers) == 210  # PROTOCOL.md scope
    assert len(tok.get_vocab()) == 49152
    captured = capture_block_inputs(model, torch.randint(0, 49152, (2, 64)))
    assert captured.hidden.shape == (2, 64, 576)


@pytest.mark.slow
def test_smollm2_windows_have_no_bos(smollm2):
    """Its GGUF says tokenizer.ggml.add_bos_token = false: the protocol's windows (and numbers) do not move."""
    from logart.data.bos import gguf_add_bos, resolve_bos
    from logart.models.loading import resolve

    where, name = resolve("smollm2-135m")
    assert gguf_add_bos(Path(where) / name) is False
    assert resolve_bos(smollm2[1]) == (None, "the tokenizer's convention")


@pytest.mark.slow
def test_smollm2_detach_saves_and_reloads(smollm2, tmp_path):
    model, tok = smollm2
    with pytest.raises(ValueError):
        model.save_pretrained(tmp_path / "refused")
    detach_gguf(model).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    reloaded, _ = load_causal_lm(tmp_path / "plain")
    x = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits)


class _Payload:
    """Anything but a tensor: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickled_bin_weights_load_with_weights_only(tmp_path):
    """A folder with only pytorch_model.bin: plain tensors load; a pickled object is refused in one line."""
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    folder = tmp_path / "bin-model"
    folder.mkdir()
    model.config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded, _ = load_causal_lm(folder)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    torch.save({"model.norm.weight": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(LogartError, match="weights_only=True"):
        load_causal_lm(folder)
