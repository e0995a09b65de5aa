"""Sparse checkpoints: ``save_sparse`` / ``load_sparse``, the Hub, ``hf-chts inspect`` / ``export``.

The public API of :mod:`hf_chts.checkpointing`, in one place. The code is split
by job: :mod:`~hf_chts.checkpointing.format` (the files, their encoding and
validation; the format is specified in docs/checkpoint-format.md), :mod:`~hf_chts.checkpointing.saving`
(saving, the ``save_pretrained`` hook), :mod:`~hf_chts.checkpointing.compact`
(the compact format), :mod:`~hf_chts.checkpointing.loading` (loading, the Hub)
and :mod:`~hf_chts.checkpointing.tools` (``inspect`` / ``export``);
``merge_lora`` lives in :mod:`hf_chts.lora`.

:func:`load_sparse` is the loading front above both kinds of model: the masked model
(:func:`~hf_chts.checkpointing.loading.load_masked_model`) and the inference-only one
(:func:`~hf_chts.inference.loading.load_inference_model`), so neither package imports the other's caller.
"""

from __future__ import annotations

import os

from torch import nn

from .checkpointing.compact import read_compact_values
from .checkpointing.format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    SPARSE_WEIGHTS_FILE,
    SPARSITY_FILE,
    decode_engine_record,
    module_name_of,
    pack_mask,
    read_masks,
    read_sparsify_config,
    unpack_mask,
    weight_key,
)
from .checkpointing.loading import load_masked_model, read_engine_state, resolve_checkpoint
from .checkpointing.saving import install_save_hook, is_main_process, save_sparse, write_sparsity_files
from .checkpointing.tools import (
    export_checkpoint,
    export_command,
    format_inspection,
    inspect_checkpoint,
    inspect_command,
)
from .inference.autotune import DEFAULT_AUTO_TOKENS
from .inference.loading import load_inference_model
from .lora import merge_lora


def load_sparse(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                cache_dir: str | None = None, local_files_only: bool | None = None, inference: bool = False,
                kernel: str = "auto", auto_tokens=DEFAULT_AUTO_TOKENS, verify: str | None = None,
                **from_pretrained_kwargs) -> nn.Module:
    """Load a sparse checkpoint (local folder or Hub repo id) as a sparsified model.

    Loads the weights with ``AutoModelForCausalLM.from_pretrained`` (expanding
    the compact format when present), reads the masks and the SparsifyConfig,
    validates them against the model and calls ``sparsify(model, config, masks=...)``.
    The engine progress is available with :func:`read_engine_state`. Every file is
    first verified to come from one save, and the whole load reads one save: a save
    that replaces the folder meanwhile makes the load start again
    (``hf_chts.checkpointing.loading.read_one_save``); ``trust_remote_code`` is ``False``
    unless passed explicitly.

    Args:
        path_or_repo_id: checkpoint folder or ``"org/name"`` on the Hub.
        revision / token / cache_dir / local_files_only: Hub download options;
            ``HF_HUB_OFFLINE=1`` restricts to the local cache.
        inference: build an inference-only model instead (docs/inference.md):
            every sparsified layer is built straight from its mask and live
            values with ``kernel`` (``"auto"``, ``"csr"``, ``"dense"``; as in
            ``to_sparse_inference``, with ``auto_tokens``), never holding a
            dense copy of a sparsified weight; safetensors files only, and of
            the ``from_pretrained`` options only ``dtype``.
        verify: ``"full"`` (SHA-256 of every file) or ``"fast"`` (sizes, safetensors headers and save ids;
            no hash of the safetensors files); default: the ``HF_CHTS_VERIFY`` environment variable, else
            ``"full"`` (docs/checkpoint-format.md#71-save-id-and-manifest).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Returns:
        The model; sparsified unless the folder has no ``sparsity.safetensors``
        (then it is loaded dense with a warning).

    Raises:
        ValueError: naming the file and the field or tensor when the folder mixes
            files of different saves (save id / manifest), a stored weight is not 0
            at a masked position, or a file is truncated, corrupted, of the wrong
            type or not a regular file (docs/checkpoint-format.md#5-validation-on-load);
            or when saves kept replacing the folder during every attempt to read it.
    """
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only,
           "verify": verify}
    if inference:
        return load_inference_model(path_or_repo_id, kernel=kernel, auto_tokens=auto_tokens, **hub,
                                    **from_pretrained_kwargs)
    return load_masked_model(path_or_repo_id, **hub, **from_pretrained_kwargs)


__all__ = [
    "save_sparse", "load_sparse", "read_engine_state", "read_masks", "read_sparsify_config", "install_save_hook",
    "write_sparsity_files", "merge_lora",
    "inspect_checkpoint", "export_checkpoint", "pack_mask", "unpack_mask", "FORMAT_VERSION", "SPARSITY_FILE",
    "CONFIG_FILE", "SPARSE_WEIGHTS_FILE",
    "decode_engine_record", "export_command", "format_inspection", "inspect_command", "is_main_process",
    "module_name_of", "read_compact_values", "resolve_checkpoint", "weight_key",
]
