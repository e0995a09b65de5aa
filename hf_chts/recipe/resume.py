"""Before a recipe resumes: find its newest complete checkpoint and refuse one saved under another SparsifyConfig.

Checked with the output folder (before anything is loaded or written), so a
changed ``sparsify`` section or ``run.seed`` is refused up front instead of at
the Trainer's first callback; the engine checks again when it loads the state.

A ``checkpoint-N`` folder counts only when it is complete: its ``trainer_state.json``
(written last by the Trainer) reads as a JSON object and its hf_chts files verify
against their manifest. A save killed part-way leaves an incomplete newest folder;
resume then takes the newest complete one and names the folders it skipped.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..checkpointing.format import read_sparsify_config
from ..checkpointing.loading import verified_record
from ..config_changes import check_resume_config
from .schema import Recipe, sparsify_config

TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

logger = logging.getLogger(__name__)


def incomplete_reason(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete Trainer checkpoint (``None`` when it is)."""
    folder = Path(folder)
    state = folder / TRAINER_STATE_FILE
    if state.is_symlink() or not state.is_file():
        return f"no {TRAINER_STATE_FILE} (its save did not finish)"
    try:
        if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
            return f"{TRAINER_STATE_FILE} is not a JSON object"
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{TRAINER_STATE_FILE} is unreadable ({type(error).__name__})"
    try:
        verified_record(folder)
    except (OSError, ValueError) as error:
        return f"its files do not verify ({' '.join(str(error).split())[:200]})"
    return None


def newest_complete_checkpoint(output_dir: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` and the newer ones skipped, as (folder, reason)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None, []
    numbered = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_dir():
            numbered.append((int(match.group(1)), entry))
    skipped = []
    for _step, folder in sorted(numbered, reverse=True):
        reason = incomplete_reason(folder)
        if reason is None:
            return str(folder), skipped
        skipped.append((str(folder), reason))
    return None, skipped


def last_checkpoint(recipe: Recipe, *, report: bool = False) -> str | None:
    """The newest complete ``checkpoint-N`` folder of the run (``None`` when the run has no checkpoint).

    ``report``: print which incomplete folders were skipped. Raises ``ValueError`` when checkpoint folders
    exist but none is complete (resuming would silently start from scratch).
    """
    found, skipped = newest_complete_checkpoint(recipe.output_dir)
    if skipped and found is None:
        raise ValueError(f"run.resume: no complete checkpoint in {recipe.output_dir}: "
                         + "; ".join(f"{folder}: {reason}" for folder, reason in skipped)
                         + "; delete the incomplete folders to train from scratch, or pass --overwrite")
    if skipped and report:
        logger.warning("hf_chts: resuming from %s; skipped the newer incomplete %s", found,
                       "; ".join(f"{folder} ({reason})" for folder, reason in skipped))
    return found


def check_resume_matches(recipe: Recipe) -> None:
    """Raise ``ValueError`` when the checkpoint to resume from was saved with another SparsifyConfig (fields
    old → new), or when the run has checkpoint folders but none is complete."""
    found, skipped = newest_complete_checkpoint(recipe.output_dir)
    checkpoint = found or (skipped[0][0] if skipped else None)
    if checkpoint is None:
        return
    record = read_sparsify_config(checkpoint)
    if record is not None:  # (the engine refuses a checkpoint without engine state when it resumes)
        check_resume_config(record["config"], sparsify_config(recipe), where=f"the checkpoint {checkpoint}")
    last_checkpoint(recipe)  # none complete: refused here, before anything is loaded
