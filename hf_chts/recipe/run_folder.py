"""The run-folder marker and the rules that keep ``--overwrite`` from deleting anything hf_chts did not create.

hf_chts writes :data:`RUN_MARKER` (a small JSON file with a run id) into
``run.output_dir`` when it claims the folder for a run (a new or empty folder).
Only a folder holding a valid marker is ever cleared by ``--overwrite`` /
``run.overwrite: true``, and only its contents are removed (the folder itself
stays). Even with a marker, the folder is refused when it is a symlink, or when
the current directory, the home directory, ``/`` or the recipe file lies inside
it (which also covers every ancestor of those).

A run holds an exclusive lock on its folder (``flock`` on the folder itself) from
the moment it claims it until it ends (the OS releases it when the process dies),
and a new folder's marker is created exclusively (``link``: fails if one exists),
so of two runs started together into one folder exactly one proceeds; the other
fails with one line (:class:`RunFolderInUse`).
"""

from __future__ import annotations

import fcntl
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


def _marker_text(folder: str | os.PathLike) -> tuple[str, str]:
    run_id = uuid.uuid4().hex
    marker = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "hf_chts_version": __version__, "pid": os.getpid(), "path": str(Path(folder).resolve())}
    return run_id, json.dumps(marker, indent=2) + "\n"


def write_run_marker(folder: str | os.PathLike) -> str:
    """Write a fresh marker (new run id) into ``folder``, replacing any; returns the run id."""
    run_id, text = _marker_text(folder)
    atomic_write_text(Path(folder) / RUN_MARKER, text)
    return run_id


def create_run_marker(folder: str | os.PathLike) -> str:
    """Create the marker of a new run in ``folder`` exclusively; returns the run id.

    The complete file is written under a temporary name and hard-linked to
    :data:`RUN_MARKER`, which fails when a marker exists: raises
    :class:`RunFolderInUse` naming the run that claimed the folder first.
    """
    run_id, text = _marker_text(folder)
    temporary = Path(folder) / f".{RUN_MARKER}.{run_id}.tmp"
    temporary.write_text(text, encoding="utf-8")
    try:
        os.link(temporary, Path(folder) / RUN_MARKER)
    except FileExistsError:
        raise RunFolderInUse(f"run.output_dir {str(folder)!r} was claimed by another hf-chts run "
                             f"({_describe_run(folder)}) while this one was starting; choose another "
                             "run.output_dir") from None
    finally:
        temporary.unlink()
    return run_id


class RunFolderInUse(FileExistsError):
    """Another hf-chts run holds (or claimed first) the run folder."""


def _describe_run(folder: str | os.PathLike) -> str:
    marker = read_run_marker(folder)
    if marker is None:
        return "no readable run marker yet"
    return ", ".join(f"{key} {marker[key]}" for key in ("run_id", "pid", "created") if key in marker)


_HELD_LOCKS: dict[str, int] = {}


def hold_run_folder(folder: str | os.PathLike) -> None:
    """Take the run folder's exclusive lock for this process (kept until :func:`release_run_folder` or exit).

    Re-entrant within one process. Raises :class:`RunFolderInUse` (one line naming
    the holder's run id and pid from the marker) when another process holds it.
    """
    key = str(Path(folder).resolve())
    if key in _HELD_LOCKS:
        return
    descriptor = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RunFolderInUse(f"run.output_dir {str(folder)!r} is in use by another hf-chts run "
                             f"({_describe_run(folder)}); wait for it to end or choose another run.output_dir") from None
    _HELD_LOCKS[key] = descriptor


def release_run_folder(folder: str | os.PathLike) -> None:
    """Release the lock :func:`hold_run_folder` took (no-op when this process does not hold it)."""
    descriptor = _HELD_LOCKS.pop(str(Path(folder).resolve()), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the only descriptor of the lock releases it


def check_run_folder_free(folder: str | os.PathLike) -> None:
    """Raise :class:`RunFolderInUse` when another process holds ``folder``'s run lock (nothing is taken)."""
    if not Path(folder).is_dir() or str(Path(folder).resolve()) in _HELD_LOCKS:
        return
    hold_run_folder(folder)
    release_run_folder(folder)


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
