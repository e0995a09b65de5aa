"""Validating a recipe mapping: keys, typed values and the cross-field rules (nothing touches files or the network).

Types are checked by transformers' ``HfArgumentParser`` (:mod:`hf_chts.recipe.typed`);
this module holds the rules a type cannot express (one data source, divisible
head counts, positive step counts, ``TrainingArguments``' own checks).
"""

from __future__ import annotations

import dataclasses
import math
import os

from ..suggest import did_you_mean
from .presets import MODEL_PRESETS, model_settings
from .schema import (
    BUILTIN_CORPORA, COMPRESSION_SUFFIXES, DATA_FILE_FORMATS, NESTED_SECTIONS, SECTIONS, SPARSE_ADAMW_OPTIM,
    TRAINING_RESERVED, Recipe, section_class, section_keys, sparsify_config, unknown_key_error,
)
from .typed import NULL_TOKENS, typed_values

def _mapping(values, label: str, where: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: section '{label}' must be a mapping of key: value, got {values!r}")
    return values


def _check_keys(values: dict, allowed, label: str, where: str) -> None:
    for key in values:
        if label == "training" and key in TRAINING_RESERVED:
            raise ValueError(f"{where}: training.{key} is set by the recipe's {TRAINING_RESERVED[key]}; "
                             f"remove it from the training section")
        if key not in allowed:
            raise unknown_key_error(key, label, allowed, where)


def _build_section(cls, values, label: str, where: str):
    """A section dataclass from its mapping: unknown keys, then every value typed by ``HfArgumentParser``."""
    values = _mapping(values, label, where)
    _check_keys(values, {f.name for f in dataclasses.fields(cls)}, label, where)
    nested = {key: values[key] for key in values if key in NESTED_SECTIONS.get(label, {})}
    typed = typed_values(cls, {k: v for k, v in values.items() if k not in nested}, label, where)
    for key, value in nested.items():
        typed[key] = None if value is None or value in NULL_TOKENS else _build_section(NESTED_SECTIONS[label][key], value,
                                                                f"{label}.{key}", where)
    return cls(**typed)


def _typed_mapping(section: str, values, where: str) -> dict:
    """The ``sparsify`` / ``training`` mapping with every value typed by its dataclass's ``HfArgumentParser``."""
    values = dict(_mapping(values, section, where))
    _check_keys(values, section_keys(section), section, where)
    special = (("bf16", "auto"), ("optim", SPARSE_ADAMW_OPTIM))  # values TrainingArguments does not know
    auto = {key: values.pop(key) for key, value in special if section == "training" and values.get(key) == value}
    return {**typed_values(section_class(section), values, section, where), **auto}


def recipe_from_dict(raw: dict, where: str = "recipe", *, check: bool = True) -> Recipe:
    """Validate a recipe mapping (unknown keys -> ValueError with a did-you-mean hint).

    ``check=False`` validates keys and types only (not the cross-field rules), e.g. for a
    file whose missing pieces come from command-line overrides.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    for section in raw:
        if section not in SECTIONS:
            raise unknown_key_error(section, "", SECTIONS, where)
    kwargs = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section)
        kwargs[section] = _build_section(cls, values, section, where) if cls else _typed_mapping(section, values, where)
    recipe = Recipe(**kwargs)
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if recipe.model.name_or_path and "preset" not in model:
        recipe.model.preset = None  # the preset's default gives way to name_or_path
    if check:
        _check_recipe(recipe, where)
    return recipe


def _check_recipe(recipe: Recipe, where: str) -> None:
    """Cross-field checks that need no file system or network."""
    data, model, tok = recipe.data, recipe.model, recipe.tokenizer
    sources = [name for name in ("builtin", "text_files", "data_files", "dataset") if getattr(data, name)]
    if len(sources) != 1:
        raise ValueError(f"{where}: set exactly one of data.builtin, data.text_files, data.data_files, data.dataset "
                         f"(got {', '.join(sources) or 'none'})")
    if data.data_files:
        data_file_format(data.data_files, where)
    if data.validation_split and not data.dataset:
        raise ValueError(f"{where}: data.validation_split = {data.validation_split!r} names a split of data.dataset; "
                         f"with data.{sources[0]} remove it (data.validation_fraction holds documents out instead)")
    if data.builtin and data.builtin not in BUILTIN_CORPORA:
        raise ValueError(f"{where}: data.builtin = {data.builtin!r}; available: {', '.join(BUILTIN_CORPORA)}"
                         f"{did_you_mean(data.builtin, BUILTIN_CORPORA)}")
    if data.sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"{where}: data.sample_by = {data.sample_by!r}; expected line, paragraph or document")
    if data.block_size < 2:
        raise ValueError(f"{where}: data.block_size = {data.block_size}; expected an integer >= 2")
    if not data.validation_split and not (0.0 < data.validation_fraction < 1.0) and not data.streaming:
        raise ValueError(f"{where}: data.validation_fraction = {data.validation_fraction}; expected a number in (0, 1)")
    if (tok.name is None) == (tok.train_bpe is None):
        raise ValueError(f"{where}: set exactly one of tokenizer.name (Hub name or folder) and tokenizer.train_bpe")
    if tok.train_bpe is not None and tok.train_bpe.vocab_size < 260:
        raise ValueError(f"{where}: tokenizer.train_bpe.vocab_size = {tok.train_bpe.vocab_size}; a byte-level BPE "
                         "needs at least 260 (256 bytes + special tokens)")
    if not 0 <= recipe.run.seed < 2**32:  # transformers.set_seed seeds numpy, which takes 32-bit seeds only
        raise ValueError(f"{where}: run.seed = {recipe.run.seed}; expected an integer in [0, 2**32)")
    threads = recipe.run.torch_threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{where}: run.torch_threads = {threads!r}; expected a positive integer (threads per process) "
                         "or null for torch's default")
    for key in ("max_train_samples", "max_validation_samples"):
        value = getattr(data, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: data.{key} = {value!r}; expected a positive number of blocks, or null for "
                             "all of them")
    _check_model(model, where)
    sparsify_config(recipe, where=where)  # SparsifyConfig validation (ValueError naming the field)
    _check_training(recipe.training, where, defaults=recipe_strategy_defaults(recipe))
    gbs = recipe.run.global_batch_size
    if gbs is not None and "gradient_accumulation_steps" in recipe.training:
        raise ValueError(f"{where}: set either run.global_batch_size or training.gradient_accumulation_steps, not both "
                         "(the accumulation is computed from the global batch)")


def data_file_format(files: list[str], where: str = "recipe") -> str:
    """The ``datasets`` builder (``text``, ``json``, ``parquet``, ``csv``) that reads ``data.data_files``,
    from their extensions (a compression suffix such as ``.gz`` is looked through); one format for all."""
    formats = {}
    for name in files:
        stem = name.lower()
        for suffix in COMPRESSION_SUFFIXES:
            stem = stem.removesuffix(suffix)
        extension = os.path.splitext(stem)[1]
        if extension not in DATA_FILE_FORMATS:
            raise ValueError(f"{where}: data.data_files: {name!r} has no known data file extension (one of "
                             f"{', '.join(DATA_FILE_FORMATS)}, optionally compressed); rename the file or convert it")
        formats.setdefault(DATA_FILE_FORMATS[extension], name)
    if len(formats) > 1:
        shown = ", ".join(f"{fmt} ({name!r})" for fmt, name in formats.items())
        raise ValueError(f"{where}: data.data_files mixes formats: {shown}; use files of one format")
    return next(iter(formats))


def _check_model(model, where: str) -> None:
    """``model``: a preset or ``name_or_path`` (not both); a preset's resolved architecture is checked here, a
    ``name_or_path`` config when it is read (:func:`hf_chts.recipe.models.pretrained_config`)."""
    if (model.preset is None) == (model.name_or_path is None):
        raise ValueError(f"{where}: set exactly one of model.preset (a LLaMA preset: {', '.join(MODEL_PRESETS)}) and "
                         "model.name_or_path (a Hub model id or a local folder with a config.json); on the command "
                         "line, --model.preset null clears the recipe's preset")
    if model.name_or_path is not None:
        return
    if model.preset not in MODEL_PRESETS:
        raise ValueError(f"{where}: model.preset = {model.preset!r}; available: {', '.join(MODEL_PRESETS)}"
                         f"{did_you_mean(model.preset, MODEL_PRESETS)}")
    settings = model_settings(model)
    # positivity first: the divisibility checks below divide by the head counts
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings"):
        value = settings.get(key)
        if value is None and key in ("vocab_size", "max_position_embeddings"):
            continue  # vocab_size from the tokenizer, max_position_embeddings from block_size
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: model.{key} = {value!r}; expected a positive integer")
    if settings["hidden_size"] % settings["num_attention_heads"]:
        raise ValueError(f"{where}: model.hidden_size ({settings['hidden_size']}) must be divisible by "
                         f"model.num_attention_heads ({settings['num_attention_heads']})")
    if settings["num_attention_heads"] % settings["num_key_value_heads"]:
        raise ValueError(f"{where}: model.num_attention_heads ({settings['num_attention_heads']}) must be a multiple "
                         f"of model.num_key_value_heads ({settings['num_key_value_heads']})")


def check_schedule(recipe: Recipe) -> None:
    """The sparse schedule of the run must hold its topology updates: the engine's own check, run before any data
    is loaded or the output folder is claimed (``ValueError`` naming the fields). Not part of
    :func:`recipe_from_dict`, so a recipe that is only inspected or checked may be shorter than a run needs."""
    from ..schedules import SparseSchedule

    config, max_steps = sparsify_config(recipe), recipe.training.get("max_steps")
    try:
        SparseSchedule.from_config(config, max_steps)
    except ValueError as error:
        raise ValueError(f"{recipe.source or 'recipe'}: sparsify.update_interval = {config.update_interval} with "
                         f"training.max_steps = {max_steps}: {error}") from error


_TRAINING_FINITE = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                    "warmup_ratio", "label_smoothing_factor")

_TRAINING_POSITIVE = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                      "gradient_accumulation_steps")
_TRAINING_NON_NEGATIVE = ("eval_steps", "save_steps", "logging_steps", "warmup_steps", "save_total_limit",
                          "dataloader_num_workers")


def recipe_strategy_defaults(recipe: Recipe) -> dict:
    """The save / evaluation strategies a recipe implies when its training section leaves them unset
    (what :func:`~hf_chts.recipe.trainer.training_arguments` sets): steps when ``save_steps`` /
    ``eval_steps`` are given (evaluation only with ``eval.perplexity``), else no saving."""
    training = recipe.training
    defaults = {"save_strategy": "steps" if "save_steps" in training else "no"}
    if recipe.eval.perplexity and "eval_steps" in training:
        defaults["eval_strategy"] = "steps"
    return {key: value for key, value in defaults.items() if key not in training}


def _check_training(training: dict, where: str, defaults: dict | None = None) -> None:
    """The training section's values (already typed): positive step counts, then ``TrainingArguments`` itself
    (with the recipe's ``defaults`` for unset fields, as the run will build it).

    Every problem is a ``ValueError`` naming ``training.<key>``.
    """
    if training.get("max_steps") is None:
        raise ValueError(f"{where}: training.max_steps must be set to a positive number of optimizer steps "
                         "(the sparse schedule is sized from it)")
    for key in _TRAINING_POSITIVE:
        if key in training and training[key] <= 0:
            what = " number of optimizer steps (the sparse schedule is sized from it)" if key == "max_steps" else ""
            raise ValueError(f"{where}: training.{key} = {training[key]!r}; expected a positive integer{what}")
    for key in _TRAINING_NON_NEGATIVE:
        if training.get(key) is not None and training[key] < 0:
            raise ValueError(f"{where}: training.{key} = {training[key]!r}; expected a number >= 0")
    for key in _TRAINING_FINITE:  # TrainingArguments accepts nan / inf; the optimizer fails only at the first step
        value = training.get(key)
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}: training.{key} = {value!r}; expected a finite number >= 0")
    _construct_training_arguments({**(defaults or {}), **training}, where)


def _construct_training_arguments(training: dict, where: str) -> None:
    """Build ``TrainingArguments(**training)`` once to let transformers check every value.

    Side-effect free: the device set-up (which would create accelerate's
    ``PartialState`` and, under ``accelerate launch``, a process group) is
    skipped, nothing is written, and environment variables set by
    ``__post_init__`` are restored.
    """
    import tempfile

    from transformers import TrainingArguments

    class _CheckedArguments(TrainingArguments):
        @property
        def device(self):  # no PartialState / process group while validating
            return None

    values = dict(training)
    if values.get("bf16") == "auto":
        values["bf16"] = False  # resolved per machine by training_arguments()
    if values.get("optim") == SPARSE_ADAMW_OPTIM:
        del values["optim"]  # hf_chts.SparseAdamW, passed to the Trainer by build_trainer()
        if values.get("fsdp"):
            raise ValueError(f"{where}: training.optim = {SPARSE_ADAMW_OPTIM} does not support FSDP2 (training.fsdp); "
                             "remove one of them")
    environ = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="hf_chts_check_") as tmp:
            _CheckedArguments(output_dir=tmp, use_cpu=True, **values)
    except (TypeError, ValueError) as error:
        message = str(error)
        named = [key for key in values if key in message] or \
            [key for key, value in values.items() if isinstance(value, str) and len(value) > 1 and value in message]
        key = max(named, key=len) if named else None  # the field the message names (or whose value it quotes)
        label = f"training.{key}" if key else "section 'training'"
        raise ValueError(f"{where}: {label}: {message}") from error
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
