"""Per-module control (issue #3): ordered overrides, the ignore list, and the opt-in lm_head / embeddings,
through quantization, the packed checkpoint, both loaders and resume."""

import json
import sys
from pathlib import Path

import pytest
import torch

import logart  # noqa: F401  (installs the transformers hook)
from logart import api
from logart.cli import main
from logart.io.checkpoint import load_quantized, save_quantized
from logart.io.embedding import LogEmbedding
from logart.io.linear import LogLinear
from logart.calib.stats import block_hessians
from logart.models import tiny_causal_lm
from logart.models.hf_causal import HFCausalLM
from logart.errors import LogartError
from logart.quant import QuantSpec, make_codebook, packed_length
from logart.recipes import Override, make_recipe

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import Interrupt, _run  # noqa: E402

CALIB = torch.randint(0, 250, (4, 48), generator=torch.Generator().manual_seed(0))


def _tied_llama(tied=True):
    from transformers import AutoConfig, AutoModelForCausalLM

    from logart.models.tiny import TINY_CONFIGS
    config = AutoConfig.for_model("llama", **dict(TINY_CONFIGS["llama"], tie_word_embeddings=tied))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def _on_codebook(model, params):
    for name, (cb, p) in params.items():
        w = model.get_submodule(name).weight.detach().float()
        assert torch.equal(cb.fake_quant(w, p), w), name


def _reloads_exactly(model, path, x):
    """Both loaders give `model`'s packed tensors bit for bit, and its logits (up to the attention kernel:
    from_pretrained may pick sdpa where the tiny model uses eager)."""
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        ref = model(x).logits
    for loaded in (load_quantized(path)[0], AutoModelForCausalLM.from_pretrained(str(path))):
        got, want = loaded.state_dict(), model.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, ref, rtol=1e-5, atol=1e-5)
        yield loaded


# --- resolution ---------------------------------------------------------------------------------------------

def test_first_matching_override_wins_and_ignore_beats_them():
    recipe = make_recipe("logart-fast", bits=4, nsamples=7, ignore=("down_proj",), overrides=(
        r"layers\.0\.:bits=3",                     # specific rule first ...
        "layers:bits=2,group_size=32",             # ... a broader later rule does not undo it
        "o_proj:recipe=gptq",                      # never reached for layer names: "layers" matched first
        "lm_head:recipe=gptq,method=log2"))
    bits = {n: (r.codebook.bits, r.codebook.group_size) if r else None for n, r in
            ((n, recipe.for_module(n)) for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                                                  "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                                                  "model.embed_tokens"))}
    assert bits == {"model.layers.0.self_attn.q_proj": (3, -1), "model.layers.0.self_attn.o_proj": (3, -1),
                    "model.layers.1.self_attn.o_proj": (2, 32), "model.layers.0.mlp.down_proj": None,
                    "model.embed_tokens": (4, -1)}
    head = recipe.for_module("lm_head")   # a preset's search and rounding, the run's calibration settings
    assert (head.rounding.method, head.codebook.method, head.codebook.bits, head.calibration.nsamples) == \
        ("gptq", "log2", 4, 7)
    assert recipe.for_module("model.layers.1.mlp.up_proj").rounding.method == "rtn"
    assert [o["pattern"] for o in recipe.to_dict()["overrides"]] == [r"layers\.0\.", "layers", "o_proj", "lm_head"]


def test_override_parsing():
    assert Override.parse(r"a:b\.c:bits=3, group-size=128 ,method=log2,recipe=rtn") == \
        Override(r"a:b\.c", bits=3, group_size=128, method="log2", recipe="rtn")
    # a data-free base recipe needs calibration once an override asks for GPTQ
    assert make_recipe("rtn", overrides=["q_proj:recipe=gptq"]).needs_calibration
    assert not make_recipe("rtn", overrides=["q_proj:bits=8"]).needs_calibration
    assert make_recipe("logart", overrides=["lm_head:bits=8,method=uniform"]).for_module("lm_head").codebook.bits == 8


@pytest.mark.parametrize("text,message", [
    ("no-colon", "is not of the form"), ("(:bits=3", "not a valid regular expression"),
    ("q_proj:bits=5", "5-bit weights are not supported"), ("lm_head:bits=8", "8-bit log codebooks"), ("q_proj:bits=x", "must be an integer"),
    ("q_proj:recipe=nope", "unknown recipe 'nope'"), ("q_proj:size=3", "is not key=value"),
    ("q_proj:method=float", "unknown quantization method"), ("q_proj:group_size=-3", "group size -3")])
def test_bad_overrides_are_one_clear_error(text, message, capsys):
    with pytest.raises(LogartError, match=message.replace("(", r"\(")):
        make_recipe("logart-fast", overrides=[text])
    assert main(["quantize", "--model", "unused", "--override", text, "--no-eval", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "Traceback" not in err


# --- quantization, checkpoint, loaders ----------------------------------------------------------------------

def test_overridden_layers_are_packed_with_their_own_codebook(tmp_path):
    model = tiny_causal_lm("llama")
    rules = (r"layers\.0\.mlp:bits=3,group_size=32", "mlp:recipe=rtn", r"o_proj:method=log2,bits=2")
    result = api.quantize(model, "logart-fast", CALIB, bits=4, overrides=rules, ignore=(r"layers\.1\.mlp\.down",),
                          progress=False, log=None)
    specs = {n: cb.spec for n, (cb, _) in result.params.items()}
    assert "model.layers.1.mlp.down_proj" not in specs and len(specs) == 13
    assert specs["model.layers.0.mlp.up_proj"] == QuantSpec("log_dynamic", 3, 32)
    assert specs["model.layers.1.mlp.up_proj"] == QuantSpec("uniform", 4, -1)
    assert specs["model.layers.1.self_attn.o_proj"] == QuantSpec("log2", 2, -1)
    assert specs["model.layers.1.self_attn.q_proj"] == result.recipe.codebook
    _on_codebook(model, result.params)
    w = model.model.layers[0].mlp.up_proj.weight.reshape(-1, 32)  # 3-bit groups of 32: at most 8 values each
    assert max(len(row.unique()) for row in w) <= 8 and max(len(row.unique()) for row in w) > 4

    save_quantized(model, tmp_path / "ck", result.params, result.recipe)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, LogLinear) and (up.bits, up.group_size) == (3, 32)
    assert up.qweight.shape == (128 * 64 // 32, packed_length(32, 3)) and int(up.codes().max()) < 8
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert [o["pattern"] for o in qc["recipe"]["overrides"]] == [r.split(":")[0] for r in rules]
    assert qc["module_specs"]["model.layers.0.mlp.up_proj"]["bits"] == 3
    assert qc["module_specs"]["model.layers.1.self_attn.o_proj"]["method"] == "log2"
    assert "model.layers.1.self_attn.q_proj" not in qc["module_specs"]   # the global spec is not repeated
    for loaded in _reloads_exactly(model, tmp_path / "ck", torch.randint(0, 200, (1, 10))):
        layer = loaded.get_submodule("model.layers.1.self_attn.o_proj")
        assert isinstance(layer, LogLinear) and (layer.bits, layer.group_size) == (2, -1)
        assert isinstance(loaded.model.layers[1].mlp.down_proj, torch.nn.Linear)


def test_checkpoint_without_module_specs_still_loads(tmp_path):
    model = tiny_causal_lm("llama")
    result = api.quantize(model, "log2-rtn", None, bits=4, progress=False, log=None)
    path = save_quantized(model, tmp_path / "ck", result.params, result.recipe)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"].pop("module_specs") == {}
    (path / "config.json").write_text(json.dumps(cfg))
    list(_reloads_exactly(model, path, torch.randint(0, 200, (1, 6))))


def test_head_hessian_is_taken_after_the_final_norm():
    model = tiny_causal_lm("llama")
    seen = []
    handle = model.model.norm.register_forward_hook(lambda _m, _a, out: seen.append(out.reshape(-1, out.shape[-1])))
    head = HFCausalLM(lm_head=True).plan(model)[-1]
    captured = HFCausalLM().capture(model, head, CALIB)
    acc = block_hessians(lambda x: HFCausalLM().run(head, x, {}), {"lm_head": head.sites[0]}, captured.hidden)["lm_head"]
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(acc.H, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied,head,embeddings", [(True, True, True), (True, True, False), (True, False, True),
                                                  (False, True, True)])
def test_lm_head_and_embeddings_opt_in(tmp_path, tied, head, embeddings, capsys):
    model = _tied_llama(tied)
    original = model.model.embed_tokens.weight.detach().clone()
    # the ends take overrides too: a grouped 3-bit embedding exercises LogEmbedding's per-group row lookup
    rules = ("embed_tokens:bits=3,group_size=16",) if not tied else ()
    result = api.quantize(model, "logart-fast", CALIB, bits=4, quantize_lm_head=head, quantize_embeddings=embeddings,
                          overrides=rules, progress=False)
    log = capsys.readouterr().out
    assert ("lm_head" in result.params) == head and ("model.embed_tokens" in result.params) == embeddings
    assert ("share one weight: untied" in log) == tied
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    _on_codebook(model, result.params)
    if head and embeddings:
        assert not torch.equal(model.lm_head.weight, original) and not torch.equal(model.model.embed_tokens.weight, original)
    else:   # the end that is not opted in keeps the full-precision weight
        kept = model.model.embed_tokens.weight if head else model.lm_head.weight
        assert torch.equal(kept, original)
    path = save_quantized(model, tmp_path / "ck", result.params, result.recipe)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    assert isinstance(model.model.embed_tokens, LogEmbedding) == embeddings
    assert isinstance(model.lm_head, LogLinear) == head
    x = torch.randint(0, 250, (2, 9))
    for loaded in _reloads_exactly(model, path, x):
        assert type(loaded.model.embed_tokens) is type(model.model.embed_tokens)
        assert type(loaded.lm_head) is type(model.lm_head)
    if embeddings:  # the packed lookup gives the rows of the dequantized matrix
        emb = model.model.embed_tokens
        assert emb.bits == (3 if rules else 4)
        assert torch.equal(emb(x), torch.nn.functional.embedding(x, emb.dequantize()))


@pytest.mark.parametrize("group_size", [-1, 0, 16])
def test_log_embedding_lookup(group_size):
    emb = torch.nn.Embedding(40, 32)
    cb = make_codebook(QuantSpec("log_dynamic", 4, group_size))
    p = cb.fit(emb.weight)
    emb.weight.data = cb.fake_quant(emb.weight, p)
    packed = LogEmbedding.from_linear(emb, cb, p)
    ids = torch.tensor([[0, 39, 5, 5], [7, 1, 2, 3]])
    assert torch.equal(packed(ids), emb(ids))


def test_resume_with_overrides_and_ends(tmp_path, monkeypatch):
    options = dict(overrides=(r"layers\.1\.:bits=4,group_size=32", "mlp:recipe=gptq"), quantize_lm_head=True,
                   quantize_embeddings=True)
    reference = _run(tmp_path / "ref", "logart", monkeypatch, model=_tied_llama(), **options)
    work = tmp_path / "work"
    for kill in [dict(kill_at_layer=3), dict(kill_after_block=0), dict(kill_at_layer=5), dict(kill_after_block=1)]:
        with pytest.raises(Interrupt):
            _run(work, "logart", monkeypatch, model=_tied_llama(), **kill, **options)
    final = _run(work, "logart", monkeypatch, model=_tied_llama(), **options)
    assert final.keys() == reference.keys() and "lm_head.weight" in final
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


def test_cli_override_and_ends(tmp_path):
    from logart.models import byte_tokenizer
    folder = tmp_path / "tiny-llama"   # tied, as SmolLM2
    _tied_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 200)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(folder), "--recipe", "logart-fast", "--bits", "4", "--output", str(out),
                 "--override", r"layers\.0\.:bits=3", "--override", "layers:recipe=rtn", "--lm-head", "--embeddings",
                 "--ignore", "down_proj", "--calib", str(text), "--nsamples", "2", "--seqlen", "32", "--no-eval",
                 "--quiet"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [o["pattern"] for o in qc["recipe"]["overrides"]] == [r"layers\.0\.", "layers"]
    assert qc["recipe"]["lm"]["quantize_lm_head"] and qc["recipe"]["lm"]["quantize_embeddings"]
    assert "lm_head" in qc["modules"] and "model.embed_tokens" in qc["modules"]
    assert not any("down_proj" in n for n in qc["modules"])
    assert qc["module_specs"]["model.layers.0.self_attn.q_proj"]["bits"] == 3
    assert qc["module_specs"]["model.layers.1.self_attn.q_proj"]["method"] == "uniform"
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["overrides"] == qc["recipe"]["overrides"]
    model, _ = load_quantized(out)
    assert isinstance(model.model.embed_tokens, LogEmbedding) and model.get_submodule("model.layers.0.mlp.up_proj").bits == 3
    # the report draws an overridden 3-bit layer and the packed embedding with their own codebooks
    assert main(["report", str(out), "--layers", r"layers\.0\.mlp\.up_proj|embed_tokens"]) == 0
    assert (out / "report" / "summary.md").is_file()
    # the dequantized export turns the packed ends back into plain modules transformers loads alone
    from transformers import AutoModelForCausalLM

    from logart.io.export import export_dequantized
    plain = AutoModelForCausalLM.from_pretrained(str(export_dequantized(out, tmp_path / "plain", dtype=torch.float32)))
    assert not plain.config.tie_word_embeddings
    for name in ("model.embed_tokens", "lm_head", "model.layers.0.mlp.up_proj"):
        assert torch.equal(plain.get_submodule(name).weight, model.get_submodule(name).dequantize()), name


@pytest.mark.parametrize("option", ["ignore", "overrides"])
def test_a_rule_that_matches_no_weight_is_an_error(option):
    from logart.api import quantize

    rule = r"layers\.7\.mlp" if option == "ignore" else r"layers\.7\.mlp:bits=4"
    with pytest.raises(LogartError, match=r"matches none of the \d+ weights"):
        quantize(tiny_causal_lm("llama"), "log2-rtn", None, bits=3, progress=False, log=None, **{option: (rule,)})


def test_a_bad_ignore_regex_is_called_an_ignore_pattern():
    with pytest.raises(LogartError, match="ignore pattern"):
        make_recipe("log2-rtn", ignore=("layers[",))
