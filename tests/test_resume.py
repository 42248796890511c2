"""An interrupted run resumes from its last finished block and ends with the uninterrupted run's weights."""

import pytest
import torch

import logart.calib.driver as driver
from logart.calib.resume import RunState, fingerprint
from logart.models import tiny_causal_lm
from logart.models.hf_causal import HFCausalLM
from logart.errors import LogartError
from logart.recipes import make_recipe


class Interrupt(Exception):
    pass


def _run(folder, recipe_name, monkeypatch, kill_after_block=None, kill_at_layer=None, model=None, **options):
    """Quantize a fresh tiny model with a resumable state in `folder`; optionally die part-way."""
    model = model or tiny_causal_lm("llama", seed=0)
    calib = torch.randint(0, 250, (4, 48), generator=torch.Generator().manual_seed(0))
    recipe = make_recipe(recipe_name, **{"bits": 3, "llr_iters": 15, **options})
    state = RunState(folder, fingerprint(recipe=recipe.to_dict(), calib=calib))
    real, calls = driver.quantize_site, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at_layer:  # dies in the middle of a block, after some of its layers changed
            raise Interrupt
        return real(*a, **k)

    def on_block(b, _seconds):
        if b == kill_after_block:      # dies right after a block was committed
            raise Interrupt

    with monkeypatch.context() as m:
        m.setattr(driver, "quantize_site", counting)
        driver.quantize_blocks(model, HFCausalLM(), recipe, calib, progress=False, log=None, on_block_done=on_block,
                               state=state)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recipe,options", [("logart", {}), ("log2-rtn", {}), ("logart-fast", {"fp_target": True})])
def test_resume_after_kills_matches_an_uninterrupted_run(tmp_path, monkeypatch, recipe, options):
    """With full-precision targets the resumed run also needs the full-precision stream it saved."""
    reference = _run(tmp_path / "ref", recipe, monkeypatch, **options)
    work = tmp_path / "work"
    # killed mid-block 0, then right after block 0, then mid-block 1: each rerun resumes where it stood
    for kill in [dict(kill_at_layer=3), dict(kill_after_block=0), dict(kill_at_layer=4)]:
        with pytest.raises(Interrupt):
            _run(work, recipe, monkeypatch, **kill, **options)
    final = _run(work, recipe, monkeypatch, **options)
    assert final.keys() == reference.keys()
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


def test_different_arguments_are_refused(tmp_path, monkeypatch):
    with pytest.raises(Interrupt):
        _run(tmp_path, "logart-fast", monkeypatch, kill_after_block=0)
    with pytest.raises(LogartError, match="different settings.*recipe"):
        _run(tmp_path, "logart", monkeypatch)


def test_resume_restores_the_biases_that_bias_correction_moved(tmp_path, monkeypatch):
    def model():
        return tiny_causal_lm("llama", seed=0, attention_bias=True, mlp_bias=True)

    plain = _run(tmp_path / "plain", "logart-fast", monkeypatch, model=model())
    reference = _run(tmp_path / "ref", "logart-fast", monkeypatch, model=model(), bias_correction=True)
    moved = [k for k in reference if k.endswith(".bias") and not torch.equal(reference[k], plain[k])]
    assert moved
    work = tmp_path / "work"
    with pytest.raises(Interrupt):
        _run(work, "logart-fast", monkeypatch, model=model(), kill_after_block=0, bias_correction=True)
    final = _run(work, "logart-fast", monkeypatch, model=model(), bias_correction=True)
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


# --- vision models: the same resume, with bias correction, block reconstruction and activation quantizers ----------

def _vision_run(folder, make_model, adapter, recipe, x, monkeypatch, kill_after_block=None, kill_at_layer=None):
    """Quantize a fresh vision model with a resumable state in `folder`; optionally die part-way. Returns its
    state dict and its logits on `x` (which pass through the installed activation quantizers)."""
    import logart

    model = make_model()
    state = RunState(folder, fingerprint(recipe=recipe.to_dict(), calib=x))
    real, calls = driver.quantize_site, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at_layer:
            raise Interrupt
        return real(*a, **k)

    def on_block(b, _seconds):
        if b == kill_after_block:
            raise Interrupt

    with monkeypatch.context() as m:
        m.setattr(driver, "quantize_site", counting)
        result = logart.quantize(model, recipe, x, progress=False, log=None, adapter=adapter, state=state,
                                 on_block_done=on_block)
    with torch.no_grad():
        out = model(x)
    return {k: v.clone() for k, v in model.state_dict().items()}, out, result


def _tiny_cnn():
    from tests.test_vision import TinyNet

    torch.manual_seed(0)
    return TinyNet().eval()


def _tiny_vit():
    from tests.test_vit import tiny_vit

    return tiny_vit()


@pytest.mark.parametrize("family,options", [
    ("cnn", dict(bias_correction=True)),                     # block reconstruction, then the moved biases
    ("cnn", dict(act_bits=4)),                                # W4A4: the steps the reconstruction trained
    ("vit", dict(act_bits=4, act_reparam=True)),              # LayerNorms rewritten, AdaLog on softmax and GELU
])
def test_an_interrupted_vision_run_resumes_to_the_same_model(tmp_path, monkeypatch, family, options):
    from logart.models.cnn import CNN
    from logart.models.vit import TimmViT
    from logart.vision_pipeline import vision_recipe

    if family == "cnn":
        make, x = _tiny_cnn, torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(2))
        adapter = lambda: CNN(example=x[:2])   # noqa: E731
    else:
        make, x = _tiny_vit, torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        adapter = TimmViT
    recipe = vision_recipe("logart", bits=3, family=family, recon_iters=6, recon_batch=4, **options)
    reference, ref_out, ref_result = _vision_run(tmp_path / "ref", make, adapter(), recipe, x, monkeypatch)
    work = tmp_path / "work"
    for kill in [dict(kill_after_block=0), dict(kill_at_layer=2), dict(kill_after_block=2)]:
        with pytest.raises(Interrupt):
            _vision_run(work, make, adapter(), recipe, x, monkeypatch, **kill)
    final, out, result = _vision_run(work, make, adapter(), recipe, x, monkeypatch)
    assert final.keys() == reference.keys()
    for k in reference:
        assert torch.equal(final[k], reference[k]), k
    assert torch.equal(out, ref_out)   # the activation quantizers of the restored blocks are back, unchanged
    assert result.activation_quantizers == ref_result.activation_quantizers
    assert result.activations.keys() == ref_result.activations.keys()
