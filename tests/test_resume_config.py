"""Resuming never switches the SparsifyConfig silently (engine state and Trainer callback)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_chts import CHTssTrainerCallback, SparsifyConfig, SparseTrainingEngine, sparsify
from hf_chts.layers import sparse_layers
from trainer_utils import PatternDataset, make_trainer, training_args

BASE = dict(method="chts", target_density=0.4, update_interval=5, seed=1)


def saved_state(make_tiny_model, **changes) -> dict:
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(**{**BASE, **changes}))
    engine = SparseTrainingEngine(model, total_steps=40)
    for _ in range(10):
        engine.step()
    return engine.state_dict()


def fresh_engine(make_tiny_model, **changes) -> SparseTrainingEngine:
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(**{**BASE, **changes}))
    return SparseTrainingEngine(model, total_steps=40)


@pytest.mark.parametrize("field, new", [("target_density", 0.3), ("method", "set"), ("seed", 7),
                                        ("update_interval", 4), ("removal_fraction", 0.2)])
def test_engine_refuses_a_state_from_another_config(make_tiny_model, field, new):
    state = saved_state(make_tiny_model)
    engine = fresh_engine(make_tiny_model, **{field: new})
    masks = {name: mask.clone() for name, mask in engine.masks().items()}
    with pytest.raises(ValueError, match=rf"{field}: {BASE.get(field, 0.1)!r} → {new!r}"):
        engine.load_state_dict(state)
    assert engine.completed_steps == 0  # nothing was restored
    assert all(torch.equal(masks[name], mask) for name, mask in engine.masks().items())


def test_every_differing_field_is_listed(make_tiny_model):
    state = saved_state(make_tiny_model)
    engine = fresh_engine(make_tiny_model, target_density=0.3, seed=2, update_interval=4)
    with pytest.raises(ValueError) as error:
        engine.load_state_dict(state)
    message = str(error.value)
    for expected in ("target_density: 0.4 → 0.3", "seed: 1 → 2", "update_interval: 5 → 4"):
        assert expected in message
    assert "initial_density: 0.4 → 0.3" in message  # the preset-derived field follows target_density
    assert "method" not in message and "\n" not in message
    same = fresh_engine(make_tiny_model)  # the same config still resumes exactly
    same.load_state_dict(state)
    assert same.completed_steps == 10
    assert all(torch.equal(state["masks"][name], mask) for name, mask in same.masks().items())


def test_safe_field_changes_only_by_explicit_opt_in(make_tiny_model):
    state = saved_state(make_tiny_model)
    engine = fresh_engine(make_tiny_model, ch_memory_budget_mb=64)
    with pytest.raises(ValueError, match=r"ch_memory_budget_mb: 1024 → 64.*allow_config_change=\['ch_memory_budget_mb'\]"):
        engine.load_state_dict(state)
    engine.load_state_dict(state, allow_config_change=["ch_memory_budget_mb"])
    assert engine.completed_steps == 10 and engine.config.ch_memory_budget_mb == 64
    with pytest.raises(ValueError, match="'target_density' cannot change on resume"):
        engine.load_state_dict(state, allow_config_change=["target_density"])


def _checkpoint(make_tiny_model, folder):
    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=2, seed=0)
    trainer, _ = make_trainer(make_tiny_model("llama"), folder, config, max_steps=4, save_strategy="steps",
                              save_steps=2)
    trainer.train()
    return config, folder / "checkpoint-2"


def test_trainer_resume_with_another_config_is_refused(make_tiny_model, tmp_path):
    config, checkpoint = _checkpoint(make_tiny_model, tmp_path / "run")
    changed = SparsifyConfig(method="chts", target_density=0.25, update_interval=2, seed=0)
    model = make_tiny_model("llama")
    again, _ = make_trainer(model, tmp_path / "run", changed, max_steps=4)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-2: .*target_density: 0.5 → 0.25"):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 2  # refused at on_train_begin, before any training step


def test_trainer_resume_with_an_allowed_safe_change(make_tiny_model, tmp_path):
    config, checkpoint = _checkpoint(make_tiny_model, tmp_path / "run")
    changed = SparsifyConfig(method="chts", target_density=0.5, update_interval=2, seed=0, ch_memory_budget_mb=8)
    with pytest.raises(ValueError, match="ch_memory_budget_mb"):
        make_trainer(make_tiny_model("llama"), tmp_path / "run", changed, max_steps=4)[0].train(
            resume_from_checkpoint=str(checkpoint))
    model = make_tiny_model("llama")
    callback = CHTssTrainerCallback(changed, allow_config_change=["ch_memory_budget_mb"])
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", max_steps=4), train_dataset=PatternDataset(),
                      callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert callback.engine.completed_steps == 4
    assert all(layer.density == pytest.approx(0.5, abs=0.02) for layer in sparse_layers(model).values())
    with pytest.raises(ValueError, match="'seed' cannot change on resume"):
        CHTssTrainerCallback(changed, allow_config_change=["seed"])


def test_recipe_resume_with_another_sparsify_section_is_refused_before_anything_is_written(tmp_path, capsys):
    import json

    import yaml

    from hf_chts import recipe as R
    from hf_chts.checkpointing.format import CONFIG_FILE, FORMAT_VERSION
    from hf_chts.cli import main as cli_main
    from hf_chts.recipe.run_folder import write_run_marker

    raw = {"run": {"output_dir": str(tmp_path / "run"), "resume": True, "seed": 3},
           "data": {"builtin": "pydoc_topics"}, "tokenizer": {"train_bpe": {"vocab_size": 300}},
           "sparsify": {"method": "chts", "target_density": 0.5, "update_interval": 2},
           "training": {"max_steps": 4}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    recipe = R.load_recipe(path)
    out = recipe.output_dir
    out.mkdir()
    write_run_marker(out)
    (out / R.RECIPE_COPY).write_text(yaml.safe_dump(recipe.to_dict()), encoding="utf-8")
    from conftest import tiny_model

    from hf_chts import save_sparse, sparsify

    model = tiny_model("llama")  # a complete checkpoint saved under the recipe's SparsifyConfig
    sparsify(model, R.sparsify_config(recipe))
    save_sparse(model, out / "checkpoint-2")
    assert json.loads((out / "checkpoint-2" / CONFIG_FILE).read_text())["format_version"] == FORMAT_VERSION
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}), encoding="utf-8")
    assert R.check_output_dir(recipe) == "resume"  # same config: resumes
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code = cli_main(["train", str(path), "--sparsify.target_density", "0.3", "--run.seed", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint-2 was saved with a different SparsifyConfig" in err
    assert "target_density: 0.5 → 0.3" in err and "seed: 3 → 4" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # recipe.yaml not rewritten
