"""Refusing DeepSpeed ZeRO at start: the sparse engine needs whole parameters and their optimizer state.

The engine masks each parameter's gradient and resets the optimizer moments of
removed and regrown links per parameter (docs/algorithms.md §1); ZeRO partitions
parameters, gradients and optimizer state across processes behind its own
optimizer, so those writes would miss or corrupt state. DDP and FSDP2 are the
supported ways to train on several processes (docs/distributed.md).

Detected from any of: ``ACCELERATE_USE_DEEPSPEED=true`` (set by ``accelerate
launch --use_deepspeed``, a DeepSpeed accelerate config, ``Accelerator(deepspeed_plugin=...)``
and ``TrainingArguments(deepspeed=...)``), ``TrainingArguments.deepspeed``,
a recipe's ``training.deepspeed``, an accelerator whose ``state.deepspeed_plugin``
is set, or a model / optimizer object from the ``deepspeed`` package.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import UserError

ENV_FLAG = "ACCELERATE_USE_DEEPSPEED"


def _from_deepspeed_package(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module == "deepspeed" or module.startswith("deepspeed.") or module == "accelerate.utils.deepspeed"


def deepspeed_in_use(*, accelerator: Any = None, training_args: Any = None, training: dict | None = None,
                     model: Any = None, optimizer: Any = None) -> list[str]:
    """Where DeepSpeed was found (empty when it is not in use); every argument is optional."""
    found = []
    if os.environ.get(ENV_FLAG, "false").strip().lower() in ("true", "1", "yes"):
        found.append(f"{ENV_FLAG}={os.environ[ENV_FLAG]} (accelerate launch --use_deepspeed or a DeepSpeed config)")
    if training_args is not None and getattr(training_args, "deepspeed", None):
        found.append(f"TrainingArguments.deepspeed={training_args.deepspeed!r}")
    if training and training.get("deepspeed"):
        found.append(f"training.deepspeed={training['deepspeed']!r} in the recipe")
    state = getattr(accelerator, "state", accelerator)
    if state is not None and getattr(state, "deepspeed_plugin", None) is not None:
        found.append("accelerator.state.deepspeed_plugin is set")
    for what, obj in (("model", model), ("optimizer", optimizer)):
        inner = getattr(obj, "optimizer", None) if what == "optimizer" else getattr(obj, "module", None)
        if any(_from_deepspeed_package(candidate) for candidate in (obj, inner) if candidate is not None):
            found.append(f"the {what} is a DeepSpeed object ({type(obj).__name__})")
    return found


def refuse_deepspeed(where: str, **sources: Any) -> None:
    """Raise :class:`~hf_chts.errors.UserError` (one line, with the fix) when DeepSpeed is in use."""
    found = deepspeed_in_use(**sources)
    if found:
        raise UserError(
            f"{where}: DeepSpeed ZeRO is not supported by hf_chts ({'; '.join(found)}): ZeRO partitions the parameters "
            "and optimizer state that the sparse engine masks and resets per parameter. Train with DDP or FSDP2 "
            "instead (accelerate launch without --use_deepspeed; see docs/distributed.md)"
        )
