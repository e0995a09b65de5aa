"""Pretrain a LLaMA-style causal LM sparse from scratch with Cannistraci-Hebb dynamic sparse training.

    accelerate launch -m hf_chts.recipe.pretrain --config recipes/tiny-llama-cpu.yaml [--key value ...]
    accelerate launch --config_file multi_gpu_ddp.yaml -m hf_chts.recipe.pretrain --config llama-60m-chtss.yaml
    python -m hf_chts.recipe.pretrain --config recipes/tiny-llama-cpu.yaml --training.max_steps 50

The module ships with the installed package, so ``accelerate launch -m`` works from
any folder (no checkout needed); ``recipes/pretrain.py`` runs this same ``main``.

Read top to bottom: recipe -> output folder -> data -> tokenizer -> model ->
sparsify -> Trainer with the CHTss callback -> train -> evaluate -> save ->
reload and compare -> lm-eval -> summary. Every step is a function of ``hf_chts.recipe`` (the library holds the
reusable parts, so ``hf-chts train`` does exactly the same); this file shows
the order. It runs on one process or many (DDP / FSDP through accelerate);
only the main process writes the summary, the plot and the checkpoint.

Overrides use ``HfArgumentParser``'s ``--key value`` syntax with the section as
prefix: ``--training.max_steps 50`` (or ``--max_steps 50``), ``--sparsify.target_density 0.1``,
``--model.hidden_size 32``, ``--data.text_files "corpus/*.txt"``. ``--overwrite`` replaces an output
folder that holds another run.
"""

import argparse
import logging
import time

from hf_chts import sparsify
from hf_chts import recipe as R
from hf_chts.verbosity import enable_command_line_messages, follow_trainer_log_level

logger = logging.getLogger(__name__)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hf_chts.recipe.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/tiny-llama-cpu.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder holding another run")
    args, overrides = parser.parse_known_args(argv)
    started = time.time()
    enable_command_line_messages()  # hf_chts's messages (logger "hf_chts") on stderr

    # 1. Recipe: YAML + overrides, validated (unknown keys, bad values, missing files fail here),
    #    and the output folder: it must not hold another run (checked by every rank, nothing written yet).
    try:
        recipe = R.load_recipe(args.config, overrides, overwrite=args.overwrite)
        R.check_schedule(recipe)
        mode = R.check_output_dir(recipe)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    R.configure_torch(recipe)  # run.torch_threads
    state = R.process_state()  # one process, or one of many under `accelerate launch` (CPU ranks included)

    # 2. Data and tokenizer: documents -> (BPE trained and cached, or a Hub tokenizer) -> packed blocks.
    #    The main process goes first so dataset and tokenizer caches are written once.
    with state.main_process_first():
        corpus = R.load_corpus(recipe)
        tokenizer = R.build_tokenizer(recipe, corpus)
        data = R.build_lm_datasets(recipe, tokenizer, corpus)
    if state.is_main_process:
        logger.info("hf_chts: data: %s", data.stats)

    # 3. Model: a LlamaConfig from the preset, or the config of model.name_or_path (+ overrides), randomly
    #    initialised: pretraining from scratch.
    model = R.build_model(recipe, tokenizer)
    logger.info("hf_chts: [rank %d] model: %.2fM parameters", state.process_index,
                sum(p.numel() for p in model.parameters()) / 1e6)

    # 4. Sparsify: every decoder linear becomes a masked layer at the initial density.
    config = R.sparsify_config(recipe)
    sparsify(model, config)

    # 5. Everything loaded on every rank: the main process claims the output folder (recipe.yaml).
    state.wait_for_everyone()
    if state.is_main_process:
        R.prepare_output_dir(recipe, mode)
    state.wait_for_everyone()

    # 5b. eval.compare_dense: the same recipe trained dense first, in <output_dir>/dense-baseline
    #     (every rank takes part); its validation PPL goes into this run's summary and plot.
    dense_baseline = R.train_dense_baseline(recipe, mode)

    # 6. Trainer + callback: the callback (CHTssTrainerCallback) runs removal / percolation / regrowth
    #    every Δ steps; the Trainer trains on the packed blocks and evaluates on the validation blocks.
    callback = R.make_callback(recipe, config)
    training_args = R.training_arguments(recipe, world_size=state.num_processes)
    follow_trainer_log_level(training_args)  # training.log_level applies to hf_chts's messages too
    trainer = R.build_trainer(recipe, model, tokenizer, data, callback, args=training_args)

    # 7. Train (resuming from the last checkpoint-N when run.resume is set).
    resume = R.last_checkpoint(recipe, report=True) if mode == "resume" else None
    output = trainer.train(resume_from_checkpoint=resume)

    # 8. Evaluate: the validation loss through the Trainer, the ranks' ids and, with FSDP2-sharded
    #    weights, the full state dict. Collective: every rank takes part.
    # 9. The main process saves the sparse checkpoint final/, reloads it with load_sparse and checks
    #    that it reproduces the trained model, runs lm-eval on it (scores added to final/'s model card),
    #    and writes run_summary.json + plot. A step of 9 that fails is recorded in the summary, which is
    #    written anyway, and the run then fails (EvaluationAfterTrainingError): the trained model is kept.
    R.finish_run(recipe, trainer, callback, tokenizer, data, started=started, train_output=output,
                 dense_baseline=dense_baseline)


if __name__ == "__main__":
    main()
