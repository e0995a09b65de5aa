"""Training recipes: a YAML file -> data, tokenizer, model, sparse Trainer run, summary.

Used by ``hf-chts train <recipe.yaml>`` and by :mod:`hf_chts.recipe.pretrain`
(``accelerate launch -m hf_chts.recipe.pretrain --config <recipe.yaml>``; it
calls the same functions one by one, so both do the same thing). A recipe has
seven sections, every field documented in ``recipes/README.md``::

    run:       output_dir, seed, overwrite, resume, global_batch_size, ...
    data:      builtin | text_files | data_files | dataset (+ dataset_config, streaming), block_size, split
    tokenizer: name (Hub name / folder) | train_bpe: {vocab_size}
    model:     preset (llama-tiny, llama-60m, llama-130m, llama-1b) | name_or_path, + explicit overrides
    sparsify:  SparsifyConfig fields (method, target_density, update_interval, ...)
    training:  transformers.TrainingArguments fields (max_steps, learning_rate, ...)
    eval:      perplexity, lm-eval tasks, local_task_from_heldout, limit

Every input problem (missing file, unknown key, output folder holding another
run) is raised as ``FileNotFoundError`` / ``ValueError`` / ``FileExistsError``
before anything is trained or written.

The pipeline is split by job: ``schema`` (recipe sections and their keys),
``typed`` (values typed by transformers' ``HfArgumentParser``), ``validation`` (cross-field rules),
``overrides`` (``--section.key value``),
``loading`` (a recipe file -> a validated recipe), ``paths`` (input files, output folder), ``corpus`` (text sources,
train / validation split), ``data`` (BPE tokenizer, packed blocks), ``presets``
and ``models`` (architecture, parameter counts, the model), ``trainer``
(TrainingArguments, Trainer), ``finish`` (the end-of-run steps: evaluation, final checkpoint, reload check, lm-eval),
``summary`` (run summary, plot)
and ``run`` (the whole run, ``hf-chts train``). Everything is re-exported here.
``BPE_TRAININGS`` is a live counter: read it as ``hf_chts.recipe.data.BPE_TRAININGS``.
"""

from .corpus import Corpus, builtin_documents, is_saved_dataset, load_corpus
from .data import (
    BPE_CACHE_VERSION,
    LMData,
    PackedStream,
    build_lm_datasets,
    build_tokenizer,
    collate_blocks,
    pack_blocks,
    train_bpe_tokenizer,
)
from .models import (
    build_model, check_model_source, configure_torch, model_config, parameter_count, pretrained_config, process_state,
)
from .presets import MODEL_PRESETS, model_settings
from .run import dense_baseline_recipe, last_checkpoint, run_recipe, train_command, train_dense_baseline
from .loading import load_recipe
from .overrides import apply_overrides, parse_overrides
from .paths import check_input_paths, check_output_dir, prepare_output_dir, release_output_dir, resolve_text_files
from .schema import (
    BUILTIN_CORPORA,
    DENSE_BASELINE_DIR,
    RECIPE_COPY,
    SECTIONS,
    SUMMARY_FILE,
    BPESection,
    DataSection,
    EvalSection,
    ModelSection,
    Recipe,
    RunSection,
    TokenizerSection,
    sparsify_config,
)
from .validation import check_schedule, recipe_from_dict
from .finish import (
    add_results_to_final_card,
    check_reload,
    evaluate_perplexity,
    finish_run,
    gather_full_state_dict,
    gather_ranks,
    reload_final_checkpoint,
    run_lm_eval,
    save_final_checkpoint,
    validation_loss,
)
from .summary import (
    FINAL_DIR,
    PLOT_FILE,
    build_summary,
    comparison_line,
    dense_baseline_record,
    eval_command_line,
    loss_curves,
    plot_training_curves,
    print_summary,
    sparsity_history,
    write_summary,
)
from .trainer import build_trainer, make_callback, training_arguments

__all__ = [
    "apply_overrides",
    "BPE_CACHE_VERSION",
    "BPESection",
    "build_lm_datasets",
    "build_model",
    "build_tokenizer",
    "build_summary",
    "build_trainer",
    "BUILTIN_CORPORA",
    "builtin_documents",
    "check_input_paths",
    "check_model_source",
    "check_output_dir",
    "check_reload",
    "check_schedule",
    "comparison_line",
    "dense_baseline_recipe",
    "dense_baseline_record",
    "DENSE_BASELINE_DIR",
    "collate_blocks",
    "configure_torch",
    "process_state",
    "Corpus",
    "DataSection",
    "eval_command_line",
    "evaluate_perplexity",
    "EvalSection",
    "FINAL_DIR",
    "finish_run",
    "gather_full_state_dict",
    "gather_ranks",
    "last_checkpoint",
    "LMData",
    "is_saved_dataset",
    "load_corpus",
    "load_recipe",
    "loss_curves",
    "make_callback",
    "model_config",
    "MODEL_PRESETS",
    "model_settings",
    "ModelSection",
    "pack_blocks",
    "PackedStream",
    "parameter_count",
    "parse_overrides",
    "PLOT_FILE",
    "plot_training_curves",
    "prepare_output_dir",
    "pretrained_config",
    "print_summary",
    "Recipe",
    "RECIPE_COPY",
    "recipe_from_dict",
    "release_output_dir",
    "reload_final_checkpoint",
    "resolve_text_files",
    "add_results_to_final_card",
    "run_lm_eval",
    "run_recipe",
    "save_final_checkpoint",
    "RunSection",
    "SECTIONS",
    "sparsify_config",
    "sparsity_history",
    "SUMMARY_FILE",
    "TokenizerSection",
    "train_bpe_tokenizer",
    "train_command",
    "train_dense_baseline",
    "training_arguments",
    "validation_loss",
    "write_summary",
]
