"""Reading a recipe file (with overrides) into a validated :class:`~hf_chts.recipe.schema.Recipe`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..deepspeed_check import refuse_deepspeed
from ..suggest import did_you_mean_file
from .overrides import apply_overrides, parse_overrides
from .paths import check_input_paths
from .schema import Recipe
from .validation import recipe_from_dict

def refuse_deepspeed_section(raw: Any, where: str) -> None:
    """Refuse ``training.deepspeed`` before ``TrainingArguments`` sees it (see :mod:`hf_chts.deepspeed_check`)."""
    training = raw.get("training") if isinstance(raw, dict) else None
    refuse_deepspeed(where, training=training if isinstance(training, dict) else None)


def load_recipe(path: str | os.PathLike, overrides: list[str] | list[tuple[str, Any]] | None = None, *,
                overwrite: bool = False) -> Recipe:
    """Read, override and validate a recipe; check that every input path exists.

    Raises ``FileNotFoundError`` (recipe, text files, local dataset path) or
    ``ValueError`` (unknown key with a did-you-mean hint, bad value) — nothing
    is downloaded, trained or written here.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"recipe file {str(path)!r} is a folder; give the path of a recipe YAML file in it")
    if not path.is_file():
        hint = ""
        folder = path.parent if str(path.parent) else Path(".")
        if folder.is_dir():
            names = [p.name for p in [*folder.glob("*.yaml"), *folder.glob("*.yml")]]
            hint = did_you_mean_file(path.name, names) or (f" (recipes there: {', '.join(sorted(names))})" if names else "")
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist{hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not overrides:  # before recipe_from_dict builds TrainingArguments from the training section
        refuse_deepspeed_section(raw, str(path))
    recipe_from_dict(raw, where=str(path), check=not overrides)  # the file's own unknown keys / types first
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)
    raw = apply_overrides(raw, overrides or [])
    if overrides:
        refuse_deepspeed_section(raw, f"{path} (with overrides)")
    recipe = recipe_from_dict(raw, where=f"{path} (with overrides)" if overrides else str(path))
    recipe.source = str(path)
    if overwrite:
        recipe.run.overwrite = True
    check_input_paths(recipe)
    return recipe
