"""Issue 18 (items 2, 4, 5, 9, 10): recipe runs under load_best_model_at_end, concurrent starts, kills during a
checkpoint save, a failing evaluation, and values that must be refused before the run folder is claimed."""

from __future__ import annotations

import json
import logging
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


# --------------------------------------------------------------------------- item 4: one run per folder
def _lock_as_another_process(folder: Path) -> int:
    """Hold ``folder``'s run lock through a separate open file description, as a second process would."""
    import fcntl
    import os

    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return descriptor


def test_a_run_folder_held_by_another_run_is_refused_in_one_line(tmp_path, capsys):
    import os

    from hf_chts.recipe.run_folder import RunFolderInUse, create_run_marker

    path = recipe_file(tmp_path)
    recipe = R.load_recipe(path)
    assert R.check_output_dir(recipe) == "new"  # both runs see a new folder
    out = tmp_path / "run"
    out.mkdir()
    create_run_marker(out)  # the other run claimed it first and is training
    holder = _lock_as_another_process(out)
    try:
        with pytest.raises(RunFolderInUse, match="in use by another hf-chts run") as refused:
            R.prepare_output_dir(recipe, "new")
        assert "\n" not in str(refused.value) and str(out) in str(refused.value)
        assert sorted(p.name for p in out.iterdir()) == [".hf_chts_run.json"]  # no recipe copy written over it
        with pytest.raises(RunFolderInUse):
            R.check_output_dir(recipe)  # a later start fails before loading anything
        assert cli_main(["train", str(path)]) == 2
        assert "in use by another hf-chts run" in capsys.readouterr().err
    finally:
        os.close(holder)
    # the holder is gone, but the folder is checked again under the lock: it is the other run's, never joined
    with pytest.raises(FileExistsError, match="different run"):
        R.prepare_output_dir(recipe, "new")
    os.close(_lock_as_another_process(out))  # a refused claim keeps no lock
    # a claim holds the lock until the run releases it
    other = R.load_recipe(path, ["--run.output_dir", str(tmp_path / "run2")])
    R.prepare_output_dir(other, R.check_output_dir(other))
    with pytest.raises(BlockingIOError):
        _lock_as_another_process(tmp_path / "run2")
    R.release_output_dir(other)
    os.close(_lock_as_another_process(tmp_path / "run2"))


def test_the_run_marker_of_a_new_folder_is_created_exclusively(tmp_path):
    from hf_chts.recipe.run_folder import RunFolderInUse, create_run_marker, read_run_marker

    first = create_run_marker(tmp_path)
    with pytest.raises(RunFolderInUse, match="claimed by another hf-chts run"):
        create_run_marker(tmp_path)
    assert read_run_marker(tmp_path)["run_id"] == first  # the first claim stands
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf_chts_run.json"]  # no temporary file left


@pytest.mark.slow
def test_two_train_commands_started_together_into_one_new_folder(tmp_path):
    import os
    import subprocess
    import sys

    path = recipe_file(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "hf_chts.cli", "train", str(path), "--tokenizer.cache_dir",
               str(tmp_path / "tokcache"), "--eval.check_reload", "false"]
    runs = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    last = [line for line in loser.splitlines() if line.strip()][-1]
    assert "run.output_dir" in last and str(tmp_path / "run") in last and "Traceback" not in loser, loser
    summary = json.loads((tmp_path / "run" / R.SUMMARY_FILE).read_text())
    assert summary["steps"] == 8


# --------------------------------------------------------------------------- item 5: a kill during a checkpoint save
KILL_SCRIPT = Path(__file__).resolve().parent / "scripts" / "kill_during_checkpoint_save.py"
KILL_STEPS = ("staged", "weights-written", "sparsity-written", "config-written", "foreign-linked", "synced",
              "swapped", "cleaned", "trainer-state")


def _killed_run(mode: str, target: Path, step: str, cwd: Path):
    import os
    import subprocess
    import sys

    from hf_chts.checkpointing.commit import FAULT_EXIT_CODE

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    env.pop("HF_CHTS_FAULT_AT", None)
    done = subprocess.run([sys.executable, str(KILL_SCRIPT), mode, str(target), step], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == FAULT_EXIT_CODE, done.stderr[-3000:]


def _assert_resume_skips_the_killed_save(out: Path, caplog, first: str, killed: str):
    """The killed checkpoint is absent or incomplete (never an empty folder); resume takes ``first``."""
    from hf_chts.recipe.resume import incomplete_reason

    killed_folder = out / killed
    if killed_folder.exists():
        assert any(killed_folder.iterdir()), "an empty checkpoint folder was left behind"
        assert incomplete_reason(killed_folder) is not None
    recipe = R.recipe_from_dict({"run": {"output_dir": str(out)}}, check=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_chts"):  # the skipped folders are named in a warning
        assert R.last_checkpoint(recipe, report=True) == str(out / first)
    assert (str(killed_folder) in caplog.text) == killed_folder.exists(), caplog.text


def test_a_kill_during_a_later_checkpoint_save_leaves_the_earlier_one_to_resume(tmp_path, caplog):
    """Killed between the hf_chts save's sync and its swap (the Trainer had made checkpoint-4/ already)."""
    _killed_run("trainer", tmp_path / "out", "synced", tmp_path)
    _assert_resume_skips_the_killed_save(tmp_path / "out", caplog, "checkpoint-2", "checkpoint-4")
    assert not (tmp_path / "out" / "checkpoint-4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("step", KILL_STEPS)
def test_a_kill_at_each_commit_step_of_a_later_save_never_blocks_resume(tmp_path, caplog, step):
    from trainer_utils import make_trainer
    from conftest import tiny_model
    from hf_chts import SparsifyConfig

    out = tmp_path / "out"
    _killed_run("trainer", out, step, tmp_path)
    _assert_resume_skips_the_killed_save(out, caplog, "checkpoint-2", "checkpoint-4")
    recipe = R.recipe_from_dict({"run": {"output_dir": str(out)}}, check=False)
    config = SparsifyConfig(method="chtss", target_density=0.5, update_interval=2, seed=0)
    trainer, callback = make_trainer(tiny_model("llama"), out, config, max_steps=6, save_strategy="steps",
                                     save_steps=2, dataset=__import__("trainer_utils").PatternDataset(size=64))
    trainer.train(resume_from_checkpoint=R.last_checkpoint(recipe))
    assert trainer.state.global_step == 6 and callback.engine.completed_steps == 6
    assert R.last_checkpoint(recipe) == str(out / "checkpoint-6")


@pytest.mark.slow
def test_recipe_resume_after_a_kill_during_a_later_checkpoint_save(tmp_path, capsys):
    path = recipe_file(tmp_path, training={"save_steps": 4}, eval={"check_reload": False})
    _killed_run("recipe", path, "synced", tmp_path)
    out = tmp_path / "run"
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-8").exists()
    assert cli_main(["train", str(path), "--run.resume", "true"]) == 0
    summary = json.loads((out / R.SUMMARY_FILE).read_text())
    assert summary["steps"] == 8


# --------------------------------------------------------------------------- item 9: evaluation after training
def _long_corpus(folder: Path, paragraphs: int = 60) -> None:
    import random

    folder.mkdir(parents=True, exist_ok=True)
    words = ("extraordinarily counterbalancing photosynthesis thermodynamically incomprehensibility "
             "electroencephalograph uncharacteristically interdisciplinary").split()
    rng = random.Random(0)
    text = "\n\n".join(f"Paragraph {n}: " + " ".join(rng.choice(words) for _ in range(60)) for n in range(paragraphs))
    (folder / "long.txt").write_text(text + "\n", encoding="utf-8")


def test_local_task_answers_are_shortened_to_fit_the_context():
    from hf_chts.recipe.finish import fitting_continuation_words

    class Characters:  # one token per character: word lengths decide
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    texts = [" ".join(["w" * 5] * 40) for _ in range(4)]  # answers of k words are 6k characters
    assert fitting_continuation_words(texts, Characters(), 2048) == 8
    assert fitting_continuation_words(texts, Characters(), 32) == 5  # 6 * 5 = 30 <= 32 - 1
    assert fitting_continuation_words(texts, Characters(), 6) == 0  # not one word (6 tokens) fits 6 - 1
    assert fitting_continuation_words(texts, None, 8) == 8  # nothing to measure with


def test_an_evaluation_failure_after_training_still_writes_the_summary(tmp_path, monkeypatch, capsys):
    from test_recipe import _FakeTrainer, _finish_run_inputs

    recipe, model, data = _finish_run_inputs(tmp_path)

    def failing_lm_eval(*args, **kwargs):
        raise AssertionError("continuation longer than max_length")

    monkeypatch.setattr(R.finish, "run_lm_eval", failing_lm_eval)
    with pytest.raises(Exception) as failed:  # the run still fails (exit status), after writing the summary
        R.finish_run(recipe, _FakeTrainer(model, []), None, None, data, started=0.0)
    summary = json.loads((recipe.output_dir / R.SUMMARY_FILE).read_text())
    assert type(failed.value).__name__ == "EvaluationAfterTrainingError"
    assert "'lm_eval' failed" in str(failed.value) and "hf-chts eval" in str(failed.value)
    assert summary["steps"] == 8 and summary["val_loss"] == 4.5 and summary["reload_check"]["match"] is True
    assert summary["evaluation_errors"] == [{"step": "lm_eval",
                                             "error": "AssertionError: continuation longer than max_length"}]
    assert (recipe.output_dir / R.FINAL_DIR / "sparsity.safetensors").exists()


@pytest.mark.slow
def test_recipe_local_task_fits_a_short_context(tmp_path):
    pytest.importorskip("lm_eval")
    _long_corpus(tmp_path / "corpus")
    path = write_yaml(tmp_path / "recipe.yaml", small_recipe(
        tmp_path, data={"text_files": [str(tmp_path / "corpus" / "*.txt")], "block_size": 32},
        training={"max_steps": 4}, sparsify={"update_interval": 1},
        eval={"local_task_from_heldout": True, "local_task_documents": 12, "limit": 4, "check_reload": False}))
    assert cli_main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / R.SUMMARY_FILE).read_text())
    assert "evaluation_errors" not in summary
    assert "hf_chts_local_choice" in summary["lm_eval"]["tasks"] and summary["lm_eval"]["metrics"]
