"""Sparse checkpoints: ``save_sparse`` / ``load_sparse``, the Hub, ``hf-chts inspect`` / ``export``.

The public API of :mod:`hf_chts.checkpointing`, in one place. The code is split
by job: :mod:`~hf_chts.checkpointing.format` (the files, their encoding and
validation; the format is specified in docs/checkpoint-format.md), :mod:`~hf_chts.checkpointing.saving`
(saving, the ``save_pretrained`` hook), :mod:`~hf_chts.checkpointing.compact`
(the compact format), :mod:`~hf_chts.checkpointing.loading` (loading, the Hub)
and :mod:`~hf_chts.checkpointing.tools` (``inspect`` / ``export``);
``merge_lora`` lives in :mod:`hf_chts.lora`.
"""

from __future__ import annotations

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
from .checkpointing.loading import load_sparse, read_engine_state, resolve_checkpoint
from .checkpointing.saving import install_save_hook, is_main_process, save_sparse, write_sparsity_files
from .checkpointing.tools import (
    export_checkpoint,
    export_command,
    format_inspection,
    inspect_checkpoint,
    inspect_command,
)
from .lora import merge_lora

__all__ = [
    "save_sparse", "load_sparse", "read_engine_state", "read_masks", "read_sparsify_config", "install_save_hook",
    "write_sparsity_files", "merge_lora",
    "inspect_checkpoint", "export_checkpoint", "pack_mask", "unpack_mask", "FORMAT_VERSION", "SPARSITY_FILE",
    "CONFIG_FILE", "SPARSE_WEIGHTS_FILE",
    "decode_engine_record", "export_command", "format_inspection", "inspect_command", "is_main_process",
    "module_name_of", "read_compact_values", "resolve_checkpoint", "weight_key",
]
