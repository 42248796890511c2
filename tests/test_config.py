"""Configuration as small frozen pieces: flat options map onto them, the recipe round-trips through its dict
(and reads the flat layout of older runs), rounding is a typed choice."""

import json

import pytest

from logart.errors import LogartError
from logart.recipes import CalibrationConfig, Recipe, Rounding, RoundingConfig, make_recipe


def test_flat_options_land_in_their_pieces():
    r = make_recipe("logart", bits=3, llr_iters=20, fp_target=0.5, search="exhaustive", reconstruct="block", qdrop=0.5)
    assert r.rounding == RoundingConfig(Rounding.GPTQ_LLR, act_order=True, llr_iters=20)
    assert r.calibration == CalibrationConfig(fp_target=0.5)
    assert (r.search.strategy, r.reconstruction.kind, r.reconstruction.qdrop) == ("exhaustive", "block", 0.5)


def test_recipe_round_trips_through_json():
    r = make_recipe("logart-fast", bits=3, ignore=("lm_head",), overrides=("down_proj:bits=4,recipe=gptq",),
                    quantize_lm_head=True)
    again = Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    assert r.to_dict()["rounding"]["method"] == "rtn"


def test_the_flat_layout_of_older_runs_is_read():
    r = make_recipe("logart", bits=3)
    old = {"name": "logart", "codebook": r.codebook.to_dict(), "dbs": True, "sfs": True, "search": "fast",
           "score": "hessian", "rounding": "gptq+llr", "act_order": True, "llr_iters": 200, "fp_target": 0.25,
           "nsamples": 32, "seqlen": 2048, "seed": 0, "ignore": []}
    assert Recipe.from_dict(old) == r


def test_rounding_is_typed():
    assert Rounding("gptq+llr").learns and Rounding("gptq+llr").uses_gptq
    assert not Rounding("rtn").learns and not Rounding("llr").uses_gptq
    with pytest.raises(LogartError, match="unknown rounding"):
        make_recipe("logart", rounding="adaround")
    with pytest.raises(LogartError, match="unknown recipe option"):
        make_recipe("logart", llr_iterations=3)
