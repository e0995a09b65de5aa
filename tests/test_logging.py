"""Issue 19 §6: hf_chts's messages are log records of the "hf_chts" logger (never print), the usual
verbosity settings silence them, the callback and the recipe log the same metrics by default, and a schedule
with one or two updates is called one-shot pruning."""

import ast
import dataclasses
import logging
import sys
from pathlib import Path

import pytest

from hf_chts import SparsifyConfig, sparsify
from hf_chts.callback import CHTssTrainerCallback
from hf_chts.cli import main as cli_main
from hf_chts.engine import SparseTrainingEngine
from hf_chts.recipe.schema import RunSection
from hf_chts.recipe.summary import plot_training_curves
from hf_chts.verbosity import enable_command_line_messages, follow_trainer_log_level

PACKAGE = Path(__file__).resolve().parents[1] / "hf_chts"


@pytest.fixture
def hf_chts_logger():
    """The "hf_chts" logger, its level and handlers restored after the test."""
    logger = logging.getLogger("hf_chts")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_no_hf_chts_message_is_printed():
    printed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and node.args:
                text = ast.unparse(node.args[0])
                if text.lstrip("f").strip("'\"").startswith("hf_chts"):
                    printed.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not printed, f"print() of hf_chts messages (use logging.getLogger(__name__)): {printed}"


def test_recipe_messages_reach_stderr_in_a_command_and_the_usual_level_silences_them(
        hf_chts_logger, monkeypatch, tmp_path, capsys):
    summary = {"steps": 10, "sparsity_history": [], "loss_curve": {"train": [], "eval": []}, "recipe_name": "x"}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError: a warning
    hf_chts_logger.setLevel(logging.NOTSET)
    enable_command_line_messages()
    enable_command_line_messages()  # once per process: one handler
    assert plot_training_curves(summary, SparsifyConfig(update_interval=2), tmp_path / "p.png") is False
    out, err = capsys.readouterr()
    assert err.count("hf_chts: matplotlib is not installed") == 1 and "matplotlib" not in out
    hf_chts_logger.setLevel(logging.ERROR)  # what a user does to silence hf_chts
    plot_training_curves(summary, SparsifyConfig(update_interval=2), tmp_path / "p.png")
    assert capsys.readouterr() == ("", "")


def test_cli_shows_info_messages_and_keeps_a_level_the_user_set(hf_chts_logger, capsys):
    hf_chts_logger.setLevel(logging.NOTSET)
    cli_main(["inspect", "--help"])  # any command sets up the stderr output
    logging.getLogger("hf_chts.recipe.finish").info("hf_chts: sparse checkpoint saved to x")
    assert "hf_chts: sparse checkpoint saved to x" in capsys.readouterr().err
    hf_chts_logger.setLevel(logging.WARNING)
    cli_main(["inspect", "--help"])
    logging.getLogger("hf_chts.recipe.finish").info("hf_chts: sparse checkpoint saved to y")
    assert "saved to y" not in capsys.readouterr().err


def test_training_log_level_applies_to_hf_chts(hf_chts_logger, tmp_path):
    from transformers import TrainingArguments

    hf_chts_logger.setLevel(logging.INFO)
    follow_trainer_log_level(TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    assert hf_chts_logger.level == logging.INFO  # "passive" keeps it
    follow_trainer_log_level(TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                               log_level="error"))
    assert hf_chts_logger.level == logging.ERROR


def test_callback_and_recipe_log_the_same_metrics_by_default():
    recipe_default = {f.name: f.default for f in dataclasses.fields(RunSection)}["log_per_layer_density"]
    assert CHTssTrainerCallback(SparsifyConfig()).log_per_layer is recipe_default is False


@pytest.mark.parametrize("method,steps,interval,one_shot", [
    ("chtss", 40, 20, True),    # the example: one update
    ("chtss", 60, 20, True),    # two updates (steps 20 and 40 of the 45-step update window)
    ("chtss", 48, 4, False),    # nine updates: gradual
    ("chts", 40, 20, True),     # constant density, one update: static
])
def test_a_schedule_with_one_or_two_updates_warns(make_tiny_model, caplog, method, steps, interval, one_shot):
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method=method, update_interval=interval))
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        SparseTrainingEngine(model, total_steps=steps)
    warned = [r.getMessage() for r in caplog.records if "topology update(s)" in r.getMessage()]
    assert bool(warned) is one_shot, warned
    if one_shot and method == "chtss":
        assert "one-shot pruning" in warned[0] and "update_interval" in warned[0]
