"""Issue 4 acceptance: the Trainer callback (schedule, logging, gradient accumulation, resume)."""

import pytest
import torch

from hf_chts import SparsifyConfig
from hf_chts.layers import sparse_layers
from hf_chts.state import find_state
from hf_chts.schedules import SparseSchedule
from trainer_utils import PatternDataset, make_trainer


def sparsity_logs(trainer):
    return [entry for entry in trainer.state.log_history if "sparsity/density" in entry]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_trainer_run_follows_the_sigmoid_and_logs_it(make_tiny_model, tmp_path, model_type):
    model = make_tiny_model(model_type)
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=4, seed=0)
    trainer, callback = make_trainer(model, tmp_path, config, max_steps=48)
    callback.log_per_layer = True
    trainer.train()
    assert find_state(model) is not None, "the callback sparsifies an unsparsified model"
    schedule = SparseSchedule.from_config(config, 48)
    logs = sparsity_logs(trainer)
    assert [entry["step"] for entry in logs] == schedule.update_steps() == list(range(4, 37, 4))
    for entry in logs:
        target = schedule.density_at(entry["step"])
        assert entry["sparsity/target_density"] == target
        assert abs(entry["sparsity/density"] - target) < 1e-3  # exact link counts, rounding per layer
        assert 0 <= entry["sparsity/overlap"] <= 1 and 0 < entry["sparsity/anp"] <= 1
        assert any(key.startswith("sparsity/layer/") for key in entry)
    assert logs[0]["sparsity/density"] > 0.9 and logs[-1]["sparsity/target_density"] == 0.3
    # the Trainer's own loss log is kept on update steps too
    assert sorted(e["step"] for e in trainer.state.log_history if "loss" in e) == list(range(1, 49))
    densities = [entry["sparsity/density"] for entry in logs]
    assert densities == sorted(densities, reverse=True)
    final = sum(int(l.mask.sum()) for l in sparse_layers(model).values()) / sum(
        l.mask.numel() for l in sparse_layers(model).values())
    assert abs(final - 0.3) < 1e-3
    for layer in sparse_layers(model).values():
        assert torch.all(layer.weight[~layer.storage_mask()] == 0)


def test_gradient_accumulation_matches_large_batch(make_tiny_model, tmp_path):
    config = SparsifyConfig(method="chtss", target_density=0.4, update_interval=3, seed=0)
    runs = {}
    for label, batch, accumulation in (("accumulated", 4, 4), ("large", 16, 1)):
        model = make_tiny_model("llama")
        trainer, callback = make_trainer(model, tmp_path / label, config, max_steps=24,
                                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer.train()
        runs[label] = (sparsity_logs(trainer), callback.engine)
    steps = {label: [entry["step"] for entry in logs] for label, (logs, _) in runs.items()}
    assert steps["accumulated"] == steps["large"] == list(range(3, 19, 3))
    assert runs["accumulated"][1].schedule.total_steps == runs["large"][1].schedule.total_steps == 24
    assert runs["accumulated"][1].density() == pytest.approx(runs["large"][1].density(), abs=1e-9)
    assert abs(runs["large"][1].density() - 0.4) < 1e-3


def test_skipped_amp_step_skips_the_update(make_tiny_model, tmp_path):
    model = make_tiny_model("llama")
    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=2)
    trainer, callback = make_trainer(model, tmp_path, config, max_steps=8)
    trainer.train()
    engine = callback.engine
    before = {n: m.clone() for n, m in engine.masks().items()}
    engine.completed_steps = 1

    class SkippedOptimizer:
        step_was_skipped = True

    state = type("State", (), {"global_step": 2, "log_history": []})()
    callback.on_step_end(trainer.args, state, trainer.control, optimizer=SkippedOptimizer())
    assert all(torch.equal(before[n], m) for n, m in engine.masks().items())
    assert not state.log_history


def _losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_resume_from_checkpoint_is_exact(make_tiny_model, tmp_path):
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=0)
    common = dict(max_steps=30, save_strategy="steps", save_steps=15, learning_rate=1e-2)

    straight_model = make_tiny_model("llama", seed=1)
    straight, _ = make_trainer(straight_model, tmp_path / "straight", config, **common)
    straight.train()

    first_model = make_tiny_model("llama", seed=1)
    first, _ = make_trainer(first_model, tmp_path / "resumed", config, **common)
    first.train()  # writes checkpoint-15 (and checkpoint-30)
    checkpoint = tmp_path / "resumed" / "checkpoint-15"
    assert (checkpoint / "sparsity.safetensors").exists() and (checkpoint / "sparsify_config.json").exists()

    resumed_model = make_tiny_model("llama", seed=2)  # different init: everything must come from the checkpoint
    resumed, callback = make_trainer(resumed_model, tmp_path / "resumed", config, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    # the schedule did not restart: updates continue at 18, 21 after resuming at 15
    resumed_updates = [e["step"] for e in resumed.state.log_history if "sparsity/density" in e and e["step"] > 15]
    assert resumed_updates == [18, 21]
    assert callback.engine.completed_steps == 30
    straight_layers, resumed_layers = sparse_layers(straight_model), sparse_layers(resumed_model)
    for name, layer in straight_layers.items():
        assert torch.equal(layer.mask, resumed_layers[name].mask), name
        assert torch.equal(layer.weight, resumed_layers[name].weight), name
    straight_losses, resumed_losses = _losses(straight), _losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 31))  # history of checkpoint-15 + the resumed steps
    assert all(straight_losses[step] == resumed_losses[step] for step in range(16, 31))


def test_resume_without_engine_state_is_a_clear_error(make_tiny_model, tmp_path):
    import shutil

    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=2)
    model = make_tiny_model("llama")
    trainer, _ = make_trainer(model, tmp_path, config, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "sparsity.safetensors").unlink()
    (checkpoint / "sparsify_config.json").unlink()
    again, _ = make_trainer(make_tiny_model("llama"), tmp_path, config, max_steps=4)
    with pytest.raises(ValueError, match="no hf_chts engine state"):
        again.train(resume_from_checkpoint=str(checkpoint))
    shutil.rmtree(tmp_path)


def test_checkpoints_get_sparsity_files_even_when_save_pretrained_bypasses_the_hook(make_tiny_model, tmp_path):
    import json

    model = make_tiny_model("llama")
    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=2)
    trainer, callback = make_trainer(model, tmp_path, config, max_steps=4, save_strategy="steps", save_steps=4)
    from hf_chts.model import sparsify

    sparsify(model, config)
    del model.save_pretrained  # the instance hook installed by sparsify(): fall back to transformers' own
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "sparsity.safetensors").exists()
    record = json.loads((checkpoint / "sparsify_config.json").read_text())
    assert record["engine"]["completed_steps"] == 4


def test_lr_rewarmup_multiplies_the_trainers_scheduler(make_tiny_model, tmp_path):
    model = make_tiny_model("llama")
    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=4, lr_rewarmup_steps=2)
    trainer, _ = make_trainer(model, tmp_path, config, max_steps=12, learning_rate=1e-2)
    trainer.train()
    lrs = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    # Trainer logs the LR used by step t; the updates after steps 4 and 8 halve the LR of steps 5 and 9
    assert [lrs[s] for s in range(1, 13)] == pytest.approx([1e-2] * 4 + [5e-3] + [1e-2] * 3 + [5e-3] + [1e-2] * 3)


def test_resume_from_a_checkpoint_outside_output_dir(make_tiny_model, tmp_path):
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=0)
    common = dict(max_steps=18, save_strategy="steps", save_steps=9, learning_rate=1e-2)
    first_model = make_tiny_model("llama", seed=1)
    first, _ = make_trainer(first_model, tmp_path / "A", config, **common)
    first.train()
    # a decoy at the path the callback would guess inside the new output_dir: it must not be used
    decoy_model = make_tiny_model("llama", seed=3)
    decoy, _ = make_trainer(decoy_model, tmp_path / "B", SparsifyConfig(method="chtss", target_density=0.3,
                                                                         update_interval=3, seed=5), **common)
    decoy.train()
    resumed_model = make_tiny_model("llama", seed=2)
    resumed, callback = make_trainer(resumed_model, tmp_path / "B", config, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-9"))
    for name, layer in sparse_layers(first_model).items():
        assert torch.equal(layer.mask, sparse_layers(resumed_model)[name].mask), name


# ------------------------------------------------------------ transformers integration (public API + one fallback)
def test_trainer_on_call_stack_matches_this_transformers_release(make_tiny_model, tmp_path):
    """The one internal hf_chts relies on: if this fails, a transformers release changed Trainer's call stack and
    hf_chts.callback.trainer_on_call_stack (and the supported range in pyproject.toml) must be updated."""
    import inspect

    from transformers import Trainer, TrainerCallback

    from hf_chts.callback import trainer_on_call_stack

    assert "resume_from_checkpoint" in inspect.signature(Trainer._inner_training_loop).parameters, \
        "transformers changed Trainer._inner_training_loop: update hf_chts.callback.trainer_on_call_stack"
    seen = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(("begin", *trainer_on_call_stack()))

        def on_step_end(self, args, state, control, **kwargs):
            seen.append(("step", *trainer_on_call_stack()))

    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=1)
    trainer, _ = make_trainer(make_tiny_model("llama"), tmp_path, config, max_steps=4, save_strategy="steps",
                              save_steps=1)
    trainer.train()
    again, _ = make_trainer(make_tiny_model("llama"), tmp_path, config, max_steps=4)
    again.add_callback(Probe())
    checkpoint = str(tmp_path / "checkpoint-1")
    again.train(resume_from_checkpoint=checkpoint)
    assert seen[0] == ("begin", again, checkpoint), "trainer_on_call_stack no longer finds the Trainer / resume folder"
    assert seen[1][:2] == ("step", again)


def test_checkpoints_record_the_callback_in_trainer_state(make_tiny_model, tmp_path):
    import json

    from hf_chts.callback import engine_fingerprint
    from hf_chts.checkpoint import read_engine_state

    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=2, seed=4)
    trainer, callback = make_trainer(make_tiny_model("llama"), tmp_path, config, max_steps=6, save_strategy="steps",
                                     save_steps=3)
    trainer.train()
    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        record = json.loads((folder / "trainer_state.json").read_text())["stateful_callbacks"]["CHTssTrainerCallback"]
        assert record["args"]["config"] == config.to_dict() and record["args"]["log_per_layer"] is False
        saved = record["attributes"]["saved_engine"]
        assert saved["completed_steps"] == step and saved == engine_fingerprint(read_engine_state(folder))
    assert json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["stateful_callbacks"][
        "CHTssTrainerCallback"]["attributes"]["saved_engine"]["sha256"] != saved["sha256"]


def _two_runs_with_a_decoy(make_tiny_model, tmp_path):
    common = dict(max_steps=12, save_strategy="steps", save_steps=6, learning_rate=1e-2)
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=0)
    first_model = make_tiny_model("llama", seed=1)
    make_trainer(first_model, tmp_path / "A", config, **common)[0].train()
    decoy_config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=5)
    make_trainer(make_tiny_model("llama", seed=3), tmp_path / "B", decoy_config, **common)[0].train()
    return config, common, first_model


def test_resume_never_loads_another_runs_engine_state_when_the_lookup_fails(make_tiny_model, tmp_path, monkeypatch):
    """Without the call-stack fallback the callback guesses output_dir/checkpoint-N; the stateful-callback record the
    Trainer loaded from the real checkpoint tells it that the guess (a decoy from another run) is not that state."""
    import hf_chts.callback

    config, common, _ = _two_runs_with_a_decoy(make_tiny_model, tmp_path)
    monkeypatch.setattr(hf_chts.callback, "trainer_on_call_stack", lambda: (None, None))
    resumed, _ = make_trainer(make_tiny_model("llama", seed=2), tmp_path / "B", config, **common)
    with pytest.raises(ValueError, match="belongs to another run"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-6"))
    # the public TrainingArguments.resume_from_checkpoint is enough to find it without the fallback
    resumed, callback = make_trainer(make_tiny_model("llama", seed=2), tmp_path / "B", config, **common,
                                     resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-6"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-6"))
    assert callback.engine.completed_steps == 12


def test_trainer_can_rebuild_the_callback_from_trainer_state(make_tiny_model, tmp_path):
    """TrainingArguments(restore_callback_states_from_checkpoint=True): transformers re-creates the callback from
    the record (ExportableState); the rebuilt callback resumes the sparse schedule exactly."""
    from hf_chts.callback import CHTssTrainerCallback

    config, common, first_model = _two_runs_with_a_decoy(make_tiny_model, tmp_path)
    resumed_model = make_tiny_model("llama", seed=2)
    resumed, original = make_trainer(resumed_model, tmp_path / "C", SparsifyConfig(method="set", target_density=0.5),
                                     **common, restore_callback_states_from_checkpoint=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-6"))
    (rebuilt,) = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, CHTssTrainerCallback)]
    assert rebuilt is not original and rebuilt.config.to_dict() == config.to_dict()
    assert rebuilt.engine.completed_steps == 12
    for name, layer in sparse_layers(first_model).items():
        assert torch.equal(layer.mask, sparse_layers(resumed_model)[name].mask), name


def test_load_best_model_at_end_restores_the_best_checkpoints_masks_and_engine_state(make_tiny_model, tmp_path):
    """Issue 18 item 2: the Trainer reloads the best checkpoint's weights; the masks and engine state must come
    with them, so a save of the model afterwards equals the best checkpoint (not its weights under the last masks)."""
    from hf_chts import save_sparse
    from hf_chts.checkpointing.format import read_masks
    from hf_chts.checkpointing.loading import read_engine_state
    from safetensors.torch import load_file

    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=2, seed=0)
    # greater_is_better on eval_loss: the first (densest) checkpoint is the "best", the last one is not
    trainer, callback = make_trainer(
        make_tiny_model("llama"), tmp_path / "run", config, max_steps=12, save_strategy="steps", save_steps=4,
        eval_strategy="steps", eval_steps=4, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=True, eval_dataset=PatternDataset(size=16, seed=1), learning_rate=1e-2)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-4"), best
    final = tmp_path / "final"
    save_sparse(trainer.model, str(final))
    best_masks, final_masks = read_masks(best), read_masks(final)
    assert best_masks.keys() == final_masks.keys()
    assert all(torch.equal(best_masks[key], final_masks[key]) for key in best_masks)
    last_masks = read_masks(tmp_path / "run" / "checkpoint-12")
    assert any(not torch.equal(best_masks[key], last_masks[key]) for key in best_masks)  # the case matters
    best_weights, final_weights = load_file(f"{best}/model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(best_weights[key], final_weights[key]) for key in best_weights)
    assert read_engine_state(final)["completed_steps"] == read_engine_state(best)["completed_steps"] == 4
