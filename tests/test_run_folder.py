"""``--overwrite`` never deletes what hf_chts did not create (fault injection on the output folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from hf_chts import recipe as R
from hf_chts.cli import main as cli_main
from hf_chts.recipe.run_folder import RUN_MARKER, read_run_marker


def write_recipe(path: Path, output_dir: str) -> Path:
    raw = {"run": {"output_dir": output_dir}, "data": {"builtin": "pydoc_topics"},
           "tokenizer": {"train_bpe": {"vocab_size": 300}}, "training": {"max_steps": 2}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def project_folder(folder: Path, *, marker: bool) -> dict[str, str]:
    """A folder that looks like a run (recipe.yaml, run_summary.json) plus the user's own files; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {R.RECIPE_COPY: "run: {}\n", R.SUMMARY_FILE: json.dumps({"recipe": {}}), "precious.py": "print(1)\n"}
    if marker:
        files[RUN_MARKER] = json.dumps({"run_id": "0123abcd"})
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "src").mkdir(exist_ok=True)
    (folder / "src" / "code.py").write_text("x = 1\n", encoding="utf-8")
    return {**files, "src/code.py": "x = 1\n"}


def assert_intact(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (folder / name).read_text(encoding="utf-8") == text, name


def assert_overwrite_refused(recipe_path: Path, folder: Path, files: dict[str, str], reason: str, capsys) -> None:
    """check_output_dir, prepare_output_dir and the CLI each refuse; nothing in ``folder`` is deleted."""
    recipe = R.load_recipe(recipe_path, overwrite=True)
    with pytest.raises(FileExistsError, match=reason):
        R.check_output_dir(recipe)
    assert_intact(folder, files)
    with pytest.raises(FileExistsError, match=reason):  # the deleting step checks again on its own
        R.prepare_output_dir(recipe, "overwrite")
    assert_intact(folder, files)
    assert cli_main(["train", str(recipe_path), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(reason, err) and "choose another run.output_dir" in err
    assert_intact(folder, files)


def test_output_dir_dot_is_never_cleared(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    files = project_folder(project, marker=True)  # even a marked folder is refused when it is the cwd
    recipe_path = write_recipe(tmp_path / "recipes" / "r.yaml", ".")
    monkeypatch.chdir(project)
    assert_overwrite_refused(recipe_path, project, files, "is the current directory", capsys)


def test_output_dir_parent_of_cwd_is_never_cleared(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    files = project_folder(project, marker=True)
    (project / "sub").mkdir()
    recipe_path = write_recipe(tmp_path / "recipes" / "r.yaml", "..")
    monkeypatch.chdir(project / "sub")
    assert_overwrite_refused(recipe_path, project, files, "contains the current directory", capsys)


def test_folder_without_marker_is_never_cleared(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    files = project_folder(project, marker=False)  # recipe.yaml + run_summary.json, but hf_chts did not create it
    recipe_path = write_recipe(tmp_path / "recipes" / "r.yaml", str(project.resolve()))
    monkeypatch.chdir(tmp_path)
    assert_overwrite_refused(recipe_path, project, files, f"has no valid {re.escape(RUN_MARKER)} marker", capsys)


def test_recipe_folder_is_never_cleared(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    files = project_folder(project, marker=True)
    recipe_path = write_recipe(project / "my-recipe.yaml", str(project))
    files["my-recipe.yaml"] = recipe_path.read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert_overwrite_refused(recipe_path, project, files, "contains the recipe file", capsys)


def test_home_folder_is_never_cleared(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    files = project_folder(home, marker=True)
    monkeypatch.setenv("HOME", str(home))
    recipe_path = write_recipe(tmp_path / "recipes" / "r.yaml", str(home))
    monkeypatch.chdir(tmp_path)
    assert_overwrite_refused(recipe_path, home, files, "is the home directory", capsys)


def test_symlink_output_dir_is_never_cleared(tmp_path, monkeypatch, capsys):
    target = tmp_path / "elsewhere"
    files = project_folder(target, marker=True)  # the target even looks like a run
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    recipe_path = write_recipe(tmp_path / "recipes" / "r.yaml", str(link))
    monkeypatch.chdir(tmp_path)
    assert_overwrite_refused(recipe_path, target, files, "is a symlink", capsys)
    assert link.is_symlink()


def test_recipe_named_like_the_run_copy_is_never_replaced(tmp_path, monkeypatch):
    project = tmp_path / "project"
    recipe_path = write_recipe(project / R.RECIPE_COPY, ".")
    text = recipe_path.read_text(encoding="utf-8")
    monkeypatch.chdir(project)
    with pytest.raises(FileExistsError, match="would replace it"):
        R.check_output_dir(R.load_recipe(recipe_path))
    assert recipe_path.read_text(encoding="utf-8") == text


def test_marked_run_folder_is_cleared_but_not_what_it_links_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "a"
    recipe_path = write_recipe(tmp_path / "recipes" / "r.yaml", str(out))
    recipe = R.load_recipe(recipe_path)
    assert R.check_output_dir(recipe) == "new"
    R.prepare_output_dir(recipe, "new")  # hf_chts claims the folder: a marker with a run id
    first = read_run_marker(out)
    assert first is not None and len(first["run_id"]) >= 16 and (out / R.RECIPE_COPY).is_file()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep", encoding="utf-8")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    (out / "data-link").symlink_to(outside, target_is_directory=True)
    overwrite = R.load_recipe(recipe_path, ["--training.max_steps", "3"], overwrite=True)
    assert R.check_output_dir(overwrite) == "overwrite"
    R.prepare_output_dir(overwrite, "overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted([RUN_MARKER, R.RECIPE_COPY])
    assert read_run_marker(out)["run_id"] != first["run_id"]
    assert (outside / "keep.txt").read_text(encoding="utf-8") == "keep"


def test_non_empty_folder_is_not_claimed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "r.yaml", str(out))
    recipe = R.load_recipe(recipe_path)
    R.prepare_output_dir(recipe, "new")
    assert read_run_marker(out) is not None
    (out / RUN_MARKER).write_text("[1, 2]", encoding="utf-8")  # not a valid marker: not a run any more
    assert read_run_marker(out) is None
    with pytest.raises(FileExistsError, match="no valid"):
        R.check_output_dir(R.load_recipe(recipe_path, overwrite=True))
    assert (out / R.RECIPE_COPY).is_file()
