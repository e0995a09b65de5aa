"""Loading sparse checkpoints: the masked model, ``read_engine_state`` and finding a checkpoint (folder or Hub).

:func:`open_checkpoint` verifies a folder and reads its masks and SparsifyConfig;
:func:`load_masked_model` builds the sparsified (masked, trainable) model from it.
``hf_chts.load_sparse`` (:mod:`hf_chts.checkpoint`) picks that or the inference-only
model of :mod:`hf_chts.inference.loading`, which builds on :func:`open_checkpoint` too.
What is checked on load: docs/checkpoint-format.md#5-validation-on-load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..config import SparsifyConfig
from ..io_utils import looks_like_local_path, read_bounded_bytes, read_json_object
from ..layers import logical_shape_of
from ..lora import refuse_adapter_files
from ..model import modules_named, select_modules, sparsify
from ..state import find_state
from .commit import interrupted_save_note, readers_lock, refuse_save_leftover
from .compact import fill_compact, read_compact_values, without_compact_marker
from .format import (
    CONFIG_FILE, SPARSE_WEIGHTS_FILE, SPARSITY_FILE, config_from_record, decode_engine_record, is_weight_file,
    module_name_of, read_masks, read_safetensors_metadata, read_sparsify_config,
)
from .manifest import verify_checkpoint, verify_mode

logger = logging.getLogger("hf_chts.checkpoint")  # the logger name users configure, whichever module logs

_HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "README.md"]


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                       cache_dir: str | None = None, local_files_only: bool | None = None) -> Path:
    """A local folder for a checkpoint path or a Hub repo id (``snapshot_download``; honours HF_HUB_OFFLINE)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        refuse_save_leftover(local)
        return local
    if local.exists():
        raise ValueError(f"{local} is a file; a checkpoint is a folder")
    text = str(path_or_repo_id)
    note = interrupted_save_note(local)
    if note is not None:
        raise FileNotFoundError(f"checkpoint folder {text} does not exist: {note}")
    if looks_like_local_path(text):
        raise FileNotFoundError(f"no such folder {text!r}: the checkpoint folder does not exist (relative paths "
                                f"resolve against {Path.cwd()}; a Hub repo id is 'org/name')")
    from huggingface_hub import constants, snapshot_download

    offline = constants.is_offline_mode() if local_files_only is None else bool(local_files_only)
    try:
        return Path(snapshot_download(repo_id=text, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=offline, allow_patterns=_HUB_ALLOW_PATTERNS))
    except Exception as error:
        where = "in the local Hugging Face cache (offline mode)" if offline else "on the Hugging Face Hub"
        raise FileNotFoundError(
            f"{text!r} is not a local checkpoint folder and could not be found {where}: {type(error).__name__}: {error}"
        ) from error


def validate_masks(file: Path, model: nn.Module, config: SparsifyConfig,
                   masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks by module name, checked against ``model``: each mask names a linear module of the
    model (the stored ``target_modules`` pattern is never run) with the mask's logical shape."""
    if config.is_dense:
        if masks:
            raise ValueError(f"{file} holds {len(masks)} masks but the stored SparsifyConfig is dense")
        return {}
    if not masks:
        raise ValueError(f"{file} holds no masks but the stored SparsifyConfig is sparse; the file is corrupted")
    by_name = {module_name_of(key): mask for key, mask in masks.items()}
    if not isinstance(config.target_modules, str) and not isinstance(config.exclude_modules, str):
        _check_selection(file, model, config, set(by_name))  # names and suffixes only: no stored regex is run
    try:
        modules = modules_named(model, by_name)
    except ValueError as error:
        raise ValueError(f"{file}: mask for {error}; the file belongs to another model") from error
    for name, module in modules.items():
        logical = logical_shape_of(module)
        if tuple(by_name[name].shape) != tuple(logical):
            raise ValueError(
                f"{file}: mask '{name}.weight' has logical shape {list(by_name[name].shape)} but the model's layer is "
                f"{list(logical)} (out x in); the file belongs to another model"
            )
    return by_name


def _check_selection(file: Path, model: nn.Module, config: SparsifyConfig, names: set[str]) -> None:
    """The masks' modules are the ones ``config`` selects (module names/suffixes or the architecture's roles)."""
    try:
        expected = set(select_modules(model, config))
    except ValueError as error:
        raise ValueError(f"{file.parent / CONFIG_FILE}: {error}") from error
    extra, missing = sorted(names - expected), sorted(expected - names)
    if extra:
        raise ValueError(f"{file}: mask {extra[0] + '.weight'!r} matches no sparsified layer of this "
                         f"{type(model).__name__} ({len(extra)} such masks); the file belongs to another model or config")
    if missing:
        raise ValueError(f"{file}: no mask for the sparsified layer {missing[0] + '.weight'!r} ({len(missing)} missing); "
                         "the file belongs to another model or config, or is incomplete")


def check_masked_weights_are_zero(file: Path, model: nn.Module, by_name: dict[str, torch.Tensor]) -> None:
    """``ValueError`` when a stored weight is not exactly 0 at a masked position (NaN and inf included): the
    masks file then comes from another checkpoint, and applying it would zero live weights."""
    modules = dict(model.named_modules())
    for name, mask in sorted(by_name.items()):
        weight = modules[name].weight.detach()
        if weight.device.type == "meta":  # offloaded by a device_map: not materialised here
            continue
        logical = weight if isinstance(modules[name], nn.Linear) else weight.t()  # Conv1D stores in x out
        stray = int((logical[~mask.to(logical.device)] != 0).sum())
        if stray:
            raise ValueError(
                f"{file}: mask '{name}.weight' marks {stray} weights as masked that the weight files store as non-zero; "
                "the masks come from another checkpoint (a masked weight is exactly 0) — copy the complete checkpoint"
            )


def check_model_files(folder: Path) -> None:
    """Parse ``config.json`` and check every safetensors weight file's header (against the file size) before
    transformers opens them: a folder, FIFO, hostile JSON or truncated file gives a ``ValueError`` naming it."""
    config = read_json_object(folder / "config.json", max_bytes=16 * 2**20, what="model config")
    if not isinstance(config.get("model_type", ""), str):
        raise ValueError(f"{folder / 'config.json'}: field 'model_type' must be a string")
    for name in sorted(os.listdir(folder)):
        if is_weight_file(name) and name.endswith(".safetensors"):
            read_safetensors_metadata(folder / name)
        elif is_weight_file(name) and name.endswith(".index.json"):
            read_json_object(folder / name, what="weight index")


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _from_pretrained(folder: Path, sparse_keys: set[str], compact: bool, kwargs: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs)
    kwargs.pop("output_loading_info", None)
    kwargs.setdefault("trust_remote_code", False)  # never run code from a checkpoint unless the caller opts in
    if compact and isinstance(kwargs.get("config"), (str, os.PathLike, type(None))):
        from transformers import AutoConfig  # its config.json makes a plain from_pretrained refuse the folder

        kwargs["config"] = AutoConfig.from_pretrained(str(kwargs.get("config") or folder),
                                                      trust_remote_code=kwargs["trust_remote_code"])
    if compact:
        without_compact_marker(kwargs["config"])
    context = quiet_transformers() if compact else contextlib.nullcontext()
    with context:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    missing = set(info.get("missing_keys", ()))
    if not compact and missing & sparse_keys:
        raise ValueError(
            f"{folder}: the weight files lack sparsified weights {sorted(missing & sparse_keys)[:5]}; "
            "the checkpoint is incomplete"
        )
    if compact and missing - sparse_keys:
        logger.warning("hf_chts: %s: weights %s were missing and randomly initialised", folder,
                       sorted(missing - sparse_keys)[:5])
    return model


@dataclass
class SparseCheckpoint:
    """A verified sparse checkpoint folder: its ``sparsify_config.json`` record, the SparsifyConfig,
    the masks (keyed by weight key, not yet checked against a model) and whether it is compact."""

    folder: Path
    record: dict
    config: SparsifyConfig
    masks: dict[str, torch.Tensor]
    compact: bool


def open_checkpoint(folder: Path, record: dict | None) -> SparseCheckpoint | None:
    """Read the masks and SparsifyConfig of ``folder``, whose ``record`` :func:`read_one_save` verified
    (every file from one save, headers and config parsed); ``None`` for a plain model folder (no hf_chts
    files), which loads dense.

    Raises ``ValueError`` naming the file for a folder with only part of the sparse files, or with a
    LoRA adapter's files (transformers would load them into the model).
    """
    compact = (folder / SPARSE_WEIGHTS_FILE).exists()
    check_model_files(folder)
    refuse_adapter_files(folder)  # transformers would load them into the model (docstring of hf_chts.lora)
    if not os.path.lexists(folder / SPARSITY_FILE):
        if compact or record is not None:
            raise ValueError(
                f"{folder} has {SPARSE_WEIGHTS_FILE if compact else CONFIG_FILE} but no {SPARSITY_FILE}: the sparse "
                "model cannot be restored without the masks; copy the complete checkpoint"
            )
        return None
    masks = read_masks(folder)
    if record is None:
        raise ValueError(
            f"{folder} has {SPARSITY_FILE} but no {CONFIG_FILE}: the SparsifyConfig needed to restore the layers is "
            "missing; copy the complete checkpoint"
        )
    return SparseCheckpoint(folder, record, config_from_record(folder / CONFIG_FILE, record), masks, compact)


def load_dense_model(folder: Path, from_pretrained_kwargs: dict) -> nn.Module:
    """A plain model folder (no hf_chts files) loaded dense with ``from_pretrained``, with a warning."""
    from transformers import AutoModelForCausalLM

    logger.warning("hf_chts: %s has no %s; loading it as a dense model (not sparse)", folder, SPARSITY_FILE)
    kwargs = {"trust_remote_code": False, **from_pretrained_kwargs}
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)


def load_masked_model(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                      cache_dir: str | None = None, local_files_only: bool | None = None, verify: str | None = None,
                      **from_pretrained_kwargs) -> nn.Module:
    """The sparsified (masked) model of a checkpoint: ``hf_chts.load_sparse`` without ``inference=True``.

    Loads the weights with ``AutoModelForCausalLM.from_pretrained`` (expanding
    the compact format when present), validates the masks against the model and
    calls ``sparsify(model, config, masks=...)``; everything is read from one save
    (:func:`read_one_save`); see :func:`hf_chts.checkpoint.load_sparse`.
    """
    folder = resolve_checkpoint(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                local_files_only=local_files_only)
    return read_one_save(folder, lambda record: masked_model_of(folder, record, dict(from_pretrained_kwargs)),
                         verify=verify)


def masked_model_of(folder: Path, record: dict | None, from_pretrained_kwargs: dict) -> nn.Module:
    """One attempt of :func:`load_masked_model` on a folder whose ``record`` was verified."""
    checkpoint = open_checkpoint(folder, record)
    if checkpoint is None:
        return load_dense_model(folder, from_pretrained_kwargs)
    config, masks, compact, record = checkpoint.config, checkpoint.masks, checkpoint.compact, checkpoint.record
    values = read_compact_values(folder, masks) if compact else None
    model = _from_pretrained(folder, set(masks), compact, from_pretrained_kwargs)
    by_name = validate_masks(folder / SPARSITY_FILE, model, config, masks)
    if values is None:
        check_masked_weights_are_zero(folder / SPARSITY_FILE, model, by_name)
    sparsify(model, config, masks=by_name)
    if values is not None:
        fill_compact(model, values)
    state = find_state(model)
    state.loaded_engine_record = record.get("engine")
    return model


#: how many times a read of a checkpoint starts again when a save replaces the folder during the read
READ_ATTEMPTS = 5
_RECORD_LIMIT = 64 * 2**20
_Result = TypeVar("_Result")


def save_fingerprint(folder: Path) -> bytes | None:
    """The bytes of ``folder``'s ``sparsify_config.json`` (``None`` when absent or unreadable).

    Every save writes a new save id into this file and swaps the whole folder, so two equal fingerprints
    taken before and after a read mean that every file the read opened belongs to that one save.
    """
    try:
        return read_bounded_bytes(folder / CONFIG_FILE, max_bytes=_RECORD_LIMIT, what=CONFIG_FILE)
    except ValueError:
        return None


def read_one_save(folder: Path, read: Callable[[dict | None], _Result], *, verify: str | None = None) -> _Result:
    """``read(record)`` on ``folder`` after verifying it, such that everything ``read`` took from the folder
    comes from the one save that ``record`` (its ``sparsify_config.json``) describes.

    hf_chts saves wait for the read before swapping the folder (a shared ``flock`` on the parent's
    ``.hf_chts-swap.lock``, when it exists). And since a save swaps a whole new folder in and every save
    has its own save id, the record's bytes are compared before and after the read (a sequence lock):
    when a save replaced the folder meanwhile, the result (or the error, e.g. a manifest mismatch the swap
    caused) is discarded and the read starts again, up to :data:`READ_ATTEMPTS` times; then one
    ``ValueError`` says why. An error raised while the folder stayed the same is the folder's own and is
    raised at once.
    """
    mode = verify_mode(verify)
    for attempt in range(READ_ATTEMPTS):
        with readers_lock(folder):  # hf_chts saves into the parent wait for this read before swapping
            before = save_fingerprint(folder)
            try:
                result = read(verified_record(folder, verify=mode))
            except Exception:
                if save_fingerprint(folder) == before:
                    raise
            else:
                if save_fingerprint(folder) == before:
                    return result
        logger.info("hf_chts: %s was replaced by a save while it was read (attempt %d of %d); reading it again",
                    folder, attempt + 1, READ_ATTEMPTS)
        time.sleep(0.05 * (attempt + 1))
    raise ValueError(
        f"{folder}: a save replaced this checkpoint during each of {READ_ATTEMPTS} attempts to read it (a process "
        "is saving into it); read it when the saves stop, or copy a finished checkpoint elsewhere and read the copy"
    )


def verified_record(folder: Path, *, verify: str | None = None) -> dict | None:
    """The ``sparsify_config.json`` record of ``folder`` after checking that every file is from that save
    (:func:`~hf_chts.checkpointing.manifest.verify_checkpoint`, ``verify`` one of ``"full"``, ``"fast"``);
    ``None`` for a folder without one. Use :func:`read_one_save` to read files of that save afterwards."""
    record = read_sparsify_config(folder)
    if record is not None:
        verify_checkpoint(folder, record, mode=verify_mode(verify))
    return record


def read_engine_state(path: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                      cache_dir: str | None = None, local_files_only: bool | None = None,
                      verify: str | None = None) -> dict | None:
    """The sparse-training engine state saved in a checkpoint, in ``SparseTrainingEngine.state_dict()`` format.

    ``engine.load_state_dict(read_engine_state(folder))`` resumes exactly (step,
    RNG, masks, history). Returns ``None`` when the folder holds no engine
    progress (saved without an engine attached, or no ``sparsify_config.json``).
    ``verify`` as in :func:`load_sparse`; the record and the masks come from one save.
    """
    folder = resolve_checkpoint(path, revision=revision, token=token, cache_dir=cache_dir,
                                local_files_only=local_files_only)

    def read(record: dict | None) -> dict | None:
        if record is None or record.get("engine") is None:
            return None
        return decode_engine_record(record["engine"], read_masks(folder), record["config"])

    return read_one_save(folder, read, verify=verify)

