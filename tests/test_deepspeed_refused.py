"""DeepSpeed ZeRO is refused at start (engine, Trainer callback, recipe) with one clear message; stand-in objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from hf_chts import CHTssTrainerCallback, SparseTrainingEngine, SparsifyConfig, sparsify
from hf_chts.cli import main as cli_main
from hf_chts.state import is_sparsified

CONFIG = SparsifyConfig(method="chts", target_density=0.5, update_interval=2)
REFUSAL = "DeepSpeed ZeRO is not supported"


def deepspeed_object(class_name: str, package_module: str, **attributes):
    """An instance of a class that claims to live in the deepspeed package (deepspeed is not installed)."""
    return type(class_name, (), {"__module__": package_module, **attributes})()


@pytest.fixture(autouse=True)
def no_deepspeed_env(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)


def test_engine_refuses_deepspeed(make_tiny_model, monkeypatch):
    model = make_tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters())
    zero = deepspeed_object("DeepSpeedZeroOptimizer", "deepspeed.runtime.zero.stage_1_and_2", optimizer=optimizer)
    with pytest.raises(ValueError, match=rf"SparseTrainingEngine: {REFUSAL}.*the optimizer is a DeepSpeed object"):
        SparseTrainingEngine(model, CONFIG, total_steps=10, optimizer=zero)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch --use_deepspeed
    with pytest.raises(ValueError, match=rf"{REFUSAL}.*ACCELERATE_USE_DEEPSPEED=true.*DDP or FSDP2"):
        SparseTrainingEngine(model, CONFIG, total_steps=10, optimizer=optimizer)
    assert not is_sparsified(model)  # refused before anything was changed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    SparseTrainingEngine(model, CONFIG, total_steps=10, optimizer=optimizer)  # accelerate's default value
    assert is_sparsified(model)


def test_callback_refuses_deepspeed_at_train_begin(make_tiny_model, monkeypatch):
    model = make_tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters())
    state, control = SimpleNamespace(max_steps=10, global_step=0), SimpleNamespace()
    callback = CHTssTrainerCallback(CONFIG)
    args = SimpleNamespace(deepspeed="ds_zero3.json", output_dir="unused", resume_from_checkpoint=None)
    with pytest.raises(ValueError, match=rf"CHTssTrainerCallback: {REFUSAL}.*TrainingArguments.deepspeed='ds_zero3.json'"):
        callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    assert not is_sparsified(model) and callback.engine is None
    args.deepspeed = None
    wrapped = deepspeed_object("DeepSpeedEngine", "deepspeed.runtime.engine", module=model)
    with pytest.raises(ValueError, match="the model is a DeepSpeed object"):
        callback.on_train_begin(args, state, control, model=wrapped, optimizer=optimizer)
    assert not is_sparsified(model)


def test_accelerator_with_a_deepspeed_plugin_is_refused(make_tiny_model):
    from hf_chts.deepspeed_check import refuse_deepspeed

    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(ValueError, match="accelerator.state.deepspeed_plugin is set"):
        refuse_deepspeed("here", accelerator=accelerator)
    refuse_deepspeed("here", accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)))


def test_recipe_with_deepspeed_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    raw = {"run": {"output_dir": str(out)}, "data": {"builtin": "pydoc_topics"},
           "tokenizer": {"train_bpe": {"vocab_size": 300}}, "training": {"max_steps": 2, "deepspeed": "ds.json"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert REFUSAL in err and "training.deepspeed='ds.json'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert cli_main(["train", str(path), "--training.deepspeed", "ds2.json"]) == 2  # an override too
    assert "training.deepspeed='ds2.json'" in capsys.readouterr().err
    raw["training"].pop("deepspeed")
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cli_main(["train", str(path)]) == 2
    assert "ACCELERATE_USE_DEEPSPEED=true" in capsys.readouterr().err
    assert not out.exists()
