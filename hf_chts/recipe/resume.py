"""Before a recipe resumes: find its last checkpoint and refuse one saved under another SparsifyConfig.

Checked with the output folder (before anything is loaded or written), so a
changed ``sparsify`` section or ``run.seed`` is refused up front instead of at
the Trainer's first callback; the engine checks again when it loads the state.
"""

from __future__ import annotations

from ..checkpointing.format import read_sparsify_config
from ..config_changes import check_resume_config
from .schema import Recipe, sparsify_config


def last_checkpoint(recipe: Recipe) -> str | None:
    """The newest ``checkpoint-N`` folder of the run (``None`` when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(recipe.output_dir)) if recipe.output_dir.is_dir() else None


def check_resume_matches(recipe: Recipe) -> None:
    """Raise ``ValueError`` when the last checkpoint was saved with another SparsifyConfig (fields old → new)."""
    checkpoint = last_checkpoint(recipe)
    if checkpoint is None:
        return
    record = read_sparsify_config(checkpoint)
    if record is None:
        return  # the engine refuses a checkpoint without engine state when it resumes
    check_resume_config(record["config"], sparsify_config(recipe), where=f"the checkpoint {checkpoint}")
