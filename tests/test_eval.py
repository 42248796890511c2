"""logart.eval: perplexity under the GPTQ protocol and greedy generation. Fast on tiny models; the protocol's
reference figure on SmolLM2 is marked slow."""

import math

import pytest
import torch

from logart.errors import LogartError
from logart.eval import generate_text, perplexity, window_nlls
from logart.models import TINY_ARCHS, byte_tokenizer, tiny_causal_lm

WINDOWS = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_window_nll_equals_hf_loss(arch):
    """Our per-window CE over the seqlen-1 shifted targets is what HF computes with labels=input_ids."""
    model = tiny_causal_lm(arch)
    nlls = window_nlls(model, WINDOWS, progress=False)
    assert nlls.shape == (3,) and torch.isfinite(nlls).all()
    with torch.no_grad():
        for i, window in enumerate(WINDOWS):
            loss = model(input_ids=window[None], labels=window[None]).loss
            torch.testing.assert_close(nlls[i], loss.float(), rtol=1e-5, atol=1e-6)


def test_perplexity_is_exp_of_mean_window_nll():
    model = tiny_causal_lm("llama")
    ppl = perplexity(model, WINDOWS, progress=False)
    assert math.isfinite(ppl) and ppl > 1
    per_window = [perplexity(model, WINDOWS[i:i + 1], progress=False) for i in range(3)]
    assert ppl == pytest.approx(math.exp(sum(math.log(p) for p in per_window) / 3), rel=1e-6)


def test_perplexity_progress_bar_does_not_change_result(capsys):
    model = tiny_causal_lm("opt")
    assert perplexity(model, WINDOWS[:1], progress=True) == perplexity(model, WINDOWS[:1], progress=False)


@pytest.mark.parametrize("shape", [(48,), (2, 1)])
def test_perplexity_rejects_bad_windows(shape):
    with pytest.raises(LogartError, match=r"\[n, seqlen >= 2\]"):
        perplexity(tiny_causal_lm("llama"), torch.zeros(shape, dtype=torch.long), progress=False)


def test_generate_text_is_greedy_continuation():
    """Same text as an argmax loop by hand (stopping at EOS), prompt excluded."""
    model, tok = tiny_causal_lm("llama"), byte_tokenizer()
    text = generate_text(model, tok, "hello", max_new_tokens=6)
    ids = tok("hello", return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
            if nxt == model.config.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert text == tok.decode(new, skip_special_tokens=True)
    with pytest.raises(LogartError):
        generate_text(model, tok, "")


# ---------------------------------------------------------------- the protocol's reference figure (slow)

@pytest.mark.slow
def test_smollm2_fp32_perplexity_matches_protocol(tmp_path):
    """PROTOCOL.md: fp32 SmolLM2-135M on the first 16 windows of 2048 tokens of the packaged Wikipedia text."""
    from logart.data import eval_set
    from logart.models import load_causal_lm

    torch.set_num_threads(2)
    model, tok = load_causal_lm("smollm2-135m")
    windows = eval_set(tok, "wikipedia", seqlen=2048, max_windows=16, cache=tmp_path)
    assert windows.shape == (16, 2048)
    assert perplexity(model, windows) == pytest.approx(20.21, abs=0.05)
