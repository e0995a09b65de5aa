"""Trainer pushes carry the sparsity files and the model card (docs/hub.md#3-pushes-carry-the-sparsity-files).

``transformers.Trainer`` pushes ``output_dir`` to the Hub in two ways:

- ``_push_from_checkpoint`` (``push_to_hub=True`` with ``hub_strategy`` ``every_save``, ``checkpoint`` or
  ``all_checkpoints``) copies only the modeling files (config, weights, index, shards) of ``checkpoint-N``
  into ``output_dir``, then uploads ``output_dir``: without help the repo gets new weights beside no masks,
  or beside the masks of an older save;
- ``push_to_hub()`` (end of training, or ``save_model()`` with ``push_to_hub=True``) saves the model into
  ``output_dir`` (the save hook writes masks, config and card), then ``create_model_card`` replaces
  ``README.md`` with the Trainer's draft card, then uploads.

Both call the callbacks' ``on_push_begin`` first. :func:`prepare_trainer_push` (called there by
``CHTssTrainerCallback``) copies the masks and the config of ``checkpoint-N`` into ``output_dir`` with the
weights and writes the card; :func:`keep_sparse_card` makes the Trainer's ``create_model_card`` write the
hf_chts card with the Trainer's draft appended.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from .checkpointing.format import CONFIG_FILE, SPARSITY_FILE, read_sparsify_config
from .model_card import CARD_FILE, card_owner, write_model_card


_WRAPPED = "_hf_chts_card_wrapper"


def _copy_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.hf_chts-copy")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def prepare_trainer_push(args, state, model: nn.Module | None) -> list[str]:
    """Before a Trainer push: put the masks, the config and the card of ``checkpoint-<global_step>`` into
    ``output_dir`` (main process). Returns the names of the files written."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not state.is_world_process_zero:
        return []
    output_dir = Path(args.output_dir)
    checkpoint = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    if not all((checkpoint / name).is_file() for name in (SPARSITY_FILE, CONFIG_FILE)):
        return []  # not a checkpoint push (push_to_hub() saves output_dir itself) or not a sparse checkpoint
    written = []
    for name in (SPARSITY_FILE, CONFIG_FILE):  # the weights follow: Trainer copies them after this callback
        _copy_atomically(checkpoint / name, output_dir / name)
        written.append(name)
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) or None
    if write_model_card(output_dir, record=read_sparsify_config(output_dir), model=model, tokens_trained=tokens, repo_id=_repo_name(args)) is not None:
        written.append(CARD_FILE)
    return written


def _repo_name(args) -> str:
    return args.hub_model_id or Path(args.output_dir).absolute().name


def keep_sparse_card(trainer, model: nn.Module | None = None) -> None:
    """Make ``trainer.create_model_card`` (run by ``Trainer.push_to_hub``) end with the hf_chts card: the
    Trainer's draft becomes an appendix. Installed once per Trainer instance; the class is untouched."""
    if trainer is None or getattr(trainer.create_model_card, _WRAPPED, False):
        return
    original = trainer.create_model_card

    def create_model_card(*args, **kwargs):
        result = original(*args, **kwargs)
        if not trainer.is_world_process_zero():
            return result
        readme = Path(trainer.args.output_dir) / CARD_FILE
        if (readme.parent / CONFIG_FILE).is_file() and card_owner(readme) == "trainer":
            from huggingface_hub import ModelCard

            draft = ModelCard.load(readme, ignore_metadata_errors=True).text
            draft = "\n".join(("#" + line if line.startswith("#") else line) for line in draft.splitlines())
            tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0) or None
            write_model_card(readme.parent, record=read_sparsify_config(readme.parent), model=model if model is not None else trainer.model,
                             tokens_trained=tokens, repo_id=trainer.hub_model_id or _repo_name(trainer.args),
                             appendix="## Training details (from transformers.Trainer)\n\n" + draft.strip())
        return result

    setattr(create_model_card, _WRAPPED, True)
    trainer.create_model_card = create_model_card
