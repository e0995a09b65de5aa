"""Crash-safe commit of a checkpoint folder: stage a sibling folder, then swap it in.

The protocol (specified in docs/checkpoint-format.md#7-consistency-between-files-and-crash-safety) for a save to ``<parent>/<name>``:

1. take ``<parent>/.hf_chts-save.lock`` (``filelock``; concurrent saves to one
   parent are serialised) and recover what an interrupted earlier save left;
2. write the journal ``<parent>/.<name>.hf_chts-journal.json`` naming the
   staging folder ``<parent>/.<name>.hf_chts-staging-<id>``, then create that
   folder with a marker file ``.hf_chts_staging.json`` in it;
3. the caller writes the whole new checkpoint into the staging folder;
4. entries of the old folder that the old save did not write (Trainer files,
   the user's files) are hard-linked into the staging folder; every file and
   folder is ``fsync``-ed, the marker is removed and the journal records
   ``phase: "swapping"``;
5. swap: no old folder -> ``rename(staging, target)``; otherwise the two folders
   are exchanged atomically (Linux ``renameat2(RENAME_EXCHANGE)``), or, where
   the filesystem cannot, ``rename(target, retired)`` then ``rename(staging, target)``;
6. delete the old content and the journal.

Step 5 holds ``<parent>/.hf_chts-swap.lock`` exclusively (``flock``), and readers
(:func:`hf_chts.checkpointing.loading.read_one_save`) hold it shared while they read, so a swap waits for
the loads under way (at most ``HF_CHTS_SWAP_WAIT`` s, default 120; then it swaps and those loads start again).

With the exchange, ``<name>`` holds the complete old or the complete new
checkpoint at every instant. With the two-rename fallback, a crash between the
renames leaves no ``<name>``: loaders refuse it naming the journal, and the
next save (or :func:`recover_interrupted_save`) finishes the swap. Nothing is
deleted unless the journal or a marker says hf_chts created it.

``HF_CHTS_FAULT_AT=<step>`` makes the process ``os._exit`` at a named step
(:data:`FAULT_STEPS`); the fault-injection tests use it to kill a save there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..io_utils import atomic_write_text, fsync_path, read_json_object

logger = logging.getLogger("hf_chts.checkpoint")

FAULT_ENV = "HF_CHTS_FAULT_AT"
FAULT_STEPS = ("staged", "weights-written", "sparsity-written", "config-written", "foreign-linked", "synced",
               "retired", "swapped", "cleaned")
FAULT_EXIT_CODE = 86
LOCK_NAME = ".hf_chts-save.lock"
MARKER_NAME = ".hf_chts_staging.json"
LOCK_TIMEOUT_ENV = "HF_CHTS_SAVE_LOCK_TIMEOUT"
SWAP_LOCK_NAME = ".hf_chts-swap.lock"
SWAP_WAIT_ENV = "HF_CHTS_SWAP_WAIT"


def fault_point(step: str) -> None:
    """Test hook: exit the process at once (no cleanup, like SIGKILL) when ``HF_CHTS_FAULT_AT`` names ``step``."""
    if os.environ.get(FAULT_ENV) == step:
        os._exit(FAULT_EXIT_CODE)


def journal_path(target: Path) -> Path:
    """The journal file of saves to ``target`` (a sibling; present only while a save runs or was interrupted)."""
    return target.parent / f".{target.name}.hf_chts-journal.json"


def _sibling_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.hf_chts-(staging|retired)-[0-9a-f]{{32}}")


def _rmtree_ours(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f"{path} is not a folder hf_chts created; not deleting it")
    shutil.rmtree(path)


# ----------------------------------------------------------------- swapping
def _exchange(first: Path, second: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if os.environ.get("HF_CHTS_NO_RENAME_EXCHANGE") == "1":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(error, os.strerror(error), str(second))


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                fsync_path(path)
        fsync_path(folder)


def _link_into(source: Path, destination: Path) -> None:
    """Hard-link (copy where links are impossible) ``source`` to ``destination``; symlinks stay symlinks."""
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, destination)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def carry_foreign_entries(target: Path, staging: Path, is_owned: Callable[[str], bool]) -> list[str]:
    """Hard-link every entry of ``target`` that the old save did not write (``is_owned`` false) and the new
    save did not write either into ``staging``, so the swap keeps them. Returns their names."""
    carried = []
    if not target.is_dir():
        return carried
    for entry in sorted(target.iterdir()):
        if is_owned(entry.name) or entry.name == MARKER_NAME or os.path.lexists(staging / entry.name):
            continue
        _link_into(entry, staging / entry.name)
        carried.append(entry.name)
    return carried


# ----------------------------------------------------------------- recovery
def _read_journal(target: Path) -> dict | None:
    path = journal_path(target)
    if not os.path.lexists(path):
        return None
    try:
        return read_json_object(path, max_bytes=4096, what="save journal")
    except ValueError:
        return {}


def _journal_sibling(target: Path, journal: dict, key: str) -> Path | None:
    name = journal.get(key)
    if not isinstance(name, str) or not _sibling_pattern(target).fullmatch(name):
        return None  # never trust a journal entry that is not one of our own names for this target
    return target.parent / name


def _has_marker(folder: Path, target: Path) -> bool:
    try:
        marker = read_json_object(folder / MARKER_NAME, max_bytes=4096, what="staging marker")
    except ValueError:
        return False
    return marker.get("target") == target.name


def recover_interrupted_save(target: str | os.PathLike) -> list[str]:
    """Finish or undo a save to ``target`` that was interrupted, and delete what it left; returns what was done.

    Call it holding the save lock (:func:`save_lock`); saves call it themselves.
    Deletes only folders the journal names or that carry the staging marker of
    ``target``; other look-alike folders are reported (logged), never deleted.
    """
    target = Path(target)
    done = []
    journal = _read_journal(target)
    if journal is not None:
        staging = _journal_sibling(target, journal, "staging")
        retired = _journal_sibling(target, journal, "retired")
        if not target.exists() and retired is not None and retired.is_dir():
            swapping = journal.get("phase") == "swapping" and staging is not None and staging.is_dir()
            os.rename(staging if swapping else retired, target)
            fsync_path(target.parent)
            done.append(f"{'completed' if swapping else 'rolled back'} the interrupted save to {target}")
        for leftover in (staging, retired):
            if leftover is not None and leftover.is_dir() and not leftover.is_symlink():
                _rmtree_ours(leftover)
                done.append(f"deleted {leftover}")
        journal_path(target).unlink()  # an unreadable journal is ours too (our name), only the file is removed
        fsync_path(target.parent)
    pattern = _sibling_pattern(target)
    journal_temp = re.compile(rf"\.{re.escape(journal_path(target).name)}\.[a-z0-9_]+\.tmp")  # atomic_path's temp
    for entry in sorted(target.parent.iterdir()) if target.parent.is_dir() else []:
        if journal_temp.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
            done.append(f"deleted {entry}")
            continue
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        if _has_marker(entry, target):
            _rmtree_ours(entry)
            done.append(f"deleted {entry}")
        else:
            logger.warning("hf_chts: %s looks like a leftover of an interrupted save but carries no marker and no "
                           "journal names it; not deleting it — delete it yourself if it is not yours", entry)
    for line in done:
        logger.warning("hf_chts: %s", line)
    return done


def refuse_save_leftover(folder: str | os.PathLike) -> None:
    """``ValueError`` if ``folder`` is a staging or retired folder of a save (never a checkpoint to load)."""
    folder = Path(folder)
    if (re.fullmatch(r"\..+\.hf_chts-(staging|retired)-[0-9a-f]{32}", folder.name)
            or os.path.lexists(folder / MARKER_NAME)):
        raise ValueError(f"{folder} is the staging or retired folder of an hf_chts save, not a checkpoint; load the "
                         "folder the save was writing to (the next save there deletes this one)")


def interrupted_save_note(target: str | os.PathLike) -> str | None:
    """A sentence for error messages when a save to ``target`` was interrupted (journal present), else ``None``."""
    target = Path(target)
    if not journal_path(target).exists():
        return None
    return (f"a save to {target} was interrupted or is running (journal {journal_path(target)}); the next save to "
            f"this folder, or hf_chts.checkpointing.commit.recover_interrupted_save({str(target)!r}), restores a "
            "complete checkpoint")


# -------------------------------------------------------------------- commit
def drop_empty_target(target: Path) -> None:
    """Treat an empty folder at ``target`` as absent: remove it (``rmdir``, which refuses a non-empty folder).

    ``Trainer._save`` creates ``checkpoint-N/`` before ``save_pretrained`` runs; without this, a save killed
    before its swap would leave that empty folder behind, which ``get_last_checkpoint`` picks and resume then
    fails on. The working directory is left alone (removing it would break relative paths).
    """
    if target.is_symlink() or not target.is_dir():
        return
    with contextlib.suppress(OSError):
        if os.path.samefile(target, os.getcwd()):
            return
    with contextlib.suppress(OSError):  # not empty (or not ours to remove): saved into as before
        os.rmdir(target)
        fsync_path(target.parent)


@contextlib.contextmanager
def save_lock(target: Path) -> Iterator[None]:
    """Hold the save lock of ``target``'s parent folder (waits ``HF_CHTS_SAVE_LOCK_TIMEOUT`` s, default 3600)."""
    from filelock import FileLock, Timeout

    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, "3600"))
    lock = FileLock(str(target.parent / LOCK_NAME), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as error:
        raise TimeoutError(
            f"another process has been saving into {target.parent} for over {timeout:.0f} s (lock "
            f"{target.parent / LOCK_NAME}); wait for it, or raise {LOCK_TIMEOUT_ENV}"
        ) from error
    try:
        yield
    finally:
        lock.release()


def _flock(fd: int, operation: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not a POSIX system: the readers' save-id check alone protects them
        return True
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def readers_lock(folder: Path) -> Iterator[None]:
    """Hold the swap lock of ``folder``'s parent shared while reading ``folder`` (saves' swaps wait for it).

    Only an existing regular lock file is used (a reader never creates files; a folder no hf_chts save wrote
    into has none, and the save-id check of the readers still applies).
    """
    try:
        fd = os.open(folder.parent / SWAP_LOCK_NAME, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        yield
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            while not _flock(fd, _LOCK_SH):  # a swap holds it for milliseconds
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def swap_lock(target: Path) -> Iterator[None]:
    """Hold the swap lock of ``target``'s parent exclusively, waiting for readers up to ``HF_CHTS_SWAP_WAIT`` s."""
    try:
        fd = os.open(target.parent / SWAP_LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError:
        yield
        return
    try:
        wait = float(os.environ.get(SWAP_WAIT_ENV, "120"))
        deadline = time.monotonic() + wait
        while not _flock(fd, _LOCK_EX):
            if time.monotonic() >= deadline:
                logger.warning("hf_chts: a reader of %s held it for over %.0f s; swapping the new save in anyway (a "
                               "read that overlaps the swap starts again)", target, wait)
                break
            time.sleep(0.01)
        yield
    finally:
        os.close(fd)


_LOCK_SH, _LOCK_EX = 1, 2  # fcntl.LOCK_SH, fcntl.LOCK_EX


@contextlib.contextmanager
def staged_commit(target: str | os.PathLike, owned_by_old_save: Callable[[Path], Callable[[str], bool]],
                  *, link_first: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on a normal exit, commit it as ``target`` (module docstring).

    ``owned_by_old_save(target)`` (called under the lock) returns ``is_owned(name)``:
    whether an entry of the old ``target`` belongs to the previous save (it is then
    replaced, not carried over). The other entries are hard-linked into the staging
    folder after the caller wrote it, or before (``link_first``: the caller then only
    adds files no old entry has). On an exception the staging folder and the journal
    are removed and ``target`` is untouched.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = target.resolve()
    if not target.name or target.parent == target:
        raise ValueError(f"cannot save a checkpoint as {target}: choose a named folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; a checkpoint is a folder")
    refuse_working_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with save_lock(target):
        recover_interrupted_save(target)
        drop_empty_target(target)
        save_id = uuid.uuid4().hex
        staging = target.parent / f".{target.name}.hf_chts-staging-{save_id}"
        retired = target.parent / f".{target.name}.hf_chts-retired-{save_id}"
        journal = {"target": target.name, "staging": staging.name, "retired": retired.name, "phase": "staging"}
        atomic_write_text(journal_path(target), json.dumps(journal))
        staging.mkdir()
        (staging / MARKER_NAME).write_text(json.dumps({"target": target.name}), encoding="utf-8")
        fault_point("staged")
        try:
            is_owned = owned_by_old_save(target)
            if link_first:
                carry_foreign_entries(target, staging, is_owned)
            yield staging
            carry_foreign_entries(target, staging, is_owned)
            fault_point("foreign-linked")
            (staging / MARKER_NAME).unlink()
            _fsync_tree(staging)
            atomic_write_text(journal_path(target), json.dumps({**journal, "phase": "swapping"}))
            fault_point("synced")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            journal_path(target).unlink(missing_ok=True)
            raise
        with swap_lock(target):
            _swap(staging, target, retired)
        fault_point("swapped")
        for leftover in (staging, retired):
            if leftover.is_dir():
                shutil.rmtree(leftover)
        journal_path(target).unlink()
        fsync_path(target.parent)
        fault_point("cleaned")


def refuse_working_directory(target: Path) -> None:
    """``ValueError`` when ``target`` is the current working directory or one of its ancestors: the commit swaps
    the folder and deletes the old one, which would leave the process in a deleted folder."""
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:
        return
    resolved = target.resolve()
    if cwd == resolved or resolved in cwd.parents:
        where = "the current directory" if cwd == resolved else f"an ancestor of the current directory {cwd}"
        raise ValueError(f"cannot save a checkpoint into {target}: it is {where}, and a save replaces the whole "
                         "folder; save into a subfolder (e.g. 'checkpoint') or change directory first")


def _swap(staging: Path, target: Path, retired: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
    elif not _exchange(staging, target):  # the filesystem cannot exchange: two renames, journal covers the gap
        os.rename(target, retired)
        fsync_path(target.parent)
        fault_point("retired")
        os.rename(staging, target)
    fsync_path(target.parent)
