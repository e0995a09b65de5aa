"""Sparse checkpoints: ``save_sparse`` / ``load_sparse``, the Hub, ``hf-chts inspect`` / ``export``.

A checkpoint folder is a normal Hugging Face model folder plus two files::

    config.json, generation_config.json      (transformers)
    model.safetensors (or shards + index)    dense weights, exactly 0 at masked positions
    tokenizer files                          (when a tokenizer is given)
    sparsity.safetensors                     one uint8 entry per sparsified weight
    sparsify_config.json                     SparsifyConfig + sparse-training progress

``sparsity.safetensors``
    key: the weight's ``state_dict`` key (``model.layers.0.self_attn.q_proj.weight``);
    value: the boolean mask in the *logical* ``out x in`` layout (also for GPT-2's
    ``Conv1D``, whose weight is stored ``in x out``), bit-packed with
    ``numpy.packbits(mask, axis=-1, bitorder="little")`` -> uint8 ``[out, ceil(in/8)]``.
    Metadata (str -> str): ``hf_chts_format_version``, ``content`` (``"masks"``),
    ``packing``, ``shapes`` (JSON ``{key: [out, in]}``) and ``crc32`` (JSON
    ``{key: crc32 of the packed bytes}``, checked on load).

``sparsify_config.json``
    ``{"format_version": 1, "hf_chts_version", "weights_format": "dense"|"compact",
    "config": SparsifyConfig.to_dict(), "summary": {density, live_links, total_links},
    "engine": null | {...}}``. ``engine`` holds the fields of
    ``SparseTrainingEngine.state_dict()`` except the masks (in ``sparsity.safetensors``)
    and the config (above): ``version``, ``completed_steps``, ``total_steps``,
    ``generator_state`` (``torch.Generator.get_state()`` bytes, base64), ``layers``,
    ``history`` (each update's stats without the per-layer ``layer_density``, which
    would cost layers x updates numbers per checkpoint; it reloads as ``{}``); plus
    informative ``target_density`` (current scheduled density) and ``schedule``
    (update interval, update end, updates done / total, next update step).
    :func:`read_engine_state` turns it back into the exact ``state_dict()`` format.

Compact format (``save_sparse(..., compact=True)`` or ``hf-chts export --format compact``)
    ``model.safetensors`` holds only the tensors of non-sparsified modules and
    ``sparse_weights.safetensors`` holds, per sparsified weight (same key), its live
    values as a 1-D tensor in row-major order of the logical mask
    (``logical_weight[mask]``), with metadata ``shapes``, ``crc32`` and the version.
    At 30 % density this stores ~30 % of the sparsified bytes (+1 bit per link for the
    mask). **A compact folder is not a valid input for a vanilla
    ``AutoModelForCausalLM.from_pretrained``**: transformers would report the
    sparsified weights as missing and initialise them randomly. Load it with
    :func:`load_sparse`, or convert it back with ``hf-chts export <in> <out> --format dense``.

Writing happens on the main process only. A save is staged in a hidden folder
inside the target (``.hf_chts_staging-*``) and its files are then moved in with
``os.replace`` (weights first, the small sparsity files last) and stale weight
files of the previous checkpoint (old shards, the other format) are removed, so
an exception during a save leaves the previous checkpoint in the folder
untouched. Not covered: a crash (power loss, SIGKILL) *during* the final
renames can leave new weights beside old masks.

``sparsify()`` installs a ``save_pretrained`` wrapper on the model instance
(:func:`install_save_hook`), so ``model.save_pretrained``, ``Trainer.save_model``
and Trainer checkpoints write exactly these files too.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import types
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import _out_in
from .config import SparsifyConfig
from .io_utils import atomic_write_text, looks_like_local_path
from .layers import SparseLayerMixin, _is_dtensor, sparse_layers
from .model import find_state, select_modules, sparsify, unwrap_model

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPARSITY_FILE = "sparsity.safetensors"
CONFIG_FILE = "sparsify_config.json"
SPARSE_WEIGHTS_FILE = "sparse_weights.safetensors"
STAGING_PREFIX = ".hf_chts_staging-"
PACKING = "numpy.packbits(mask, axis=-1, bitorder='little'), logical out x in"
# files of a previous checkpoint that a new save replaces or removes (stale shards, other format)
_WEIGHT_FILE_PREFIXES = ("model.", "model-", "pytorch_model")
_HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_MISSING = object()


# ====================================================================== helpers
def is_main_process() -> bool:
    """True on the process that writes files (rank 0 of torch.distributed / accelerate)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # pragma: no cover - accelerate is a dependency
        return True


def weight_key(module_name: str) -> str:
    """``state_dict`` key of a sparsified module's weight."""
    return f"{module_name}.weight"


def module_name_of(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask along its last dim (``numpy.packbits``, little bit order) -> uint8."""
    array = mask.detach().to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.ascontiguousarray(np.packbits(array, axis=-1, bitorder="little")))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask` for a mask of logical ``shape``."""
    bits = np.unpackbits(packed.numpy(), axis=-1, count=int(shape[-1]), bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def _crc32(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return format(zlib.crc32(data) & 0xFFFFFFFF, "08x")


def _packed_shape(shape: list[int]) -> list[int]:
    return [*shape[:-1], math.ceil(shape[-1] / 8)]


def _require_pretrained(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        raise ValueError(
            "save_sparse got a peft model: merge the adapters first with hf_chts.merge_lora(peft_model) "
            "(which keeps the masks), or save the adapter alone with peft_model.save_pretrained()"
        )
    if not hasattr(type(model), "save_pretrained"):
        raise ValueError(
            f"save_sparse needs a transformers PreTrainedModel (with save_pretrained); got {type(model).__name__}"
        )
    return model


def _original_save_pretrained(model: nn.Module):
    """The class's ``save_pretrained`` bound to ``model`` (bypasses the hf_chts hook)."""
    return types.MethodType(type(model).save_pretrained, model)


# ============================================================ serialise parts
def _mask_entries(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Packed masks and the metadata of ``sparsity.safetensors``."""
    tensors, shapes, crcs = {}, {}, {}
    for name, layer in sorted(sparse_layers(model).items()):
        key = weight_key(name)
        tensors[key] = pack_mask(layer.mask)
        shapes[key] = list(layer.mask.shape)
        crcs[key] = _crc32(tensors[key])
    metadata = {
        "format": "pt",
        "hf_chts_format_version": str(FORMAT_VERSION),
        "content": "masks",
        "packing": PACKING,
        "shapes": json.dumps(shapes, sort_keys=True),
        "crc32": json.dumps(crcs, sort_keys=True),
    }
    return tensors, metadata


def _encode_engine_state(state: dict) -> dict:
    """``SparseTrainingEngine.state_dict()`` -> JSON-able record (masks and config dropped)."""
    record = {}
    for key, value in state.items():
        if key in ("masks", "config"):
            continue
        if key == "generator_state":
            value = base64.b64encode(value.cpu().numpy().tobytes()).decode("ascii")
        if key == "history":  # per-layer densities (layers x updates numbers) stay out of the JSON
            value = [{k: v for k, v in stats.items() if k != "layer_density"} for stats in value]
        record[key] = value
    return record


def _engine_record(model: nn.Module) -> dict | None:
    """Progress of the engine driving ``model`` (or the one loaded with it), JSON-able."""
    state = find_state(model)
    engine = getattr(state, "engine", None) if state is not None else None
    if engine is None:
        return getattr(state, "loaded_engine_record", None) if state is not None else None
    record = _encode_engine_state(engine.state_dict(include_masks=False))  # masks: sparsity.safetensors
    schedule = getattr(engine, "schedule", None)
    step = int(record.get("completed_steps", 0))
    if schedule is not None:
        updates = schedule.update_steps()
        record["target_density"] = float(schedule.density_at(step))
        record["schedule"] = {
            "kind": schedule.kind,
            "update_interval": schedule.update_interval,
            "update_end": schedule.update_end,
            "updates_done": sum(1 for s in updates if s <= step),
            "updates_total": len(updates),
            "next_update_step": next((s for s in updates if s > step), None),
            "progress": step / schedule.total_steps if schedule.total_steps else 1.0,
        }
    return record


def _config_record(model: nn.Module, *, compact: bool, engine_record: Any) -> dict:
    state = find_state(model)
    layers = sparse_layers(model)
    live = sum(int(layer.mask.sum()) for layer in layers.values())
    total = sum(layer.mask.numel() for layer in layers.values())
    from . import __version__

    return {
        "format_version": FORMAT_VERSION,
        "hf_chts_version": __version__,
        "weights_format": "compact" if compact else "dense",
        "config": state.config.to_dict(),
        "summary": {"density": live / total if total else 1.0, "live_links": live, "total_links": total,
                    "sparsified_layers": len(layers)},
        "engine": _engine_record(model) if engine_record is _MISSING else engine_record,
    }


def _dump_json(record: dict) -> str:
    def refuse(value):
        raise TypeError(f"cannot write {type(value).__name__} to {CONFIG_FILE}: engine state values must be JSON-able")

    return json.dumps(record, indent=2, sort_keys=True, default=refuse) + "\n"


def _reapply_masks(model: nn.Module) -> None:
    """Zero every sparsified weight at its masked positions (in place; a no-op when the invariant holds)."""
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            layer.apply_mask_()


def _masked_state_dict(model: nn.Module, state_dict: dict | None) -> dict | None:
    """Re-apply every mask; a caller-provided state dict gets masked copies where needed."""
    layers = sparse_layers(model)
    _reapply_masks(model)
    if state_dict is None:
        return None
    state_dict = dict(state_dict)
    for name, layer in layers.items():
        key = weight_key(name)
        tensor = state_dict.get(key)
        if tensor is None or not torch.is_tensor(tensor) or tensor.shape != layer.weight.shape:
            logger.warning("hf_chts: cannot re-apply the mask of %r to the given state_dict (key missing or resharded)", key)
            continue
        if _is_dtensor(tensor):  # a sharded state dict: mask each rank's shard with the mask shard (local ops)
            keep = layer.storage_mask()
            if not (_is_dtensor(keep) and keep.device_mesh == tensor.device_mesh
                    and keep.placements == tensor.placements):
                logger.warning("hf_chts: cannot re-apply the mask of %r to the given state_dict (sharded unlike the "
                               "weight)", key)
                continue
            local, keep = tensor.to_local().detach(), keep.to_local().to(tensor.to_local().device)
            if bool((local[~keep] != 0).any()):
                from torch.distributed.tensor import DTensor

                state_dict[key] = DTensor.from_local(local * keep.to(local.dtype), tensor.device_mesh,
                                                     tensor.placements, run_check=False,
                                                     shape=tensor.shape, stride=tensor.stride())
            continue
        # the full plain mask in storage layout: under FSDP2 storage_mask() is a DTensor shard
        keep = (layer.mask.t() if layer.transposed else layer.mask).to(tensor.device)
        if bool((tensor.detach()[~keep] != 0).any()):
            state_dict[key] = tensor.detach() * keep.to(tensor.dtype)
    return state_dict


def _compact_split(model: nn.Module, state_dict: dict | None) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(state dict without sparsified weights, live values per weight key, metadata)."""
    full = dict(state_dict) if state_dict is not None else model.state_dict()
    values, shapes, crcs = {}, {}, {}
    for name, layer in sorted(sparse_layers(model).items()):
        key = weight_key(name)
        stored = full.pop(key, None)
        if stored is None:  # full weight, gathered across ranks when FSDP sharded it
            logical = getattr(layer, "full_logical_weight", layer.logical_weight)()
        else:
            logical = stored.t() if layer.transposed else stored
        live = logical.detach()[layer.mask.to(logical.device)].cpu().contiguous()
        values[key] = live
        shapes[key] = list(layer.mask.shape)
        crcs[key] = _crc32(live)
    metadata = {
        "format": "pt",
        "hf_chts_format_version": str(FORMAT_VERSION),
        "content": "live values of sparsified weights, 1-D, row-major order of the logical mask",
        "shapes": json.dumps(shapes, sort_keys=True),
        "crc32": json.dumps(crcs, sort_keys=True),
    }
    return full, values, metadata


# ============================================================= staged commit
def _commit_staged(staging: Path, target: Path) -> None:
    """Move staged files into ``target``: big files first, sparsity files last; drop stale weight files."""
    staged = [p for p in staging.iterdir()]
    small_last = {SPARSITY_FILE: 1, CONFIG_FILE: 2}
    staged.sort(key=lambda p: (small_last.get(p.name, 0), -p.stat().st_size if p.is_file() else 0))
    names = {p.name for p in staged}
    for path in staged:
        destination = target / path.name
        if path.is_dir():
            if destination.exists():
                shutil.rmtree(destination)
            os.replace(path, destination)
        else:
            os.replace(path, destination)
    for old in target.iterdir():
        stale_weights = old.name.startswith(_WEIGHT_FILE_PREFIXES) and (
            old.name.endswith(".safetensors") or old.name.endswith(".bin") or old.name.endswith(".index.json"))
        if old.is_file() and old.name not in names and (stale_weights or old.name == SPARSE_WEIGHTS_FILE):
            old.unlink()


@contextlib.contextmanager
def _staging_dir(target: Path):
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_checkpoint(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, compact: bool = False,
                      state_dict: dict | None = None, save_kwargs: dict | None = None,
                      engine_record: Any = _MISSING) -> Path:
    """Write weights + masks + config into ``path`` through a staging folder (main process only)."""
    from safetensors.torch import save_file

    model = _require_pretrained(model)
    if find_state(model) is None:
        raise ValueError(
            "this model is not sparsified (no hf_chts state): call hf_chts.sparsify(model, config) first, "
            "or use model.save_pretrained() for a dense model"
        )
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; save_sparse needs a folder")
    save_kwargs = dict(save_kwargs or {})
    save_kwargs.pop("is_main_process", None)
    save_kwargs.pop("push_to_hub", None)
    state_dict = _masked_state_dict(model, state_dict)
    original_save = _original_save_pretrained(model)
    with _staging_dir(target) as staging:
        if compact:
            dense_part, values, metadata = _compact_split(model, state_dict)
            original_save(staging, state_dict=dense_part, is_main_process=True, push_to_hub=False, **save_kwargs)
            save_file(values, str(staging / SPARSE_WEIGHTS_FILE), metadata=metadata)
        else:
            original_save(staging, state_dict=state_dict, is_main_process=True, push_to_hub=False, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        tensors, metadata = _mask_entries(model)
        save_file(tensors, str(staging / SPARSITY_FILE), metadata=metadata)
        record = _config_record(model, compact=compact, engine_record=engine_record)
        (staging / CONFIG_FILE).write_text(_dump_json(record), encoding="utf-8")
        _commit_staged(staging, target)
    return target


def _push_folder(folder: Path, repo_id: str, *, token=None, private=None, commit_message=None) -> str:
    """Create the Hub repo if needed and upload ``folder`` (huggingface_hub.HfApi.upload_folder)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model",
        commit_message=commit_message or "Upload sparse checkpoint (hf_chts)",
        ignore_patterns=[f"{STAGING_PREFIX}*", f"{STAGING_PREFIX}*/**"],
    )
    return repo_id


# ================================================================ public save
def _gather_full_state_dict(model: nn.Module) -> dict | None:
    """A full (unsharded, CPU) state dict when FSDP2 shards ``model``'s parameters, else ``None``.

    A collective: every rank must call it; only rank 0 receives the tensors
    (``StateDictOptions(full_state_dict=True, cpu_offload=True)``). The
    main-process-only write path then never touches sharded tensors.
    """
    model = unwrap_model(model)
    if not any(_is_dtensor(param) for param in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sparse(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, compact: bool = False,
                push_to_hub: bool = False, repo_id: str | None = None, token: str | None = None,
                private: bool | None = None, commit_message: str | None = None,
                max_shard_size: int | str = "5GB") -> Path | None:
    """Save a sparsified model as a Hugging Face folder with its masks and sparse-training state.

    The folder loads with a vanilla ``AutoModelForCausalLM.from_pretrained(path)``
    (masked weights are stored as zeros) unless ``compact=True``; ``load_sparse``
    restores the sparse model (masks, config) from either format, and
    :func:`read_engine_state` the engine's progress for an exact resume.

    Args:
        model: a model passed through :func:`hf_chts.sparsify` (unwrapped or DDP/compiled).
        path: output folder (created; an existing checkpoint in it is replaced only
            once the new one is fully written).
        tokenizer: saved into the folder too when given.
        compact: store only the live values of sparsified weights
            (``sparse_weights.safetensors``); not loadable by vanilla ``from_pretrained``.
        push_to_hub: upload the folder afterwards with ``HfApi.upload_folder``.
        repo_id: Hub repo (default: the folder's name); token / private /
            commit_message: passed to the Hub API.
        max_shard_size: shard size of the weight files (``save_pretrained``).

    Under FSDP2 (``fully_shard``) every rank must call it: the full weights are
    gathered collectively, then the main process writes them.

    Returns:
        The folder path on the main process, ``None`` on other ranks (which write nothing).
    """
    _reapply_masks(model)  # on every calling rank, so ranks keep identical weights
    state_dict = _gather_full_state_dict(model)  # collective under FSDP2: every rank calls save_sparse
    if not is_main_process():
        return None
    folder = _write_checkpoint(model, path, tokenizer=tokenizer, compact=compact, state_dict=state_dict,
                               save_kwargs={"max_shard_size": max_shard_size})
    if push_to_hub:
        _push_folder(folder, repo_id or folder.resolve().name, token=token, private=private,
                     commit_message=commit_message)
    return folder


def write_sparsity_files(model: nn.Module, path: str | os.PathLike) -> Path | None:
    """(Re)write only ``sparsity.safetensors`` and ``sparsify_config.json`` into an existing
    checkpoint folder (each atomically), e.g. to refresh the engine progress of a Trainer
    checkpoint. The weights in the folder must already be the model's masked weights.

    Returns the folder on the main process, ``None`` elsewhere.
    """
    from safetensors.torch import save_file

    from .io_utils import atomic_path

    if not is_main_process():
        return None
    model = unwrap_model(model)
    if find_state(model) is None:
        raise ValueError("this model is not sparsified (no hf_chts state): nothing to write")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the model there first (save_sparse)")
    compact = (folder / SPARSE_WEIGHTS_FILE).exists()
    tensors, metadata = _mask_entries(model)
    with atomic_path(folder / SPARSITY_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    record = _config_record(model, compact=compact, engine_record=_MISSING)
    atomic_write_text(folder / CONFIG_FILE, _dump_json(record))
    return folder


# ================================================================ save hook
def _hooked_save_pretrained(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a sparsified model: same files as :func:`save_sparse`."""
    original = _original_save_pretrained(self)
    try:
        bound = inspect.signature(original).bind(save_directory, *args, **kwargs)
    except TypeError:
        return original(save_directory, *args, **kwargs)
    arguments = dict(bound.arguments)
    extra = arguments.pop("kwargs", {}) or {}
    arguments.update(extra)
    _reapply_masks(self)  # every rank calls save_pretrained under Trainer: weights stay identical across ranks
    main = bool(arguments.get("is_main_process", True)) and is_main_process()
    if (not main or find_state(self) is None or getattr(self, "_hf_peft_config_loaded", False)
            or arguments.get("distributed_checkpoint")):
        return original(save_directory, *args, **kwargs)
    arguments.pop("save_directory")
    state_dict = arguments.pop("state_dict", None)
    push = bool(arguments.pop("push_to_hub", False))
    hub = {key: arguments.pop(key, None) for key in ("repo_id", "commit_message", "private", "token")}
    arguments.pop("create_pr", None)
    if hub["token"] is not None and not push:
        arguments["token"] = hub["token"]
    folder = _write_checkpoint(self, save_directory, state_dict=state_dict, save_kwargs=arguments)
    if push:
        _push_folder(folder, hub["repo_id"] or folder.resolve().name, token=hub["token"], private=hub["private"],
                     commit_message=hub["commit_message"])
    return None


def install_save_hook(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and so ``Trainer.save_model`` / Trainer checkpoints)
    write ``sparsity.safetensors`` and ``sparsify_config.json`` beside the weights.

    Installs a callable on the instance (the class is untouched, so
    ``config.architectures`` and vanilla loading are unaffected); ``deepcopy``
    and pickling rebind it to the copy. Called by :func:`hf_chts.sparsify`.
    """
    model = unwrap_model(model)
    if not hasattr(type(model), "save_pretrained"):
        return
    if isinstance(model.__dict__.get("save_pretrained"), _SparseSavePretrained):
        return
    model.__dict__["save_pretrained"] = _SparseSavePretrained(model)


class _SparseSavePretrained:
    """The instance-level ``save_pretrained`` of a sparsified model (a picklable, deep-copyable bound call)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return _hooked_save_pretrained(self.model, save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<hf_chts save_pretrained of {type(self.model).__name__}>"


# ================================================================= reading
def _safe_read(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; ``ValueError`` naming it if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # SafetensorError, OSError, ...
        raise ValueError(
            f"{file} is not a readable safetensors file ({type(error).__name__}: {error}); it is truncated or "
            "corrupted — copy or download it again, or re-save the checkpoint"
        ) from error
    return tensors, metadata


def _json_metadata(file: Path, metadata: dict[str, str], field: str) -> dict:
    try:
        value = json.loads(metadata[field])
        if not isinstance(value, dict):
            raise TypeError("not a JSON object")
        return value
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{file}: metadata field {field!r} is missing or invalid ({error}); this is not an hf_chts file or it is "
            "corrupted"
        ) from error


def _check_version(file: Path, metadata: dict[str, str]) -> None:
    version = metadata.get("hf_chts_format_version")
    if version is None or not version.isdigit():
        raise ValueError(f"{file} has no hf_chts_format_version metadata; it was not written by hf_chts.save_sparse")
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{file} uses hf_chts checkpoint format {version}, newer than this hf_chts supports ({FORMAT_VERSION}); "
            "upgrade hf_chts"
        )


def _check_crc(file: Path, key: str, tensor: torch.Tensor, crcs: dict) -> None:
    expected = crcs.get(key)
    if expected is not None and _crc32(tensor) != expected:
        raise ValueError(f"{file}: tensor {key!r} fails its crc32 check; the file is corrupted — re-save or re-download it")


def read_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Masks of a checkpoint folder (or a ``sparsity.safetensors`` file) by weight key, as bool ``out x in``.

    Raises ``ValueError`` naming the file and the tensor on a truncated or
    corrupted file, a wrong dtype, or a packed shape that does not match the
    recorded logical shape.
    """
    file = Path(path)
    file = file / SPARSITY_FILE if file.is_dir() else file
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    tensors, metadata = _safe_read(file)
    _check_version(file, metadata)
    shapes = _json_metadata(file, metadata, "shapes")
    crcs = _json_metadata(file, metadata, "crc32") if "crc32" in metadata else {}
    masks = {}
    for key, packed in tensors.items():
        if key not in shapes:
            raise ValueError(f"{file}: tensor {key!r} has no logical shape in the metadata 'shapes'; the file is corrupted")
        shape = shapes[key]
        if packed.dtype != torch.uint8:
            raise ValueError(
                f"{file}: tensor {key!r} has dtype {packed.dtype}, expected torch.uint8 (bit-packed with "
                "numpy.packbits(bitorder='little')); masks must not be saved as bool/float tensors"
            )
        if list(packed.shape) != _packed_shape(shape):
            raise ValueError(
                f"{file}: tensor {key!r} has packed shape {list(packed.shape)}, expected {_packed_shape(shape)} for "
                f"logical shape {shape}; the file is corrupted or was written by another tool"
            )
        _check_crc(file, key, packed, crcs)
        masks[key] = unpack_mask(packed, shape)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"{file}: the metadata lists masks that are not in the file: {missing[:5]}; the file is corrupted")
    return masks


def read_sparsify_config(path: str | os.PathLike) -> dict | None:
    """The ``sparsify_config.json`` record of a folder (``None`` if absent); ``ValueError`` if unreadable."""
    folder = Path(path)
    file = folder / CONFIG_FILE if folder.is_dir() else folder
    if not file.exists():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); it is truncated or corrupted — re-save the checkpoint") from error
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"{file} has no 'config' object; it was not written by hf_chts.save_sparse or is corrupted")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {version!r} is unknown (this hf_chts reads up to {FORMAT_VERSION}); upgrade hf_chts"
        )
    engine = record.get("engine")
    if engine is not None and not isinstance(engine, dict):
        raise ValueError(f"{file}: 'engine' must be an object or null; the file is corrupted")
    return record


def _config_from_record(file: Path, record: dict) -> SparsifyConfig:
    try:
        return SparsifyConfig.from_dict(record["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{file}: the stored SparsifyConfig is invalid: {error}") from error


def read_compact_values(path: str | os.PathLike, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Live values of ``sparse_weights.safetensors``, validated against ``masks`` (counts and names)."""
    folder = Path(path)
    file = folder / SPARSE_WEIGHTS_FILE if folder.is_dir() else folder
    tensors, metadata = _safe_read(file)
    _check_version(file, metadata)
    crcs = _json_metadata(file, metadata, "crc32") if "crc32" in metadata else {}
    missing = sorted(set(masks) - set(tensors))
    extra = sorted(set(tensors) - set(masks))
    if missing or extra:
        raise ValueError(
            f"{file} does not match {SPARSITY_FILE}: weights without values {missing[:5]}, values without a mask "
            f"{extra[:5]}; the two files come from different checkpoints"
        )
    for key, values in tensors.items():
        expected = int(masks[key].sum())
        if values.dim() != 1 or values.numel() != expected:
            raise ValueError(
                f"{file}: tensor {key!r} has shape {list(values.shape)}, expected 1-D with {expected} live values "
                f"(the mask's live links); the files come from different checkpoints or are corrupted"
            )
        if not values.is_floating_point():
            raise ValueError(f"{file}: tensor {key!r} has dtype {values.dtype}, expected a floating dtype")
        _check_crc(file, key, values, crcs)
    return tensors


def decode_engine_record(record: dict, masks: dict[str, torch.Tensor], config: dict) -> dict:
    """JSON engine record + masks (by weight key) -> ``SparseTrainingEngine.state_dict()`` format."""
    state = {}
    for key, value in record.items():
        if key in ("target_density", "schedule"):
            continue  # informative only
        if key == "generator_state":
            try:
                raw = base64.b64decode(value.encode("ascii"), validate=True)
            except (ValueError, AttributeError) as error:
                raise ValueError(f"{CONFIG_FILE}: engine.generator_state is not valid base64 ({error})") from error
            value = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        state[key] = value
    state["config"] = config
    by_module = {module_name_of(key): mask for key, mask in masks.items()}
    state["masks"] = {name: by_module[name].clone() for name in sorted(by_module)}
    state.setdefault("layers", {name: list(mask.shape) for name, mask in state["masks"].items()})
    return state


def read_engine_state(path: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                      cache_dir: str | None = None, local_files_only: bool | None = None) -> dict | None:
    """The sparse-training engine state saved in a checkpoint, in ``SparseTrainingEngine.state_dict()`` format.

    ``engine.load_state_dict(read_engine_state(folder))`` resumes exactly (step,
    RNG, masks, history). Returns ``None`` when the folder holds no engine
    progress (saved without an engine attached, or no ``sparsify_config.json``).
    """
    folder = resolve_checkpoint(path, revision=revision, token=token, cache_dir=cache_dir,
                                local_files_only=local_files_only)
    record = read_sparsify_config(folder)
    if record is None or record.get("engine") is None:
        return None
    return decode_engine_record(record["engine"], read_masks(folder), record["config"])


# ================================================================= loading
def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                       cache_dir: str | None = None, local_files_only: bool | None = None) -> Path:
    """A local folder for a checkpoint path or a Hub repo id (``snapshot_download``; honours HF_HUB_OFFLINE)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"{local} is a file; a checkpoint is a folder")
    text = str(path_or_repo_id)
    if looks_like_local_path(text):
        raise FileNotFoundError(f"checkpoint folder {text} does not exist")
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


def _validate_masks(file: Path, model: nn.Module, config: SparsifyConfig,
                    masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks by module name, checked against the layers ``config`` selects in ``model``."""
    if config.is_dense:
        if masks:
            raise ValueError(f"{file} holds {len(masks)} masks but the stored SparsifyConfig is dense")
        return {}
    modules = select_modules(model, config)
    expected = {weight_key(name): module for name, module in modules.items()}
    extra = sorted(set(masks) - set(expected))
    if extra:
        raise ValueError(
            f"{file}: mask {extra[0]!r} matches no sparsified layer of this {type(model).__name__} "
            f"({len(extra)} such masks); the file belongs to another model or config"
        )
    missing = sorted(set(expected) - set(masks))
    if missing:
        raise ValueError(
            f"{file}: no mask for the sparsified layer {missing[0]!r} ({len(missing)} missing); the file belongs to "
            "another model or config, or is incomplete"
        )
    by_name = {}
    for key, module in expected.items():
        logical = module.logical_shape if isinstance(module, SparseLayerMixin) else _out_in(module)
        if tuple(masks[key].shape) != tuple(logical):
            raise ValueError(
                f"{file}: mask {key!r} has logical shape {list(masks[key].shape)} but the model's layer is "
                f"{list(logical)} (out x in); the file belongs to another model"
            )
        by_name[module_name_of(key)] = masks[key]
    return by_name


@contextlib.contextmanager
def _quiet_transformers():
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
    context = _quiet_transformers() if compact else contextlib.nullcontext()
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


@torch.no_grad()
def _fill_compact(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    layers = sparse_layers(model)
    for key, live in values.items():
        layer = layers[module_name_of(key)]
        logical = layer.logical_weight()
        logical.zero_()
        logical[layer.mask] = live.to(device=logical.device, dtype=logical.dtype)


def load_sparse(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                cache_dir: str | None = None, local_files_only: bool | None = None,
                **from_pretrained_kwargs) -> nn.Module:
    """Load a sparse checkpoint (local folder or Hub repo id) as a sparsified model.

    Loads the weights with ``AutoModelForCausalLM.from_pretrained`` (expanding
    the compact format when present), reads the masks and the SparsifyConfig,
    validates them against the model and calls ``sparsify(model, config, masks=...)``.
    The engine progress is available with :func:`read_engine_state`.

    Args:
        path_or_repo_id: checkpoint folder or ``"org/name"`` on the Hub.
        revision / token / cache_dir / local_files_only: Hub download options;
            ``HF_HUB_OFFLINE=1`` restricts to the local cache.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Returns:
        The model; sparsified unless the folder has no ``sparsity.safetensors``
        (then it is loaded dense with a warning).

    Raises:
        ValueError: naming the file and tensor on a truncated, corrupted or
            mismatched ``sparsity.safetensors`` / ``sparse_weights.safetensors`` /
            ``sparsify_config.json``.
    """
    folder = resolve_checkpoint(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                local_files_only=local_files_only)
    record = read_sparsify_config(folder)
    compact = (folder / SPARSE_WEIGHTS_FILE).exists()
    if not (folder / SPARSITY_FILE).exists():
        if compact:
            raise ValueError(
                f"{folder} has {SPARSE_WEIGHTS_FILE} but no {SPARSITY_FILE}: the live values cannot be placed "
                "without the masks; copy the complete checkpoint"
            )
        logger.warning("hf_chts: %s has no %s; loading it as a dense model (not sparse)", folder, SPARSITY_FILE)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), **from_pretrained_kwargs)
    masks = read_masks(folder)
    if record is None:
        raise ValueError(
            f"{folder} has {SPARSITY_FILE} but no {CONFIG_FILE}: the SparsifyConfig needed to restore the layers is "
            "missing; copy the complete checkpoint"
        )
    config = _config_from_record(folder / CONFIG_FILE, record)
    values = read_compact_values(folder, masks) if compact else None
    model = _from_pretrained(folder, set(masks), compact, from_pretrained_kwargs)
    by_name = _validate_masks(folder / SPARSITY_FILE, model, config, masks)
    sparsify(model, config, masks=by_name)
    if values is not None:
        _fill_compact(model, values)
    state = find_state(model)
    state.loaded_engine_record = record.get("engine")
    return model


# ==================================================================== peft
def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Merge LoRA adapters into a sparsified base model and keep its sparsity pattern.

    ``peft_model.merge_and_unload()`` adds the dense low-rank delta ``B @ A`` to
    every wrapped weight, which would fill the masked positions. Here each
    sparse layer's mask is re-applied after the merge: the merged model is
    ``W + mask * (B @ A)``, keeping exactly the masks it had (same live links,
    same density, weights exactly 0 at masked positions), so it saves with
    :func:`save_sparse` and keeps training with the same topology. The part of
    the adapter's update that fell on masked positions is dropped: the merged
    model's outputs can therefore differ slightly from the unmerged peft
    model's (use the unmerged adapter if the dense delta matters more than the
    sparsity).

    Args:
        peft_model: a ``peft.PeftModel`` wrapping a model passed through
            :func:`hf_chts.sparsify` (LoRA on ``SparseLinear`` / ``SparseConv1D`` layers).

    Returns:
        The base model, still sparsified (``find_state`` set, masks unchanged).
    """
    if not hasattr(peft_model, "merge_and_unload"):
        raise ValueError(
            f"merge_lora expects a peft model with merge_and_unload(); got {type(peft_model).__name__}"
        )
    if find_state(peft_model) is None:
        raise ValueError("the base model of this peft model is not sparsified; use peft_model.merge_and_unload()")
    before = {name: layer.mask.clone() for name, layer in sparse_layers(peft_model).items()}
    merged = peft_model.merge_and_unload()
    layers = sparse_layers(merged)
    if set(layers) != set(before) or find_state(merged) is None:
        raise RuntimeError(
            "merge_and_unload() replaced sparse layers of the model; the merged model lost its sparse state "
            f"(layers before {len(before)}, after {len(layers)})"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            if not torch.equal(layer.mask.cpu(), before[name].cpu()):
                layer.set_mask(before[name])
            layer.apply_mask_()
    return merged


# ================================================================= inspect
def _meta_topology(folder: Path, config: SparsifyConfig):
    """Layer selection and topology of the checkpoint's architecture, built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architectures import build_topology

    model_config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"), _quiet_transformers():
        model = AutoModelForCausalLM.from_config(model_config)
    modules = select_modules(model, config)
    return model, modules, build_topology(model, modules)


def inspect_checkpoint(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> dict:
    """Summary of a sparse checkpoint without running the model: per-layer density and
    active neurons, overall density and ANP, file sizes, method and schedule position."""
    from .topology.percolation import active_neurons

    folder = resolve_checkpoint(path_or_repo_id, **hub_kwargs)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    record = read_sparsify_config(folder)
    if record is None or not (folder / SPARSITY_FILE).exists():
        raise ValueError(f"{folder} is not a sparse checkpoint: {SPARSITY_FILE} and {CONFIG_FILE} are required")
    config = _config_from_record(folder / CONFIG_FILE, record)
    masks = read_masks(folder)
    layers, anp, active_total = {}, None, (0, 0)
    by_name = {module_name_of(k): v for k, v in masks.items()}
    roles: dict[str, str] = {}
    active: dict[str, int] = {}
    total: dict[str, int] = {}
    try:
        model, _modules, topology = _meta_topology(folder, config)
        _validate_masks(folder / SPARSITY_FILE, model, config, masks)
        roles = {name: info.role for name, info in topology.layers.items()}
        if by_name:
            active, total = active_neurons(by_name, topology)
        active_total = (sum(active.values()), sum(total.values()))
        anp = active_total[0] / active_total[1] if active_total[1] else 1.0
    except ValueError:
        raise
    except Exception as error:  # architecture cannot be built offline: densities only
        logger.warning("hf_chts inspect: cannot build the architecture for ANP (%s)", error)
    live_total = sum(int(m.sum()) for m in masks.values())
    links_total = sum(m.numel() for m in masks.values())
    for key, mask in masks.items():
        name = module_name_of(key)
        layers[key] = {
            "role": roles.get(name, "linear"), "shape": list(mask.shape), "density": float(mask.sum()) / mask.numel(),
            "live_links": int(mask.sum()), "total_links": mask.numel(),
            "active_neurons": active.get(name), "total_neurons": total.get(name),
        }
    engine = record.get("engine") or None
    return {
        "checkpoint": str(folder),
        "method": config.method,
        "target_density": config.target_density,
        "weights_format": record.get("weights_format", "dense"),
        "density": live_total / links_total if links_total else 1.0,
        "anp": anp,
        "live_links": live_total,
        "total_links": links_total,
        "layers": layers,
        "files": files,
        "schedule": None if engine is None else {
            "completed_steps": engine.get("completed_steps"),
            "total_steps": engine.get("total_steps"),
            "current_target_density": engine.get("target_density"),
            **(engine.get("schedule") or {}),
        },
    }


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)  # pragma: no cover


def format_inspection(info: dict) -> str:
    """Human-readable table of :func:`inspect_checkpoint`'s result."""
    header = f"{'layer':<52} {'role':<8} {'shape':>11} {'density':>8} {'live':>9} {'active':>11}"
    lines = [f"checkpoint: {info['checkpoint']}",
             f"method: {info['method']}   target density: {info['target_density']}   weights: {info['weights_format']}",
             "", header, "-" * len(header)]
    for key, layer in info["layers"].items():
        shape = "x".join(str(s) for s in layer["shape"])
        active = "?" if layer["active_neurons"] is None else f"{layer['active_neurons']}/{layer['total_neurons']}"
        lines.append(f"{key:<52} {layer['role']:<8} {shape:>11} {layer['density']:>8.4f} {layer['live_links']:>9} "
                     f"{active:>11}")
    lines.append("-" * len(header))
    anp = "?" if info["anp"] is None else f"{info['anp']:.4f}"
    lines.append(f"overall density {info['density']:.4f} ({info['live_links']}/{info['total_links']} links)   ANP {anp}")
    schedule = info["schedule"]
    if schedule is None:
        lines.append("schedule: no engine progress saved")
    else:
        target = schedule.get("current_target_density")
        lines.append(
            f"schedule: step {schedule.get('completed_steps')}/{schedule.get('total_steps')}"
            + (f", current target density {target:.4f}" if isinstance(target, (int, float)) else "")
            + (f", updates {schedule['updates_done']}/{schedule['updates_total']}" if "updates_done" in schedule else "")
        )
    lines.append("")
    lines.append("files:")
    for name, size in info["files"].items():
        lines.append(f"  {name:<40} {_human_size(size):>10}")
    return "\n".join(lines)


def inspect_command(args) -> int:
    """``hf-chts inspect <checkpoint> [--json]``."""
    info = inspect_checkpoint(args.checkpoint)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
    else:
        print(format_inspection(info))
    return 0


# ================================================================== export
def export_checkpoint(source: str | os.PathLike, output: str | os.PathLike, *, format: str = "dense") -> Path:
    """Rewrite a sparse checkpoint as ``dense`` (vanilla-loadable) or ``compact``; keeps masks, config,
    engine progress and the tokenizer."""
    if format not in ("dense", "compact"):
        raise ValueError(f"export format {format!r} is invalid: expected 'dense' or 'compact'")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new output folder")
    folder = resolve_checkpoint(source)
    if not (folder / SPARSITY_FILE).exists():
        raise ValueError(f"{folder} has no {SPARSITY_FILE}: it is not a sparse checkpoint, nothing to export")
    model = load_sparse(folder, dtype="auto")
    tokenizer = None
    if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:  # noqa: BLE001 - a tokenizer is optional in a checkpoint
            logger.warning("hf_chts export: tokenizer not copied (%s)", error)
    written = _write_checkpoint(model, out, tokenizer=tokenizer, compact=format == "compact")
    return written


def export_command(args) -> int:
    """``hf-chts export <checkpoint> <output> --format dense|compact``."""
    out = export_checkpoint(args.checkpoint, args.output, format=args.format)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"wrote {args.format} checkpoint to {out}")
    for name, size in sizes.items():
        print(f"  {name:<40} {_human_size(size):>10}")
    return 0


__all__ = [
    "save_sparse", "load_sparse", "read_engine_state", "read_masks", "read_sparsify_config", "install_save_hook",
    "write_sparsity_files", "merge_lora",
    "inspect_checkpoint", "export_checkpoint", "pack_mask", "unpack_mask", "FORMAT_VERSION", "SPARSITY_FILE",
    "CONFIG_FILE", "SPARSE_WEIGHTS_FILE",
]
