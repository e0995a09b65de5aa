"""File I/O helpers: atomic writes (a temp file in the same folder, fsync, then rename), reading
only regular files and bounded JSON objects, ``fsync`` of files and folders.

A crash or an exception in the middle of a save leaves the previous file
intact instead of a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def looks_like_local_path(text: str) -> bool:
    """True for a filesystem path rather than a Hub id (``name`` or ``org/name``).

    Hub ids never start with ``.``, ``/`` or ``~``, hold at most one ``/`` and no ``\\``. An ``org/name``
    whose ``org`` is a folder here is a local path too: a mistyped ``runs/fnal`` is then reported as
    "no such folder" instead of being looked up on the Hub.
    """
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        return True
    first, slash, _ = text.partition("/")
    return bool(slash) and os.path.isdir(first)


#: pseudo-filesystems whose "regular" files report a size of 0 and may block a reader (``/proc/kmsg``)
PSEUDO_FILESYSTEMS = ("/proc", "/sys")


def require_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed); ``ValueError`` naming it otherwise.

    Uses ``os.stat`` + ``stat.S_ISREG`` *before* any ``open``: a FIFO, socket,
    device or folder in place of a checkpoint file is refused instead of
    blocking the process or failing with a raw ``IsADirectoryError``. A file
    under ``/proc`` or ``/sys`` (directly or through a symlink) is refused too:
    those pass as regular files but report size 0 and can block a reader.
    """
    import stat

    file = Path(path)
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError as error:
        raise ValueError(f"{file}: the {what} is missing (or a broken symlink); copy the complete checkpoint") from error
    except OSError as error:
        raise ValueError(f"{file}: cannot stat the {what} ({error})") from error
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "not a regular file")
        raise ValueError(f"{file}: the {what} is {kind}; a checkpoint holds regular files only — replace it with the "
                         "file written by the save")
    real = os.path.realpath(file)
    if any(real == root or real.startswith(root + os.sep) for root in PSEUDO_FILESYSTEMS):
        raise ValueError(f"{file}: the {what} is {real}, a file of the kernel's {real.split(os.sep)[1]} filesystem, "
                         "not a file a save wrote; replace it with the file written by the save")
    return file


def is_regular(path: str | os.PathLike) -> bool:
    """True when :func:`require_regular_file` accepts ``path`` (a regular file, not under /proc or /sys)."""
    try:
        require_regular_file(path)
    except ValueError:
        return False
    return True


def read_bounded_bytes(path: str | os.PathLike, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file (:func:`require_regular_file`) of at most ``max_bytes``.

    Reads at most the size ``fstat`` reports plus one byte: a file that reports a wrong size returns at
    once, and one that holds more than it reports is refused as changing while it is read.
    """
    file = require_regular_file(path, what)
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{file}: the {what} is {size} bytes, more than the {max_bytes} this reader accepts; it "
                             "is not the file hf_chts wrote")
        data = handle.read(size + 1)
    if len(data) > size:
        raise ValueError(f"{file}: the {what} holds more than the {size} bytes its size says; it changed while it "
                         "was read or is not a regular file — read it again when it is complete")
    return data


def read_json_object(path: str | os.PathLike, *, max_bytes: int = 64 * 2**20, what: str = "JSON file") -> dict:
    """A JSON object read from a regular file of at most ``max_bytes``; ``ValueError`` naming the file otherwise
    (not a regular file, too large, not UTF-8, invalid or too deeply nested JSON, not an object)."""
    file = Path(path)
    data = read_bounded_bytes(file, max_bytes=max_bytes, what=what)
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError as error:
        raise ValueError(f"{file}: the {what} is nested too deeply to parse; it is corrupted or hostile") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); it is truncated or corrupted — re-save it") from error
    if not isinstance(value, dict):
        raise ValueError(f"{file}: the {what} holds a JSON {type(value).__name__}, expected an object")
    return value


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a file or a folder (a folder's entries: renames into it become durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
