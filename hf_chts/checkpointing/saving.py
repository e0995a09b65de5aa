"""Saving sparse checkpoints: ``save_sparse``, ``write_sparsity_files`` and the ``save_pretrained`` hook.

Writing happens on the main process only. Every save is one crash-safe commit
(:mod:`hf_chts.checkpointing.commit`): the whole checkpoint is written into a
sibling staging folder, bound together by a save id and a manifest
(:mod:`hf_chts.checkpointing.manifest`), ``fsync``-ed, and swapped in; an
exception, a kill or a concurrent save never leaves a folder that mixes two
saves (docs/checkpoint-format.md#6-writing,
docs/checkpoint-format.md#7-consistency-between-files-and-crash-safety).

``sparsify()`` installs a ``save_pretrained`` wrapper on the model instance
(:func:`install_save_hook`), so ``model.save_pretrained``, ``Trainer.save_model``
and Trainer checkpoints write exactly these files too. This module does not
import :mod:`hf_chts.model` (which imports it for the hook).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import types
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import push_folder
from ..io_utils import is_regular
from ..layers import is_dtensor, sparse_layers, zero_masked_
from ..model_card import CARD_FILE, write_model_card
from ..state import find_state, unwrap_model
from ..version import __version__
from .commit import fault_point, staged_commit
from .compact import compact_split, mark_config_compact
from .format import (
    CONFIG_FILE, FORMAT_VERSION, SPARSE_WEIGHTS_FILE, SPARSITY_FILE, dump_record_json, encode_engine_state,
    is_weight_file, mask_entries, weight_key,
)
from .keeping import edited_card, old_manifest_entry, set_aside_edited_card, warn_kept_weight_like_files
from .manifest import build_manifest, owned_by_old_save, owned_sparsity_files, stored_save_id

PUSH_MESSAGE = "Upload sparse checkpoint (hf_chts)"

logger = logging.getLogger("hf_chts.checkpoint")  # the logger name users configure, whichever module logs

_MISSING = object()


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


#: the attribute ``hf_chts.inference.convert.finish_inference_model`` sets on an inference-only model
INFERENCE_INFO_ATTR = "hf_chts_inference"


def refuse_inference_model(model: nn.Module) -> None:
    """``ValueError`` for a model converted by ``to_sparse_inference`` (or loaded with ``inference=True``): its
    sparsified layers hold CSR arrays and no mask, so a save would write a checkpoint that does not load."""
    state = find_state(model)
    converted = INFERENCE_INFO_ATTR in model.__dict__ or (
        state is not None and not state.config.is_dense and not sparse_layers(model))
    if converted:
        raise ValueError(
            "this model was converted by to_sparse_inference() (or loaded with inference=True): it keeps no masks and "
            "no dense weights, so no checkpoint is written from it; save the sparse model before converting "
            "(hf_chts.save_sparse, compact=True keeps only live weights), or load the checkpoint again with "
            "hf_chts.load_sparse(path)"
        )


def _original_save_pretrained(model: nn.Module):
    """The class's ``save_pretrained`` bound to ``model`` (bypasses the hf_chts hook)."""
    return types.MethodType(type(model).save_pretrained, model)


def _engine_record(model: nn.Module) -> dict | None:
    """Progress of the engine driving ``model`` (or the one loaded with it), JSON-able."""
    state = find_state(model)
    if state is None:
        return None
    engine = state.engine
    if engine is None:
        return state.loaded_engine_record
    record = encode_engine_state(engine.state_dict(include_masks=False))  # masks: sparsity.safetensors
    schedule = engine.schedule
    step = int(record.get("completed_steps", 0))
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


def _config_record(model: nn.Module, *, compact: bool, engine_record: Any, save_id: str, manifest: dict) -> dict:
    state = find_state(model)
    layers = sparse_layers(model)
    live = sum(int(layer.mask.sum()) for layer in layers.values())
    total = sum(layer.mask.numel() for layer in layers.values())
    return {
        "format_version": FORMAT_VERSION,
        "hf_chts_version": __version__,
        "weights_format": "compact" if compact else "dense",
        "save_id": save_id,
        "manifest": manifest,
        "config": state.config.to_dict(),
        "summary": {"density": live / total if total else 1.0, "live_links": live, "total_links": total,
                    "sparsified_layers": len(layers)},
        "engine": _engine_record(model) if engine_record is _MISSING else engine_record,
    }


def _reapply_masks(model: nn.Module) -> None:
    """Zero every sparsified weight at its masked positions (in place; a no-op when the invariant holds),
    warning loudly, with the layers, when some were not 0: the saved model then differs from the one in memory."""
    layers = sparse_layers(model)
    leaking = {name: count for name, layer in layers.items() if (count := layer.masked_nonzero())}
    if leaking:
        names = sorted(leaking)
        logger.warning(
            "hf_chts: %d weights are not 0 at masked positions in %d sparsified layer(s) (%s%s); the save zeroes "
            "them, so the saved model's outputs differ from the model's before the save. peft's "
            "merge_and_unload() does this: merge a LoRA adapter with hf_chts.merge_lora(peft_model) instead "
            "(it keeps the masks; docs: README 'LoRA')", sum(leaking.values()), len(names), ", ".join(names[:5]),
            ", ..." if len(names) > 5 else "")
    with torch.no_grad():
        for layer in layers.values():
            layer.apply_mask_()


def masked_state_dict(model: nn.Module, state_dict: dict | None) -> dict | None:
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
        if is_dtensor(tensor):  # a sharded state dict: mask each rank's shard with the mask shard (local ops)
            keep = layer.storage_mask()
            if not (is_dtensor(keep) and keep.device_mesh == tensor.device_mesh
                    and keep.placements == tensor.placements):
                logger.warning("hf_chts: cannot re-apply the mask of %r to the given state_dict (sharded unlike the "
                               "weight)", key)
                continue
            local, keep = tensor.to_local().detach(), keep.to_local().to(tensor.to_local().device)
            if bool((local[~keep] != 0).any()):
                from torch.distributed.tensor import DTensor

                state_dict[key] = DTensor.from_local(zero_masked_(local.clone(), keep), tensor.device_mesh,
                                                     tensor.placements, run_check=False,
                                                     shape=tensor.shape, stride=tensor.stride())
            continue
        # the full plain mask in storage layout: under FSDP2 storage_mask() is a DTensor shard
        keep = layer.storage_view(layer.mask).to(tensor.device)
        if bool((tensor.detach()[~keep] != 0).any()):
            state_dict[key] = zero_masked_(tensor.detach().clone(), keep)  # exact: NaN/inf included
    return state_dict


def write_checkpoint(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, compact: bool = False,
                      state_dict: dict | None = None, save_kwargs: dict | None = None,
                      engine_record: Any = _MISSING, card_kwargs: dict | None = None) -> Path:
    """Write weights + masks + config + model card as one save into ``path`` (main process only; crash-safe
    commit, docs/checkpoint-format.md#7-consistency-between-files-and-crash-safety).

    ``card_kwargs`` go to :func:`hf_chts.model_card.write_model_card` (``overwrite_card``, ``repo_id``, ...).
    Any file written into the staging folder before the manifest is computed is part of the save.
    """
    from safetensors.torch import save_file

    model = _require_pretrained(model)
    if find_state(model) is None:
        raise ValueError(
            "this model is not sparsified (no hf_chts state): call hf_chts.sparsify(model, config) first, "
            "or use model.save_pretrained() for a dense model"
        )
    refuse_inference_model(model)
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; save_sparse needs a folder")
    save_kwargs = dict(save_kwargs or {})
    save_kwargs.pop("is_main_process", None)
    save_kwargs.pop("push_to_hub", None)
    state_dict = masked_state_dict(model, state_dict)
    original_save = _original_save_pretrained(model)
    save_id = uuid.uuid4().hex
    with staged_commit(target, owned_by_old_save) as staging:
        warn_kept_weight_like_files(Path(os.path.abspath(target)))
        if compact:
            dense_part, values, metadata = compact_split(model, state_dict, save_id)
            original_save(staging, state_dict=dense_part, is_main_process=True, push_to_hub=False, **save_kwargs)
            mark_config_compact(staging)  # a vanilla from_pretrained refuses it, naming load_sparse
            save_file(values, str(staging / SPARSE_WEIGHTS_FILE), metadata=metadata)
        else:
            original_save(staging, state_dict=state_dict, is_main_process=True, push_to_hub=False, **save_kwargs)
        fault_point("weights-written")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        tensors, metadata = mask_entries(model, save_id)
        save_file(tensors, str(staging / SPARSITY_FILE), metadata=metadata)
        fault_point("sparsity-written")
        record = _config_record(model, compact=compact, engine_record=engine_record, save_id=save_id, manifest={})
        # the model card (docs/hub.md#2-the-model-card); a README.md in target hf_chts did not write is kept,
        # and so is a card hf_chts wrote that was edited since (both join this save)
        edited = edited_card(target)
        written = write_model_card(staging, record=record, model=model, existing_card=target / CARD_FILE,
                                   **{"repo_id": target.resolve().name, **(card_kwargs or {})})
        if written is None and old_manifest_entry(target, CARD_FILE) is not None and is_regular(target / CARD_FILE):
            shutil.copy2(target / CARD_FILE, staging / CARD_FILE)  # the user's card, listed by the old save
        record["manifest"] = build_manifest(staging)  # every file written into the staging folder so far
        (staging / CONFIG_FILE).write_text(dump_record_json(record), encoding="utf-8")
        set_aside_edited_card(edited if written is not None else None, staging)  # outside the manifest
        fault_point("config-written")
    return target


def _gather_full_state_dict(model: nn.Module) -> dict | None:
    """A full (unsharded, CPU) state dict when FSDP2 shards ``model``'s parameters, else ``None``.

    A collective: every rank must call it; only rank 0 receives the tensors
    (``StateDictOptions(full_state_dict=True, cpu_offload=True)``). The
    main-process-only write path then never touches sharded tensors.
    """
    model = unwrap_model(model)
    if not any(is_dtensor(param) for param in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sparse(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, compact: bool = False,
                push_to_hub: bool = False, repo_id: str | None = None, token: str | None = None,
                private: bool | None = None, commit_message: str | None = None,
                max_shard_size: int | str = "5GB", overwrite_card: bool = False) -> Path | None:
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
        overwrite_card: replace a ``README.md`` in ``path`` that hf_chts did not write with the
            model card (by default such a README is kept and no card is written; docs/hub.md).

    Under FSDP2 (``fully_shard``) every rank must call it (docs/distributed.md §4): the full weights are
    gathered collectively, then the main process writes them.

    Returns:
        The folder path on the main process, ``None`` on other ranks (which write nothing).
    """
    refuse_inference_model(unwrap_model(model))  # before any rank gathers or writes anything
    _reapply_masks(model)  # on every calling rank, so ranks keep identical weights
    state_dict = _gather_full_state_dict(model)  # collective under FSDP2: every rank calls save_sparse
    if not is_main_process():
        return None
    card = {"overwrite_card": overwrite_card, **({"repo_id": repo_id} if push_to_hub and repo_id else {})}
    folder = write_checkpoint(model, path, tokenizer=tokenizer, compact=compact, state_dict=state_dict,
                               save_kwargs={"max_shard_size": max_shard_size}, card_kwargs=card)
    if push_to_hub:
        push_folder(folder, repo_id or folder.resolve().name, token=token, private=private,
                    commit_message=commit_message or PUSH_MESSAGE)
    return folder


def write_sparsity_files(model: nn.Module, path: str | os.PathLike, *, card_kwargs: dict | None = None) -> Path | None:
    """(Re)write only ``sparsity.safetensors``, ``sparsify_config.json`` and the model card into an
    existing checkpoint folder, e.g. to refresh the engine progress of a Trainer checkpoint whose
    weights a path other than ``save_pretrained`` wrote. The weights in the folder must already be
    the model's masked weights; they join the new save's manifest. Committed like a save (every
    other file is kept, hard-linked into the new folder). ``card_kwargs`` go to the model card
    (e.g. ``eval_results``).

    Returns the folder on the main process, ``None`` elsewhere.
    """
    from safetensors.torch import save_file

    if not is_main_process():
        return None
    model = unwrap_model(model)
    if find_state(model) is None:
        raise ValueError("this model is not sparsified (no hf_chts state): nothing to write")
    refuse_inference_model(model)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the model there first (save_sparse)")
    compact = (folder / SPARSE_WEIGHTS_FILE).exists()
    save_id = stored_save_id(folder / SPARSE_WEIGHTS_FILE) if compact else None  # the values file keeps its id
    save_id = save_id or uuid.uuid4().hex
    with staged_commit(folder, owned_sparsity_files, link_first=True) as staging:
        tensors, metadata = mask_entries(model, save_id)
        save_file(tensors, str(staging / SPARSITY_FILE), metadata=metadata)
        fault_point("sparsity-written")
        record = _config_record(model, compact=compact, engine_record=_MISSING, save_id=save_id, manifest={})
        edited = edited_card(folder)
        card = write_model_card(staging, record=record, model=model,  # docs/hub.md#2-the-model-card
                                existing_card=folder / CARD_FILE,
                                **{"repo_id": folder.resolve().name, **(card_kwargs or {})})
        set_aside_edited_card(edited if card is not None else None, staging)
        names = sorted(p.name for p in staging.iterdir() if p.is_file() and (
            is_weight_file(p.name) or p.name in (SPARSITY_FILE, SPARSE_WEIGHTS_FILE, "config.json",
                                                 "generation_config.json") or (card and p.name == CARD_FILE)))
        record["manifest"] = build_manifest(staging, names)
        (staging / CONFIG_FILE).write_text(dump_record_json(record), encoding="utf-8")
        fault_point("config-written")
    return folder


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
    card = {"overwrite_card": bool(arguments.pop("overwrite_card", False)),
            **({"repo_id": hub["repo_id"]} if push and hub["repo_id"] else {})}
    if hub["token"] is not None and not push:
        arguments["token"] = hub["token"]
    folder = write_checkpoint(self, save_directory, state_dict=state_dict, save_kwargs=arguments, card_kwargs=card)
    if push:
        push_folder(folder, hub["repo_id"] or folder.resolve().name, token=hub["token"], private=hub["private"],
                    commit_message=hub["commit_message"] or PUSH_MESSAGE)
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
