"""The run-folder marker and the rules that keep ``--overwrite`` from deleting anything hf_chts did not create.

hf_chts writes :data:`RUN_MARKER` (a small JSON file with a run id) into
``run.output_dir`` when it claims the folder for a run (a new or empty folder).
Only a folder holding a valid marker is ever cleared by ``--overwrite`` /
``run.overwrite: true``, and only its contents are removed (the folder itself
stays). Even with a marker, the folder is refused when it is a symlink, or when
the current directory, the home directory, ``/`` or the recipe file lies inside
it (which also covers every ancestor of those).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from ..io_utils import atomic_write_text
from ..version import __version__

RUN_MARKER = ".hf_chts_run.json"


def read_run_marker(folder: str | os.PathLike) -> dict | None:
    """The marker's contents when ``folder`` holds a valid hf_chts run marker, else ``None``.

    Valid means: a regular file (not a symlink) holding a JSON object with a
    non-empty string ``run_id``.
    """
    path = Path(folder) / RUN_MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str) or not data["run_id"]:
        return None
    return data


def write_run_marker(folder: str | os.PathLike) -> str:
    """Write a fresh marker (new run id) into ``folder``; returns the run id."""
    run_id = uuid.uuid4().hex
    marker = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "hf_chts_version": __version__, "path": str(Path(folder).resolve())}
    atomic_write_text(Path(folder) / RUN_MARKER, json.dumps(marker, indent=2) + "\n")
    return run_id


def _protected_places(recipe_source: str | None) -> list[tuple[str, Path]]:
    places = [("the current directory", Path.cwd().resolve()), ("the home directory", Path.home().resolve()),
              ("/", Path("/").resolve())]
    if recipe_source:
        places.append((f"the recipe file {recipe_source!r}", Path(recipe_source).resolve()))
    return places


def overwrite_refusal(folder: str | os.PathLike, recipe_source: str | None = None) -> str | None:
    """Why ``--overwrite`` must not clear ``folder`` (one line with what to do), or ``None`` when it may.

    Refused: a symlink (its target is not ours to delete), a folder that holds
    (or is) the current directory, the home directory, ``/`` or the recipe
    file, and any folder without a valid :data:`RUN_MARKER`.
    """
    out = Path(folder)
    fix = "choose another run.output_dir (a dedicated folder such as runs/<name>)"
    if out.is_symlink():
        return (f"run.output_dir {str(out)!r} is a symlink (to {os.readlink(out)!r}); --overwrite never deletes a "
                f"symlink's target: {fix}")
    resolved = out.resolve()
    for what, place in _protected_places(recipe_source):
        if place == resolved or resolved in place.parents:
            where = "is" if place == resolved else "contains"
            return (f"run.output_dir {str(out)!r} (= {resolved}) {where} {what}; --overwrite never deletes it: "
                    f"{fix}")
    if read_run_marker(out) is None:
        return (f"run.output_dir {str(out)!r} has no valid {RUN_MARKER} marker, so hf_chts did not create it "
                f"(or it predates the marker); --overwrite never deletes it: delete it yourself or {fix}")
    return None


def clear_run_folder(folder: str | os.PathLike, recipe_source: str | None = None) -> str:
    """Delete the contents of an hf_chts run folder and mark it as a new run; returns the new run id.

    Checks :func:`overwrite_refusal` again right before deleting (raises
    ``FileExistsError`` with its message). The marker is removed last, so an
    interrupted clear leaves a folder that is still recognised as a run.
    """
    refusal = overwrite_refusal(folder, recipe_source)
    if refusal:
        raise FileExistsError(refusal)
    out = Path(folder)
    for entry in out.iterdir():
        if entry.name == RUN_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return write_run_marker(out)
