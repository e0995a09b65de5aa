"""A recipe's input paths (data files, local datasets, tokenizers and model configs) and its output folder."""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
from pathlib import Path

import yaml

from ..io_utils import atomic_write_text, looks_like_local_path
from .models import check_model_source
from .resume import check_resume_matches
from .run_folder import (
    RUN_MARKER, RunFolderInUse, check_run_folder_free, clear_run_folder, create_run_marker, hold_run_folder,
    overwrite_refusal, read_run_marker, release_run_folder,
)
from .schema import RECIPE_COPY, SUMMARY_FILE, Recipe

logger = logging.getLogger(__name__)


def resolve_text_files(patterns: list[str], field: str = "data.text_files") -> list[str]:
    """Expand globs; every entry must match at least one existing file (errors name ``field``)."""
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else ([expanded] if os.path.isfile(expanded) else [])
        if not matches:
            kind = "pattern matches no file" if glob.has_magic(expanded) else "file does not exist"
            raise FileNotFoundError(f"{field}: {pattern!r}: {kind} (relative paths resolve against "
                                    f"the working directory {os.getcwd()})")
        files.extend(os.path.abspath(m) for m in matches)
    return files


def check_input_paths(recipe: Recipe) -> None:
    """Every local input exists (data files and globs, dataset and tokenizer folders) and the model config
    loads; ``FileNotFoundError`` / ``ValueError`` naming the recipe file, the field and the fix."""
    where = recipe.source or "recipe"
    data = recipe.data
    try:
        if data.text_files:
            data.text_files = resolve_text_files(data.text_files)
        if data.data_files:
            data.data_files = resolve_text_files(data.data_files, "data.data_files")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{where}: {error}") from error
    if data.dataset and looks_like_local_path(data.dataset) and not os.path.exists(os.path.expanduser(data.dataset)):
        raise FileNotFoundError(f"{where}: data.dataset: local path {data.dataset!r} does not exist (a Hub dataset "
                                "is named 'org/name', e.g. Skylion007/openwebtext)")
    check_model_source(recipe)
    name = recipe.tokenizer.name
    if name and looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"{where}: tokenizer.name: local path {name!r} does not exist")


def _comparable(recipe_dict: dict) -> dict:
    data = copy.deepcopy(recipe_dict)
    for key in ("overwrite", "resume"):
        data.get("run", {}).pop(key, None)
    return data


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_diff_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def check_output_dir(recipe: Recipe) -> str:
    """Decide what to do with ``run.output_dir``: ``"new"``, ``"resume"`` or ``"overwrite"``.

    Raises ``FileExistsError`` when the folder holds a different (or finished)
    run and neither ``--overwrite`` nor ``run.resume`` was given, when it is
    a non-empty folder that is not an hf_chts run (never deleted), or when
    ``--overwrite`` may not clear it (see :func:`~hf_chts.recipe.run_folder.overwrite_refusal`:
    only folders holding hf_chts's run marker, never the current/home folder, a
    symlink or the recipe's folder).
    """
    out = recipe.output_dir
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise FileExistsError(f"run.output_dir {str(out)!r} exists and is not a folder")
    check_run_folder_free(out)  # another run is training there right now
    marker, summary = out / RECIPE_COPY, out / SUMMARY_FILE
    if recipe.source and marker.resolve() == Path(recipe.source).resolve():
        raise FileExistsError(f"run.output_dir {str(out)!r} is the folder of the recipe file {recipe.source!r}, and "
                              f"the run's {RECIPE_COPY} would replace it: choose another run.output_dir "
                              "(a dedicated folder such as runs/<name>)")
    if not marker.exists() and not summary.exists() and not (out / RUN_MARKER).exists():
        if any(out.iterdir()):
            raise FileExistsError(f"run.output_dir {str(out)!r} is a non-empty folder that holds no hf_chts run "
                                  f"({RECIPE_COPY} / {SUMMARY_FILE} missing); choose a new or empty folder")
        return "new"
    try:
        old = yaml.safe_load(marker.read_text(encoding="utf-8")) if marker.exists() else \
            json.loads(summary.read_text(encoding="utf-8")).get("recipe", {})
    except (yaml.YAMLError, json.JSONDecodeError, OSError):
        old = {}
    differences = _diff_keys(_comparable(old or {}), _comparable(recipe.to_dict()))
    finished = summary.exists()
    if recipe.run.overwrite:
        refusal = overwrite_refusal(out, recipe.source)
        if refusal:
            raise FileExistsError(refusal)
        return "overwrite"
    if recipe.run.resume:
        check_resume_matches(recipe)
        if differences:
            logger.warning("hf_chts: resuming in %s with a changed recipe: %s", out, "; ".join(differences[:8]))
        return "resume"
    if differences:
        raise FileExistsError(
            f"run.output_dir {str(out)!r} already holds a different run (recipe differs: {'; '.join(differences[:5])}"
            f"{' ...' if len(differences) > 5 else ''}); pass --overwrite to replace it, set run.resume: true to "
            "continue it, or choose another run.output_dir")
    if finished:
        raise FileExistsError(f"run.output_dir {str(out)!r} already holds a finished run of this recipe "
                              f"({SUMMARY_FILE}); pass --overwrite to train it again or choose another run.output_dir")
    return "new"  # same recipe, unfinished: start again from scratch (run.resume: true continues instead)


def prepare_output_dir(recipe: Recipe, mode: str) -> None:
    """Main process only: claim the folder (lock + run marker), clear it when overwriting, write the recipe copy.

    The folder's run lock is taken first and held until :func:`release_output_dir`
    (or the end of the process); under it the folder is checked again
    (:func:`check_output_dir` must still answer ``mode``), so a run that claimed
    it in the meantime is never overwritten or joined. Overwriting removes only
    the contents of a folder that holds hf_chts's run marker; a new or empty
    folder gets its marker by an exclusive create.
    """
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    hold_run_folder(out)
    try:
        now = check_output_dir(recipe)
        if now != mode:
            raise RunFolderInUse(f"run.output_dir {str(out)!r} changed while this run was starting (checked: {mode}, "
                                 f"now: {now}); start the run again")
        if mode == "overwrite":
            clear_run_folder(out, recipe.source)
        elif mode != "resume" and read_run_marker(out) is None and not any(out.iterdir()):
            create_run_marker(out)
        atomic_write_text(out / RECIPE_COPY, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    except BaseException:
        release_run_folder(out)
        raise


def release_output_dir(recipe: Recipe) -> None:
    """Release the run folder's lock taken by :func:`prepare_output_dir` (the run has ended)."""
    release_run_folder(recipe.output_dir)
