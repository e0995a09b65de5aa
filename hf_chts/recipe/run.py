"""The whole recipe pipeline for one run, and the ``hf-chts train`` command."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from ..deepspeed_check import refuse_deepspeed
from .corpus import load_corpus
from .data import build_lm_datasets, build_tokenizer
from .models import build_model, configure_torch, process_state
from .loading import load_recipe
from .paths import check_output_dir, prepare_output_dir, release_output_dir
from .resume import last_checkpoint
from .schema import DENSE_BASELINE_DIR, Recipe, sparsify_config
from .summary import dense_baseline_record
from ..verbosity import follow_trainer_log_level
from .validation import check_schedule
from .finish import finish_run
from .trainer import build_trainer, make_callback, training_arguments


def dense_baseline_recipe(recipe: Recipe, mode: str) -> Recipe:
    """The same recipe trained dense (``eval.compare_dense``): same data, model, seed and training arguments;
    output in ``<output_dir>/dense-baseline``; no lm-eval tasks and no reload check (only its loss is compared).

    ``mode`` is the sparse run's (:func:`check_output_dir`): a resumed run resumes its baseline too, otherwise the
    baseline folder (written by hf_chts inside the run folder) is trained afresh.
    """
    dense = copy.deepcopy(recipe)
    dense.sparsify = {"method": "dense"}
    dense.run.output_dir = str(recipe.output_dir / DENSE_BASELINE_DIR)
    dense.run.resume, dense.run.overwrite = mode == "resume", mode != "resume"
    dense.eval.tasks, dense.eval.local_task_from_heldout, dense.eval.check_reload = [], False, False
    dense.eval.compare_dense = False
    return dense


def train_dense_baseline(recipe: Recipe, mode: str) -> dict[str, Any] | None:
    """Train :func:`dense_baseline_recipe` (collective: every process calls it) and return its record for the
    sparse run's summary (main process; ``None`` elsewhere or when ``eval.compare_dense`` is off)."""
    if not recipe.eval.compare_dense:
        return None
    dense = dense_baseline_recipe(recipe, mode)
    summary = run_recipe(dense, mode=check_output_dir(dense))
    return dense_baseline_record(summary) if summary else None


def run_recipe(recipe: Recipe, *, mode: str | None = None) -> dict[str, Any]:
    """The whole pipeline for one (already validated) recipe; see recipes/pretrain.py for the same steps spelt out.

    ``mode`` is :func:`check_output_dir`'s answer when the caller has already
    checked the output folder (``train_command``); otherwise it is checked here.
    """
    from ..model import sparsify

    started = time.time()
    refuse_deepspeed(f"recipe {recipe.source or ''}".strip(), training=recipe.training)  # before anything loads
    check_schedule(recipe)  # a schedule without updates fails now, not after the output folder is claimed
    threads = torch.get_num_threads()
    configure_torch(recipe)
    try:
        state = process_state()
        if mode is None:
            mode = check_output_dir(recipe)  # every rank checks before anyone writes
        with state.main_process_first():
            corpus = load_corpus(recipe)
            tokenizer = build_tokenizer(recipe, corpus)
            data = build_lm_datasets(recipe, tokenizer, corpus)
        model = build_model(recipe, tokenizer)
        config = sparsify_config(recipe)
        sparsify(model, config)
        state.wait_for_everyone()  # inputs are fine on every rank: claim the output folder
        if state.is_main_process:
            prepare_output_dir(recipe, mode)
        state.wait_for_everyone()
        dense_baseline = train_dense_baseline(recipe, mode)  # eval.compare_dense: same recipe, dense, first
        callback = make_callback(recipe, config)
        args = training_arguments(recipe, world_size=state.num_processes)
        follow_trainer_log_level(args)  # training.log_level applies to hf_chts's messages too
        trainer = build_trainer(recipe, model, tokenizer, data, callback, args=args)
        resume = last_checkpoint(recipe, report=True) if mode == "resume" else None
        output = trainer.train(resume_from_checkpoint=resume)
        return finish_run(recipe, trainer, callback, tokenizer, data, started=started, train_output=output,
                          dense_baseline=dense_baseline)
    finally:
        release_output_dir(recipe)  # the run folder's lock (taken by prepare_output_dir on the main process)
        torch.set_num_threads(threads)  # run.torch_threads applies to this run only


def train_command(args) -> int:
    """``hf-chts train <recipe> [--overwrite] [--key value ...]``."""
    recipe = load_recipe(args.recipe, list(getattr(args, "overrides", None) or []),
                         overwrite=bool(getattr(args, "overwrite", False)))
    mode = check_output_dir(recipe)  # every rank, once, before loading anything heavy
    run_recipe(recipe, mode=mode)
    return 0
