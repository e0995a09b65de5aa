"""Issue 18 (items 2, 4, 5, 9, 10): recipe runs under load_best_model_at_end, concurrent starts, kills during a
checkpoint save, a failing evaluation, and values that must be refused before the run folder is claimed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_chts import recipe as R
from hf_chts.cli import main as cli_main
from test_recipe import small_recipe, write_corpus, write_yaml


def recipe_file(tmp_path: Path, **sections) -> Path:
    write_corpus(tmp_path / "corpus")
    return write_yaml(tmp_path / "recipe.yaml", small_recipe(tmp_path, **sections))


# --------------------------------------------------------------------------- item 2: load_best_model_at_end
@pytest.mark.slow
def test_recipe_with_load_best_model_at_end_saves_the_best_checkpoint_as_final(tmp_path):
    from safetensors.torch import load_file

    from hf_chts.checkpointing.format import read_masks
    from hf_chts.checkpointing.loading import read_engine_state

    path = recipe_file(tmp_path, eval={"check_reload": True},
                       training={"max_steps": 12, "save_steps": 4, "eval_steps": 4, "load_best_model_at_end": True,
                                 "metric_for_best_model": "eval_loss", "greater_is_better": True,
                                 "learning_rate": 1e-2})
    assert cli_main(["train", str(path)]) == 0
    out = tmp_path / "run"
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.name == "checkpoint-4"
    final = out / R.FINAL_DIR
    best_masks, final_masks, last_masks = read_masks(best), read_masks(final), read_masks(out / "checkpoint-12")
    assert all(torch.equal(best_masks[key], final_masks[key]) for key in best_masks)
    assert any(not torch.equal(best_masks[key], last_masks[key]) for key in best_masks)
    best_weights, final_weights = load_file(best / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(best_weights[key], final_weights[key]) for key in best_weights)
    assert read_engine_state(final)["completed_steps"] == 4
    summary = json.loads((out / R.SUMMARY_FILE).read_text())
    assert summary["reload_check"]["match"] is True
    assert summary["final_density"] == pytest.approx(
        sum(int(m.sum()) for m in best_masks.values()) / sum(m.numel() for m in best_masks.values()), abs=1e-9)


# --------------------------------------------------------------------------- item 10: refused before the claim
@pytest.mark.parametrize("override,named", [
    (["--run.torch_threads", "-1"], "run.torch_threads = -1"),
    (["--run.torch_threads", "0"], "run.torch_threads = 0"),
    (["--data.max_train_samples", "0"], "data.max_train_samples = 0"),
    (["--data.max_validation_samples", "0"], "data.max_validation_samples = 0"),
    (["--sparsify.update_interval", "20"], "sparsify.update_interval = 20 with training.max_steps = 8"),
    (["--training.learning_rate", "nan"], "training.learning_rate = nan"),
    (["--training.learning_rate", "inf"], "training.learning_rate = inf"),
])
def test_bad_run_values_fail_in_one_line_before_the_run_folder_is_claimed(tmp_path, capsys, override, named):
    path = recipe_file(tmp_path)
    assert cli_main(["train", str(path), *override]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0] and "internal error" not in err, err
    assert not (tmp_path / "run").exists()  # nothing claimed: the corrected command is a new run, not "a different run"
    assert not (tmp_path / "tokcache").exists()  # refused before any data or tokenizer work
