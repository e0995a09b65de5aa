"""``TrainingArguments``, the ``Trainer`` and the sparse-training callback of a recipe."""

from __future__ import annotations

import os

from ..config import SparsifyConfig
from .data import LMData, collate_blocks
from .schema import SPARSE_ADAMW_OPTIM, Recipe
from .validation import recipe_strategy_defaults


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(recipe: Recipe, *, world_size: int | None = None):
    """``TrainingArguments`` from ``recipe.training`` plus the recipe's defaults.

    Defaults: ``use_cpu`` when no GPU, ``report_to: none``, ``seed`` = run.seed,
    evaluation every ``eval_steps`` when given, ``bf16: auto`` -> bf16 on GPUs
    that support it; ``run.global_batch_size`` fixes the gradient accumulation.
    """
    import torch
    from transformers import TrainingArguments

    values = dict(recipe.training)
    if values.get("optim") == SPARSE_ADAMW_OPTIM:
        del values["optim"]  # build_trainer() passes hf_chts.SparseAdamW; its kernel follows the default optim
    world_size = world_size or _world_size()
    cuda = torch.cuda.is_available()
    values.setdefault("use_cpu", not cuda)
    values.setdefault("report_to", "none")
    values.update(recipe_strategy_defaults(recipe))
    if values.get("bf16") == "auto":
        values["bf16"] = bool(cuda and torch.cuda.is_bf16_supported())
    values.setdefault("per_device_eval_batch_size", values.get("per_device_train_batch_size", 8))
    if recipe.run.global_batch_size is not None:
        per_device = values.get("per_device_train_batch_size", 8)
        denominator = per_device * world_size
        if recipe.run.global_batch_size % denominator:
            raise ValueError(
                f"run.global_batch_size = {recipe.run.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size ({per_device}) × processes ({world_size}) = {denominator}")
        values["gradient_accumulation_steps"] = recipe.run.global_batch_size // denominator
    return TrainingArguments(output_dir=str(recipe.output_dir), seed=recipe.run.seed, data_seed=recipe.run.seed,
                             **values)


def build_trainer(recipe: Recipe, model, tokenizer, data: LMData, callback, args=None):
    """A ``transformers.Trainer`` on the packed blocks with the sparse-training callback
    (and ``hf_chts.SparseAdamW`` when ``training.optim: hf_chts_sparse_adamw``)."""
    from transformers import Trainer

    args = args if args is not None else training_arguments(recipe)
    optimizer = None
    if recipe.training.get("optim") == SPARSE_ADAMW_OPTIM:
        from ..sparse_adamw import sparse_adamw_cls_and_kwargs

        optimizer = sparse_adamw_cls_and_kwargs(args)
    return Trainer(model=model, args=args, train_dataset=data.train,
                   eval_dataset=data.validation if recipe.eval.perplexity else None,
                   data_collator=collate_blocks, processing_class=tokenizer, callbacks=[callback],
                   optimizer_cls_and_kwargs=optimizer)


def make_callback(recipe: Recipe, config: SparsifyConfig):
    from ..callback import CHTssTrainerCallback

    return CHTssTrainerCallback(config, log_per_layer=recipe.run.log_per_layer_density)
