"""Refused when the config is built or the model is sparsified, not mid-run (NaN/inf, seed range, tied weights)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml

from hf_chts import SparseTrainingEngine, SparsifyConfig, sparsify
from hf_chts import recipe as R
from hf_chts.state import is_sparsified

FLOAT_FIELDS = [f.name for f in dataclasses.fields(SparsifyConfig)
                if not f.name.startswith("_") and isinstance(getattr(SparsifyConfig(), f.name), float)]


NON_FINITE = [(name, bad) for name in FLOAT_FIELDS for bad in (math.nan, math.inf, -math.inf)
              if not (name == "regrowth_temperature" and bad == math.inf)]  # inf: the documented top-k temperature


@pytest.mark.parametrize("name, bad", NON_FINITE, ids=[f"{name}={bad}" for name, bad in NON_FINITE])
def test_non_finite_floats_are_refused_as_such(name, bad):
    with pytest.raises(ValueError, match=rf"SparsifyConfig\.{name}=.*NaN"):
        SparsifyConfig(**{name: bad})


def test_sigmoid_k_and_temperatures_refused_before_the_first_update():
    assert {"sigmoid_k", "regrowth_temperature", "removal_delta_start", "removal_delta_end", "target_density",
            "init_beta", "init_r", "removal_fraction", "update_end_fraction", "decay_start_fraction"} <= set(FLOAT_FIELDS)
    for values in ({"sigmoid_k": math.nan}, {"sigmoid_k": math.inf}, {"regrowth_temperature": math.nan}):
        with pytest.raises(ValueError, match="NaN"):
            SparsifyConfig(**values)
    assert SparsifyConfig(regrowth_temperature=math.inf).regrowth_temperature == math.inf  # documented: top-k


def test_seed_outside_the_generator_range_is_refused(make_tiny_model):
    for seed in (2**64, 2**70):
        with pytest.raises(ValueError, match=r"SparsifyConfig\.seed=.*2\*\*64"):
            SparsifyConfig(seed=seed)
    config = SparsifyConfig(method="set", target_density=0.5, update_interval=1, seed=2**64 - 1)
    model = make_tiny_model("llama")
    sparsify(model, config)
    engine = SparseTrainingEngine(model, total_steps=4)
    assert engine.step() is not None  # the first update seeds and uses the generator


def test_nan_sigmoid_k_in_a_recipe_is_refused_at_load(tmp_path):
    path = tmp_path / "r.yaml"
    raw = {"data": {"builtin": "pydoc_topics"}, "run": {"output_dir": str(tmp_path / "o")},
           "tokenizer": {"train_bpe": {"vocab_size": 300}}, "sparsify": {"sigmoid_k": ".nan"}}
    path.write_text(yaml.safe_dump(raw).replace("'.nan'", ".nan"), encoding="utf-8")
    with pytest.raises(ValueError, match="sigmoid_k=nan.*NaN"):
        R.load_recipe(path)
    with pytest.raises(ValueError, match=r"run.seed = .*2\*\*32"):  # numpy's range, checked first
        R.load_recipe(path, ["--sparsify.sigmoid_k", "6", "--run.seed", str(2**70)])
    with pytest.raises(ValueError, match=r"seed=.*2\*\*64"):  # the generator's range, on SparsifyConfig
        R.load_recipe(path, ["--sparsify.sigmoid_k", "6", "--sparsify.seed", str(2**70)])


def test_tied_lm_head_is_refused_and_the_embedding_untouched(make_tiny_model):
    model = make_tiny_model("gpt2")  # GPT-2 ties lm_head to the input embedding
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding
    before = embedding.detach().clone()
    with pytest.raises(ValueError, match=r"'lm_head'.*shared with transformer\.wte\.weight.*tie_word_embeddings"):
        sparsify(model, SparsifyConfig(method="set", target_density=0.3, target_modules=["lm_head"]))
    assert torch.equal(embedding, before) and not is_sparsified(model)
    assert int((embedding == 0).sum()) == int((before == 0).sum())
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: allowed
    sparsify(model, SparsifyConfig(method="set", target_density=0.3, target_modules=["lm_head"]))
    assert is_sparsified(model) and torch.equal(model.get_input_embeddings().weight, before)
