"""One save, one folder: the save id and the manifest that bind a checkpoint's files together.

Every save draws a new ``save_id``. ``sparsity.safetensors`` (and the compact
format's ``sparse_weights.safetensors``) carry it in their metadata, and
``sparsify_config.json`` -- written last -- carries it with a ``manifest``: the
size and SHA-256 of every other file the save wrote (weights, ``config.json``,
tokenizer files, ...). :func:`verify_checkpoint` checks all of it before a
loader trusts the folder; specified in
docs/checkpoint-format.md#7-consistency-between-files-and-crash-safety.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

from ..io_utils import require_regular_file
from .commit import MARKER_NAME
from .format import CONFIG_FILE, SPARSE_WEIGHTS_FILE, SPARSITY_FILE, is_weight_file, read_safetensors_metadata

logger = logging.getLogger("hf_chts.checkpoint")

_SAVE_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 * 2**20
DOCUMENTATION_FILES = ("README.md",)  # in the manifest, but a changed copy is reported, not refused


#: ``verify`` modes of the readers: ``full`` hashes every file, ``fast`` checks the safetensors files' sizes,
#: headers and save ids instead of hashing them (docs/checkpoint-format.md#71-save-id-and-manifest)
VERIFY_MODES = ("full", "fast")
VERIFY_ENV = "HF_CHTS_VERIFY"
_DIGESTS: dict[tuple, str] = {}  # (device, inode, size, mtime_ns, ctime_ns) -> SHA-256, this process's hashes
_DIGEST_CACHE_ENTRIES = 4096
_SETTLE_NS = 2 * 10**9


def verify_mode(mode: str | None) -> str:
    """``mode`` checked (``None``: the ``HF_CHTS_VERIFY`` environment variable, else ``"full"``)."""
    chosen = mode if mode is not None else os.environ.get(VERIFY_ENV) or "full"
    if chosen not in VERIFY_MODES:
        where = f"{VERIFY_ENV}={chosen!r}" if mode is None else f"verify={chosen!r}"
        raise ValueError(f"{where} is not a verification mode: use 'full' (hash every file) or 'fast' (sizes, "
                         "headers and save ids)")
    return chosen


def clear_digest_cache() -> None:
    """Forget the digests this process remembered (:func:`file_digest`); the next verification hashes again."""
    _DIGESTS.clear()


def file_digest(path: Path) -> dict:
    """``{"size", "sha256"}`` of a regular file, reading at most its ``fstat`` size (+1 to notice growth).

    A file is hashed once per process: the digest is remembered under the file's identity (device,
    inode, size, modification and change times in ns), which any rewrite, rename-over or in-place edit changes.
    A file changed less than :data:`_SETTLE_NS` before the hash starts is not remembered: file times tick
    coarsely (a few ms), so an edit in the same tick would keep the identity.
    """
    started = time.time_ns()
    with open(require_regular_file(path), "rb") as handle:
        info = os.fstat(handle.fileno())
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if key in _DIGESTS:
            return {"size": info.st_size, "sha256": _DIGESTS[key]}
        digest, remaining = hashlib.sha256(), info.st_size + 1
        while remaining > 0 and (chunk := handle.read(min(_CHUNK, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    if remaining <= 0:
        raise ValueError(f"{path}: the file grew while it was hashed; read it again when it is complete")
    if started - max(info.st_mtime_ns, info.st_ctime_ns) > _SETTLE_NS:
        if len(_DIGESTS) >= _DIGEST_CACHE_ENTRIES:
            _DIGESTS.clear()
        _DIGESTS[key] = digest.hexdigest()
    return {"size": info.st_size, "sha256": digest.hexdigest()}


def build_manifest(folder: Path, names: list[str] | None = None) -> dict[str, dict]:
    """Digest of each file ``names`` (default: every regular file under ``folder`` except ``sparsify_config.json``,
    by ``/``-separated relative path)."""
    if names is None:
        names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                       if path.is_file() and not path.is_symlink() and path.name not in (CONFIG_FILE, MARKER_NAME))
    return {name: file_digest(folder / name) for name in names}


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


def stored_save_id(file: Path) -> str | None:
    """The ``save_id`` metadata of an hf_chts safetensors file (``None`` if absent)."""
    return read_safetensors_metadata(file).get("save_id")


def verify_checkpoint(folder: str | os.PathLike, record: dict, *, mode: str = "full") -> None:
    """Refuse a folder whose files are not all from the save ``record`` (its ``sparsify_config.json``) describes.

    Checks, collecting every problem before raising one ``ValueError`` that names
    each file: every manifest file is a regular file with the recorded size and
    SHA-256; ``sparsity.safetensors`` / ``sparse_weights.safetensors`` carry the
    record's ``save_id``; no weight file, mask file or compact file outside the
    manifest sits in the folder (transformers would load it). Folders of format
    version 1 (written before save ids existed) are accepted with a warning.
    """
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if record.get("format_version", 1) < 2:
        logger.warning("hf_chts: %s is format version 1 (no save id/manifest): its files cannot be verified to come "
                       "from one save; re-save it with this hf_chts to make it verifiable", config_file)
        return
    save_id, manifest = record.get("save_id"), record.get("manifest")
    if not isinstance(save_id, str) or not _SAVE_ID.fullmatch(save_id):
        raise ValueError(f"{config_file}: field 'save_id' is {save_id!r}, expected 32 hex digits; the file is corrupted")
    if not isinstance(manifest, dict) or not manifest:
        raise ValueError(f"{config_file}: field 'manifest' is missing or empty; the file is corrupted")
    problems, documentation = [], []
    for name, entry in sorted(manifest.items()):
        if not _safe_name(name):
            raise ValueError(f"{config_file}: field 'manifest' names {name!r}, not a relative path inside the folder")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
                and _SHA256.fullmatch(entry["sha256"])):
            raise ValueError(f"{config_file}: field 'manifest' entry {name!r} is {entry!r:.80}, expected "
                             "{'size': int, 'sha256': 64 hex digits}")
        path = folder / name
        # the model card is documentation, often edited (on the Hub) after the save: a change is only reported
        report = problems if name not in DOCUMENTATION_FILES or not os.path.lexists(path) else documentation
        try:
            require_regular_file(path, "file listed in the manifest")
        except ValueError as error:
            problems.append(f"{name}: {error}")
            continue
        size = os.stat(path).st_size
        if size != entry["size"]:
            report.append(f"{name}: {size} bytes, the save wrote {entry['size']}")
        elif mode == "fast" and name.endswith(".safetensors"):
            try:
                read_safetensors_metadata(path)  # the header, checked against the size
            except ValueError as error:
                report.append(f"{name}: {error}")
        elif file_digest(path)["sha256"] != entry["sha256"]:
            report.append(f"{name}: SHA-256 differs from the one the save recorded")
    for line in documentation:
        logger.warning("hf_chts: %s: %s (changed after save %s; it does not affect loading)", folder, line, save_id)
    for name in (SPARSITY_FILE, SPARSE_WEIGHTS_FILE):
        path = folder / name
        if not os.path.lexists(path) or name not in manifest:
            continue
        try:
            stored = stored_save_id(path)
        except ValueError as error:
            problems.append(f"{name}: {error}")
            continue
        if stored != save_id:
            problems.append(f"{name}: save id {stored!r}, but {CONFIG_FILE} is from save {save_id!r}")
    for entry in sorted(os.listdir(folder)):
        if entry not in manifest and (is_weight_file(entry) or entry in (SPARSITY_FILE, SPARSE_WEIGHTS_FILE)):
            problems.append(f"{entry}: not written by save {save_id} (not in the manifest of {CONFIG_FILE})")
    if problems:
        raise ValueError(
            f"{folder} mixes files of different saves or files changed after save {save_id}: " + "; ".join(problems)
            + ". Load a complete checkpoint (copy every file of one save) or save it again"
        )



def owned_by_old_save(target: Path):
    """``is_owned(name)`` for the entries of an existing checkpoint folder that a new full save replaces: the
    files its manifest lists, the hf_chts files and transformers weight files (as ``save_pretrained`` does)."""
    from .format import read_sparsify_config

    listed: set[str] = set()
    try:
        record = read_sparsify_config(target) if target.is_dir() else None
    except ValueError:
        record = None
    if record is not None and isinstance(record.get("manifest"), dict):
        listed = {str(name).split("/")[0] for name in record["manifest"]}
    own = {CONFIG_FILE, SPARSITY_FILE, SPARSE_WEIGHTS_FILE}
    return lambda name: name in listed or name in own or is_weight_file(name)


def owned_sparsity_files(target: Path):
    """``is_owned(name)`` for a refresh of the sparsity files only (every other entry is kept)."""
    return lambda name: name in (CONFIG_FILE, SPARSITY_FILE)
