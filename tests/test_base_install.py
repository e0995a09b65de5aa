"""The base install (``pip install -e .``, no extras) runs the main command: without lm-eval the recipe's
lm-eval step is skipped with a note naming the ``[eval]`` extra, and ``hf-chts eval`` says which extra it
needs (issue 19 item 9). lm-eval being missing is simulated (``sys.modules["lm_eval"] = None`` makes every
``import lm_eval`` fail), never by uninstalling it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hf_chts import recipe as R
from hf_chts.cli import main as cli_main
from hf_chts.extras import missing_extra

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def without_lm_eval(monkeypatch):
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)


def small_recipe(tmp_path: Path):
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "data": {"builtin": "pydoc_topics", "block_size": 16},
        "tokenizer": {"train_bpe": {"vocab_size": 300}},
        "model": {"preset": "llama-tiny", "hidden_size": 32, "intermediate_size": 64},
        "sparsify": {"method": "chtss", "target_density": 0.5, "update_interval": 2},
        "training": {"max_steps": 4},
        "eval": {"tasks": ["hellaswag"], "local_task_from_heldout": True},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return R.load_recipe(path)


def test_missing_extra_names_the_extra(without_lm_eval):
    assert "pip install 'hf_chts[eval]'" in missing_extra("lm_eval")
    assert missing_extra("matplotlib") is None  # installed here: nothing to say


def test_recipe_lm_eval_step_is_skipped_with_a_note_without_lm_eval(tmp_path, without_lm_eval, caplog, capsys):
    recipe = small_recipe(tmp_path)
    recipe.output_dir.mkdir(parents=True)
    data = SimpleNamespace(validation_texts=[" ".join(f"word{n}x{i}" for i in range(60)) for n in range(12)])
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        record = R.run_lm_eval(recipe, model=None, tokenizer=None, data=data)
    assert record["skipped"] and "hf_chts[eval]" in record["skipped"] and record["metrics"] == {}
    assert record["tasks"][0] == "hellaswag" and len(record["tasks"]) == 3  # + the two local tasks, written
    assert Path(record["include_path"]).is_dir()
    assert "skipping the lm-eval step" in caplog.text and "hf_chts[eval]" in caplog.text
    command = R.eval_command_line(recipe, recipe.output_dir / R.FINAL_DIR, record)
    assert "--tasks hellaswag" in command and "--include-path" in command  # to run them once lm-eval is installed


def test_hf_chts_eval_names_the_extra_without_lm_eval(tmp_path, without_lm_eval, capsys):
    assert cli_main(["eval", str(tmp_path), "--tasks", "hellaswag"]) == 2
    error = capsys.readouterr().err
    assert "hf-chts eval runs lm-eval: lm-eval is not installed" in error and "hf_chts[eval]" in error


@pytest.mark.slow  # the main command end to end in a subprocess
def test_main_command_runs_without_the_extras(tmp_path):
    """``hf-chts train recipes/tiny-llama-cpu.yaml`` as after ``pip install -e .``: lm-eval and matplotlib
    cannot be imported; the run trains, saves, reloads, skips lm-eval with a note and writes its summary."""
    out = tmp_path / "run"
    script = ("import sys\n"
              "sys.modules['lm_eval'] = None\n"
              "sys.modules['matplotlib'] = None\n"
              "from hf_chts.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    command = [sys.executable, "-c", script, "train", str(ROOT / "recipes" / "tiny-llama-cpu.yaml"),
               "--training.max_steps", "40", "--run.output_dir", str(out), "--tokenizer.cache_dir",
               str(tmp_path / "tok")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / R.SUMMARY_FILE).read_text())
    assert summary["lm_eval"]["skipped"] and "hf_chts[eval]" in summary["lm_eval"]["skipped"]
    assert summary["reload_check"]["match"] is True and summary["steps"] == 40
    assert "skipping the lm-eval step" in done.stderr and "lm-eval            skipped" in done.stdout
