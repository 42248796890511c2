"""Full-precision targets (calib/hessian.py): each layer approaches the full-precision model's output on the
full-precision inputs, through the moved target W° = W + W D H⁻¹ of the usual quadratic form."""

import pytest
import torch

from logart import api
import copy

from logart.calib.stats import block_hessians, input_groups
from logart.calib.hessian import HessianAccumulator
from logart.errors import LogartError
from logart.models import decoder_layers, linear_layers, tiny_causal_lm
from logart.models.adapter import Block
from logart.models.decoder import capture_block_inputs
from logart.models.hf_causal import HFCausalLM


def _sites(model, b):
    """Block `b` of a tiny decoder as the engine sees it: the adapter's Block and its sites by relative name."""
    block = HFCausalLM().plan(model)[b]
    return block, {s.name[len(block.name) + 1:]: s for s in block.sites}


def _runner(block, kwargs, module=None):
    """The adapter's `run` for `block` (or its copy `module`) with the block's kwargs bound."""
    target = block if module is None else Block(block.name, module, [])
    return lambda x: HFCausalLM().run(target, x, kwargs)


def _inputs(n=400, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) @ torch.randn(c, c, generator=g)
    x_fp = x + 0.3 * torch.randn(n, c, generator=g) @ torch.randn(c, c, generator=g) + 0.2
    W = torch.randn(5, c, generator=g)
    return x, x_fp, W


def _accumulate(x, x_fp, parts=3):
    acc = HessianAccumulator(x.shape[1])
    for a, b in zip(x.chunk(parts), x_fp.chunk(parts)):
        acc.add_batch(a, b)
    return acc


def test_the_quadratic_form_around_the_target_is_the_model_level_error():
    """(2/N) Σ ||Q x - W x°||² - tr((Q - W°) H (Q - W°)ᵀ) is the same constant for every Q (no damping)."""
    x, x_fp, W = _inputs()
    acc = _accumulate(x.double(), x_fp.double())
    H, _ = acc.finalize(damp=0.0)
    target = acc.target(W.double(), H.double())
    gaps = []
    for seed in range(3):
        Q = W.double() + torch.randn(W.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        model_error = 2 * (x.double() @ Q.T - x_fp.double() @ W.double().T).pow(2).sum() / x.shape[0]
        d = Q - target
        gaps.append(float(model_error - torch.trace(d @ H.double() @ d.T)))
    assert gaps[0] == pytest.approx(gaps[1], rel=1e-5) and gaps[0] == pytest.approx(gaps[2], rel=1e-5)  # H is float32


def test_the_target_is_the_least_squares_weight():
    x, x_fp, W = _inputs()
    acc = _accumulate(x.double(), x_fp.double())
    target = acc.target(W.double(), acc.finalize(damp=0.0).H)
    lstsq = torch.linalg.lstsq(x.double(), x_fp.double() @ W.double().T).solution.T
    torch.testing.assert_close(target, lstsq, rtol=1e-6, atol=1e-6)


def test_without_drift_the_target_is_the_weight_itself():
    x, _, W = _inputs()
    acc = _accumulate(x, x)
    assert torch.equal(acc.target(W, acc.finalize().H), W)
    plain = HessianAccumulator(x.shape[1])
    plain.add_batch(x)
    assert plain.target(W, plain.finalize().H) is W


def test_mixing_batches_with_and_without_fp_inputs_is_refused():
    x, x_fp, _ = _inputs()
    acc = HessianAccumulator(x.shape[1])
    acc.add_batch(x[:10], x_fp[:10])
    with pytest.raises(LogartError, match="some batches only"):
        acc.add_batch(x[10:20])
    with pytest.raises(LogartError, match="do not match"):
        acc.add_batch(x[10:20], x_fp[10:19])


def _calib(n=4, length=48, seed=0):
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def test_block_statistics_pair_the_two_streams():
    """Identical streams: no drift. A drifted quantized stream: every layer sees a nonzero drift."""
    model = tiny_causal_lm("llama")
    captured = capture_block_inputs(model, _calib())
    block, sites = _sites(model, 0)
    fp_block = copy.deepcopy(block.module)
    run, fp_run = _runner(block, captured.kwargs), _runner(block, captured.kwargs, fp_block)
    fp_modules = {n: fp_block.get_submodule(n) for n in sites}
    same = block_hessians(run, sites, captured.hidden, fp_inputs=captured.hidden, fp_run=fp_run, fp_modules=fp_modules)
    assert all(torch.equal(acc.D, torch.zeros_like(acc.D)) for acc in same.values())
    drifted = captured.hidden + 0.05 * torch.randn_like(captured.hidden)
    moved = block_hessians(run, sites, drifted, fp_inputs=captured.hidden, fp_run=fp_run, fp_modules=fp_modules)
    assert all(acc.D.abs().sum() > 0 for acc in moved.values())
    groups = input_groups(run, sites, captured.hidden[:1])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_statistics_of_an_early_group_skip_the_rest_of_the_block_and_match_a_full_forward(arch):
    """Once every hooked layer has its input, the forward stops: the MLP never runs for q/k/v statistics, and the
    accumulators equal those gathered from inputs recorded in complete forwards."""
    model = tiny_causal_lm(arch)
    captured = capture_block_inputs(model, _calib())
    adapter_block, sites = _sites(model, 1)
    block = adapter_block.module
    fp_block = copy.deepcopy(block)
    linears = linear_layers(block)
    run, fp_run = _runner(adapter_block, captured.kwargs), _runner(adapter_block, captured.kwargs, fp_block)
    first = input_groups(run, sites, captured.hidden[:1])[0]
    drifted = captured.hidden + 0.05 * torch.randn_like(captured.hidden)
    last = list(linears)[-1]   # the block's last linear (down_proj / fc2)
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (linears[last], fp_block.get_submodule(last))]
    accs = block_hessians(run, {n: sites[n] for n in first}, drifted, fp_inputs=captured.hidden, fp_run=fp_run,
                          fp_modules={n: fp_block.get_submodule(n) for n in first}, groups=[first])
    for h in handles:
        h.remove()
    assert calls == []
    seen = {"q": [], "fp": []}
    for key, mod, xs in (("q", block, drifted), ("fp", fp_block, captured.hidden)):
        h = mod.get_submodule(first[0]).register_forward_pre_hook(lambda _m, a, key=key: seen[key].append(a[0]))
        for i in range(xs.shape[0]):
            mod(xs[i:i + 1], **captured.kwargs)
        h.remove()
    ref = HessianAccumulator(linears[first[0]].in_features)
    for x, x_fp in zip(seen["q"], seen["fp"]):
        ref.add_batch(x, x_fp)
    assert torch.equal(accs[first[0]].H, ref.H) and torch.equal(accs[first[0]].D, ref.D)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_first_inputs_are_unchanged_and_later_layers_move(arch):
    """Block 0's q/k/v see identical streams (no drift yet), so they equal the plain run's; every later group
    corrects the drift its inputs picked up and differs."""
    runs = {}
    for fp in (False, True):
        model = tiny_causal_lm(arch)
        api.quantize(model, "logart-fast", _calib(), bits=3, progress=False, log=None, fp_target=fp)
        runs[fp] = [{n: l.weight.detach().clone() for n, l in linear_layers(b).items()} for b in decoder_layers(model)]
    first = [n for n in runs[False][0] if n.endswith(("q_proj", "k_proj", "v_proj"))]
    assert len(first) == 3 and all(torch.equal(runs[True][0][n], runs[False][0][n]) for n in first)
    later = [(b, n) for b, layers in enumerate(runs[False]) for n in layers if b or n not in first]
    assert all(not torch.equal(runs[True][b][n], runs[False][b][n]) for b, n in later)


def test_strength_moves_a_fraction_of_the_way():
    x, x_fp, W = _inputs()
    acc = _accumulate(x, x_fp)
    H = acc.finalize().H
    full = acc.target(W, H) - W
    torch.testing.assert_close(acc.target(W, H, 0.25) - W, 0.25 * full, rtol=1e-5, atol=1e-6)
    assert full.abs().max() > 0.01


def test_strength_outside_zero_one_is_refused_and_the_cli_default_is_a_quarter():
    """The `logart` preset has the targets on (a quarter); `--fp-target 0` gives the paper's recipe; the flag
    alone means a quarter on any recipe."""
    from logart.cli import build_parser, _recipe_from
    from logart.recipes import make_recipe
    with pytest.raises(LogartError, match=r"lie in \[0, 1\]"):
        make_recipe("logart-fast", bits=3, fp_target=1.5)
    parser = build_parser()
    quantize = ["quantize", "--model", "smollm2-135m"]
    assert _recipe_from(parser.parse_args(quantize)).calibration.fp_target == 0.25   # the default recipe is `logart`
    assert _recipe_from(parser.parse_args([*quantize, "--fp-target", "0"])).calibration.fp_target == 0.0
    assert _recipe_from(parser.parse_args([*quantize, "--recipe", "logart-fast"])).calibration.fp_target == 0.0
    assert _recipe_from(parser.parse_args([*quantize, "--recipe", "logart-fast", "--fp-target"])).calibration.fp_target == 0.25


def test_a_data_free_block_still_carries_the_full_precision_stream():
    """Block 0 is data-free (log2 RTN override): the fp stream must still go through block 0's full-precision
    copy, so block 1's statistics pair the quantized stream with the full-precision model's own hidden states."""
    import logart.calib.driver as driver
    model = tiny_causal_lm("llama")
    calib = _calib()
    with torch.no_grad():
        expected = copy.deepcopy(model)(calib, output_hidden_states=True).hidden_states[1]
    streams = []
    real = driver.block_hessians

    def spy(run, sites, inputs, observers=(), fp_inputs=None, *rest, **kw):
        streams.append(fp_inputs)
        return real(run, sites, inputs, observers, fp_inputs, *rest, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(driver, "block_hessians", spy)
        api.quantize(model, "logart-fast", calib, bits=3, progress=False, log=None, fp_target=0.25,
                     overrides=(r"layers\.0\.:recipe=log2-rtn",))
    assert len(streams) == 4  # block 1's four input groups; block 0 gathers nothing
    torch.testing.assert_close(streams[0], expected, rtol=1e-4, atol=1e-4)


def test_attention_aware_rounding_still_gets_its_factors_with_fp_targets():
    """The q/k moments are gathered in the first group's pass, so q/k keep the attention-aware objective."""
    model = tiny_causal_lm("llama")
    result = api.quantize(model, "logart", _calib(), bits=3, progress=False, log=None, llr_iters=20,
                          fp_target=0.25, attention_aware=True)
    aware = sorted(rec.name.rsplit(".", 1)[-1] for rec in result.layers if rec.extra["attention_aware"])
    assert aware == ["k_proj", "k_proj", "q_proj", "q_proj"]
