"""The end of a run as named steps: evaluate, save ``final/``, reload and compare, lm-eval, summary.

``recipes/pretrain.py`` calls the steps one by one; :func:`finish_run` calls the
same steps in the same order for ``hf-chts train``. The first three steps are
collective (every process calls them); the others run on the main process only.
Under FSDP2 (sharded weights) a forward pass and ``full_tensor()`` are
collective, so no main-process step runs the sharded model: the validation
loss is the Trainer's, the full state dict is gathered by every rank and the
in-memory vs reloaded comparison is skipped.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, evaluation
from ..checkpointing.format import weight_key
from ..checkpointing.saving import write_sparsity_files
from ..extras import missing_extra
from ..layers import sparse_layers, zero_masked_
from ..model import sparsity_report
from .data import LMData, collate_blocks
from .schema import SUMMARY_FILE, Recipe
from .summary import FINAL_DIR, build_summary, write_summary

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- collective steps (every process)
def evaluate_perplexity(recipe: Recipe, trainer) -> dict[str, float]:
    """The Trainer's evaluation on the validation blocks (``eval_loss``); ``{}`` when ``eval.perplexity`` is off."""
    return trainer.evaluate() if recipe.eval.perplexity else {}


def gather_ranks() -> list[dict[str, Any]]:
    """(rank, pid, host) of every process; one entry when not distributed."""
    import socket

    import torch.distributed as dist

    me = {"rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "host": socket.gethostname()}
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, me)
        return gathered
    return [me]


def gather_full_state_dict(trainer) -> dict | None:
    """Under FSDP2 the full state dict, gathered by every rank (collective); ``None`` for unsharded weights."""
    return trainer.accelerator.get_state_dict(trainer.model) if weights_are_sharded(trainer.model) else None


# ---------------------------------------------------------------- main-process steps
def save_final_checkpoint(recipe: Recipe, trainer, tokenizer, full_state_dict: dict | None) -> Path:
    """Write the sparse checkpoint ``<output_dir>/final`` (from the gathered state dict when sharded)."""
    final_dir = recipe.output_dir / FINAL_DIR
    if weights_are_sharded(trainer.model):
        save_gathered_state_dict(trainer.accelerator.unwrap_model(trainer.model), full_state_dict, final_dir, tokenizer)
    else:
        checkpoint.save_sparse(trainer.model, str(final_dir), tokenizer=tokenizer)
    logger.info("hf_chts: sparse checkpoint saved to %s", final_dir)
    return final_dir


def reload_final_checkpoint(recipe: Recipe, model, final_dir: Path):
    """``load_sparse(final_dir)`` on the trained model's device when the reload check or lm-eval needs it, else ``None``.

    A plain (unsharded) copy: evaluating it is not collective.
    """
    if not (recipe.eval.check_reload or recipe.eval.tasks or recipe.eval.local_task_from_heldout):
        return None
    reloaded = checkpoint.load_sparse(str(final_dir))
    reloaded.to(_local_device(model))
    return reloaded


def check_reload(recipe: Recipe, model, reloaded, data: LMData, final_dir: Path) -> dict[str, Any] | None:
    """Validation loss of the model in memory vs reloaded from ``final_dir`` (``None`` when not checked)."""
    if weights_are_sharded(model) and recipe.eval.check_reload:
        logger.info("hf_chts: weights are sharded (FSDP2): the validation loss is the Trainer's eval_loss from every "
                    "rank; skipping the in-memory vs reloaded comparison of %s (it would run the sharded "
                    "model on the main process alone)", final_dir)
        return None
    if not (recipe.eval.check_reload and recipe.eval.perplexity):
        return None
    in_memory = validation_loss(model, data.validation, recipe.eval.batch_size)
    from_disk = validation_loss(reloaded, data.validation, recipe.eval.batch_size)
    match = math.isclose(in_memory, from_disk, rel_tol=1e-5, abs_tol=1e-6)
    (logger.info if match else logger.error)(
        "hf_chts: validation loss in memory %.6f, reloaded from %s %.6f -> %s", in_memory, final_dir, from_disk,
        "match" if match else "MISMATCH: the checkpoint does not reproduce the trained model")
    return {"in_memory_loss": in_memory, "reloaded_loss": from_disk, "match": match}


LOCAL_TASK_CONTEXT_WORDS = 24
LOCAL_TASK_CONTINUATION_WORDS = 8


def model_max_length(model) -> int | None:
    """The model's context in tokens, read from its config as lm-eval's ``HFLM`` reads it (``None`` if unknown)."""
    config = getattr(model, "config", None)
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fitting_continuation_words(texts: list[str], tokenizer, max_length: int | None,
                               *, context_words: int = LOCAL_TASK_CONTEXT_WORDS,
                               most: int = LOCAL_TASK_CONTINUATION_WORDS) -> int:
    """Words per answer of the local multiple-choice task such that every answer fits the model's context.

    lm-eval keeps the whole continuation (only the context is cut from the left) and asserts that it fits
    ``max_length``; answers are kept to ``max_length - 1`` tokens so at least one context token remains. Returns
    the largest count up to ``most`` that fits (0 when not even one word does).
    """
    if max_length is None or tokenizer is None:
        return most
    budget = max_length - 1
    spans = [text.split()[context_words:] for text in texts]
    for words in range(most, 0, -1):
        longest = max((len(tokenizer(" " + " ".join(span[:words]), add_special_tokens=False)["input_ids"])
                       for span in spans if len(span) >= words), default=0)
        if longest <= budget:
            return words
    return 0


def run_lm_eval(recipe: Recipe, model, tokenizer, data: LMData) -> dict[str, Any] | None:
    """lm-eval tasks (and tasks built from held-out text, within the model's context) on ``model``; main process
    only.

    Without lm-eval (the base install) the tasks are written but not run: a warning names the
    ``[eval]`` extra, and the record says ``skipped`` (the summary prints the command to run them later).
    """
    tasks = list(recipe.eval.tasks)
    include_path = None
    if recipe.eval.local_task_from_heldout:
        include_path = recipe.output_dir / "lm_eval_tasks"
        texts = data.validation_texts[: recipe.eval.local_task_documents]
        words = fitting_continuation_words(texts, tokenizer, model_max_length(model))
        kinds = ("choice", "perplexity") if words else ("perplexity",)
        if words < LOCAL_TASK_CONTINUATION_WORDS:
            logger.warning("hf_chts: local lm-eval task answers shortened to %d word(s) to fit the model's context of "
                           "%d tokens%s", words, model_max_length(model),
                           "" if words else "; the multiple-choice task is skipped")
        tasks.extend(evaluation.write_local_tasks(include_path, texts, seed=recipe.run.seed, kinds=kinds,
                                                  context_words=LOCAL_TASK_CONTEXT_WORDS,
                                                  continuation_words=max(words, 1)))
    if not tasks:
        return None
    missing = missing_extra("lm_eval")
    if missing:
        logger.warning("hf_chts: skipping the lm-eval step (tasks %s): %s", ", ".join(tasks), missing)
        return {"tasks": tasks, "include_path": str(include_path) if include_path else None, "metrics": {},
                "skipped": missing}
    device = str(next(model.parameters()).device)
    results = evaluation.evaluate_model(model, tokenizer, tasks, include_path=include_path,
                                        batch_size=recipe.eval.batch_size, limit=recipe.eval.limit, device=device)
    if results is None:
        return None
    print(evaluation.results_table(results))
    return {"tasks": tasks, "include_path": str(include_path) if include_path else None,
            "metrics": evaluation.finite_metrics(results), "results": evaluation.jsonable_results(results)}


def add_results_to_final_card(model, final_dir: Path, lm_eval: dict[str, Any] | None) -> None:
    """Put the lm-eval scores into ``final_dir``'s model card: a new save of its card and sparsity files
    (the weights are kept), so the checkpoint stays one verified save. Nothing to do without results."""
    if lm_eval and lm_eval.get("metrics"):
        write_sparsity_files(model, final_dir, card_kwargs={"eval_results": lm_eval["metrics"]})


# ---------------------------------------------------------------- all steps in order
def finish_run(recipe: Recipe, trainer, callback, tokenizer, data: LMData, *, started: float,
               train_output=None, dense_baseline: dict | None = None) -> dict[str, Any]:
    """The steps of this module in order; ``hf-chts train`` and ``hf_chts.recipe.pretrain``
    (``accelerate launch``) both end with it.

    Every process must call it (evaluation is collective); only the main
    process writes files. Returns the summary (the main process's copy).
    """
    failures: list[tuple[str, Exception]] = []

    def attempt(step: str, run, fallback=None):
        """An evaluation step after training: a failure is recorded (the summary is still written), not fatal."""
        try:
            return run()
        except Exception as error:  # noqa: BLE001 - re-raised after the summary is written
            failures.append((step, error))
            logger.warning("hf_chts: the evaluation step '%s' failed after training: %s: %s", step,
                           type(error).__name__, " ".join(str(error).split())[:300])
            return fallback

    metrics = evaluate_perplexity(recipe, trainer)
    ranks = gather_ranks()
    full_state_dict = gather_full_state_dict(trainer)
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        report = sparsity_report(trainer.model)
        final_dir = save_final_checkpoint(recipe, trainer, tokenizer, full_state_dict)
        full_state_dict = None
        reloaded = attempt("reload", lambda: reload_final_checkpoint(recipe, trainer.model, final_dir))
        reload_check = None if failures else attempt(
            "check_reload", lambda: check_reload(recipe, trainer.model, reloaded, data, final_dir))
        lm_eval = attempt("lm_eval", lambda: run_lm_eval(recipe, reloaded if reloaded is not None else trainer.model,
                                                         tokenizer, data))
        if lm_eval:
            attempt("model_card", lambda: add_results_to_final_card(trainer.model, final_dir, lm_eval))
        summary = build_summary(recipe, trainer, callback, data, report=report, metrics=metrics, ranks=ranks,
                                reload_check=reload_check, lm_eval=lm_eval, final_dir=final_dir, started=started,
                                train_output=train_output, dense_baseline=dense_baseline)
        if failures:
            summary["evaluation_errors"] = [{"step": step, "error": f"{type(error).__name__}: {error}"}
                                            for step, error in failures]
        write_summary(recipe, summary)
    trainer.accelerator.wait_for_everyone()
    if failures:
        step, error = failures[0]
        raise EvaluationAfterTrainingError(
            f"training finished, but the evaluation step '{step}' failed ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}); the trained model is in {recipe.output_dir / FINAL_DIR} and "
            f"{recipe.output_dir / SUMMARY_FILE} records the run (evaluation_errors); evaluate it again with "
            f"hf-chts eval {recipe.output_dir / FINAL_DIR} --tasks ...") from error
    return summary


class EvaluationAfterTrainingError(RuntimeError):
    """An evaluation step after training failed; the final checkpoint and the run summary were written."""


# ---------------------------------------------------------------- helpers
def validation_loss(model, dataset, batch_size: int = 8) -> float:
    """Token-mean next-token loss of ``model`` over packed blocks (fp32, no autocast, deterministic)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate_blocks([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = model(**batch).loss
            tokens = batch["labels"][:, 1:].numel()
            total += float(loss) * tokens
            count += tokens
    model.train(was_training)
    return total / max(count, 1)


def weights_are_sharded(model) -> bool:
    """True when a sparse layer's weight is a DTensor (FSDP2 ``fully_shard``): forward passes are collective."""
    return any(layer.is_sharded for layer in sparse_layers(model).values())


def _local_device(model) -> torch.device:
    parameter = next(model.parameters())
    return getattr(parameter, "to_local", lambda: parameter)().device


def save_gathered_state_dict(model, full_state_dict: dict, final_dir: Path, tokenizer) -> None:
    """Main process, sharded weights: write ``final_dir`` from the gathered full state dict.

    ``save_sparse`` reads the (sharded) model's own weights, so the weights come
    from ``full_state_dict`` (masked again with the full masks, which every rank
    holds) through the class's ``save_pretrained``; ``write_sparsity_files`` adds
    ``sparsity.safetensors`` and ``sparsify_config.json`` from the full masks.
    """
    state = dict(full_state_dict)
    for name, layer in sparse_layers(model).items():
        key = weight_key(name)
        tensor = state.get(key)
        keep = layer.storage_view(layer.mask)
        if torch.is_tensor(tensor) and tensor.shape == keep.shape:
            state[key] = zero_masked_(tensor.detach().clone(), keep.to(tensor.device))  # exact: NaN/inf included
        else:
            raise ValueError(f"hf_chts: the gathered state dict has no full weight {key!r} for the sparse layer "
                             f"{name!r} (got {None if tensor is None else tuple(tensor.shape)})")
    final_dir.mkdir(parents=True, exist_ok=True)
    type(model).save_pretrained(model, str(final_dir), state_dict=state, is_main_process=True)
    write_sparsity_files(model, final_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(final_dir))
