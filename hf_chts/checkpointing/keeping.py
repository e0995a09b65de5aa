"""What a save keeps of the folder it replaces, beyond the Trainer's and the user's files that the commit
carries over (docs/checkpoint-format.md#74-what-a-save-replaces-what-it-keeps): weight-like files no save
wrote (kept, with a warning naming them) and a model card edited after its save (set aside as
``README.edited.md`` when the new card replaces it).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..model_card import CARD_FILE
from .format import is_weight_file, read_sparsify_config
from .manifest import file_digest

logger = logging.getLogger("hf_chts.checkpoint")


def _old_record(target: Path) -> dict:
    try:
        return (read_sparsify_config(target) if target.is_dir() else None) or {}
    except ValueError:
        return {}


def old_manifest_entry(target: Path, name: str) -> dict | None:
    """The manifest entry of ``name`` in the checkpoint now in ``target`` (``None``: none, or no readable record)."""
    manifest = _old_record(target).get("manifest")
    entry = manifest.get(name) if isinstance(manifest, dict) else None
    return entry if isinstance(entry, dict) else None


def edited_card(target: Path) -> Path | None:
    """``target/README.md`` when it is listed in the manifest of the save now in ``target`` but its bytes changed
    since (the user edited the card that save wrote), else ``None``."""
    entry, card = old_manifest_entry(target, CARD_FILE), target / CARD_FILE
    if entry is None or not card.is_file() or card.is_symlink():
        return None
    try:
        return card if file_digest(card)["sha256"] != entry.get("sha256") else None
    except ValueError:
        return None


def set_aside_edited_card(card: Path | None, staging: Path) -> None:
    """Copy an edited card (:func:`edited_card`) into ``staging`` as ``README.edited.md`` (or ``-2``, ...), outside
    the manifest so later saves keep it too, with a warning naming it: the new save's card replaces ``README.md``."""
    if card is None or not (staging / CARD_FILE).exists():
        return
    aside = staging / "README.edited.md"
    number = 1
    while os.path.lexists(aside) or os.path.lexists(card.parent / aside.name):
        number += 1
        aside = staging / f"README.edited-{number}.md"
    shutil.copy2(card, aside)
    logger.warning("hf_chts: %s was edited after the save that wrote it; the new model card replaces it and your "
                   "edited copy is kept as %s", card, card.parent / aside.name)


def warn_kept_weight_like_files(target: Path) -> None:
    """Warn about files in ``target`` named like weights that no save wrote (e.g. ``model.fp16.safetensors``):
    a save keeps them, and neither hf_chts nor transformers loads them."""
    if not target.is_dir():
        return
    kept = sorted(entry.name for entry in target.iterdir() if entry.name.startswith(("model", "pytorch_model"))
                  and entry.name.endswith((".safetensors", ".bin")) and not is_weight_file(entry.name)
                  and old_manifest_entry(target, entry.name) is None)
    if kept:
        logger.warning("hf_chts: kept %s in %s: not written by hf_chts and not part of the checkpoint (not loaded)",
                       ", ".join(kept), target)
