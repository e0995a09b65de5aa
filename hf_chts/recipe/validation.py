"""Validating a recipe mapping: keys, types and the cross-field rules (nothing touches files or the network)."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Any

from ..suggest import did_you_mean
from .presets import MODEL_PRESETS, model_settings
from .schema import (
    BUILTIN_CORPORA, SECTIONS, TRAINING_RESERVED, Recipe, section_keys, sparsify_config, unknown_key_error,
)

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def fix_yaml_floats(value):
    """YAML 1.1 reads ``3e-3`` (no dot) as a string; read it as a float."""
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: fix_yaml_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fix_yaml_floats(v) for v in value]
    return value


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    return True


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(cls, values: dict, section: str, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: section '{section}' must be a mapping of key: value, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise unknown_key_error(key, section, allowed, where)
        annotation = hints[key]
        if not _type_ok(value, annotation):
            raise ValueError(f"{where}: {section}.{key} = {value!r} has the wrong type; expected {_type_name(annotation)}")
        nested = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and nested:
            value = _build_section(nested[0], value, f"{section}.{key}", where)
        if isinstance(value, int) and not isinstance(value, bool) and set(typing.get_args(annotation) or
                                                                           (annotation,)) <= {float, type(None)}:
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def recipe_from_dict(raw: dict, where: str = "recipe", *, check: bool = True) -> Recipe:
    """Validate a recipe mapping (unknown keys -> ValueError with a did-you-mean hint).

    ``check=False`` validates keys and types only (not the cross-field rules), e.g. for a
    file whose missing pieces come from command-line overrides.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    raw = fix_yaml_floats(raw)
    for section in raw:
        if section not in SECTIONS:
            raise unknown_key_error(section, "", SECTIONS, where)
    kwargs = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if cls is not None:
            kwargs[section] = _build_section(cls, values, section, where)
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{where}: section '{section}' must be a mapping of key: value, got {values!r}")
        allowed = section_keys(section)
        for key in values:
            if section == "training" and key in TRAINING_RESERVED:
                raise ValueError(f"{where}: training.{key} is set by the recipe's {TRAINING_RESERVED[key]}; "
                                 f"remove it from the training section")
            if key not in allowed:
                raise unknown_key_error(key, section, allowed, where)
        kwargs[section] = dict(values)
    recipe = Recipe(**kwargs)
    if check:
        _check_recipe(recipe, where)
    return recipe


def _check_recipe(recipe: Recipe, where: str) -> None:
    """Cross-field checks that need no file system or network."""
    data, model, tok = recipe.data, recipe.model, recipe.tokenizer
    sources = [name for name in ("builtin", "text_files", "dataset") if getattr(data, name)]
    if len(sources) != 1:
        raise ValueError(f"{where}: set exactly one of data.builtin, data.text_files, data.dataset (got "
                         f"{', '.join(sources) or 'none'})")
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
    sparsify_config(recipe, where=where)  # SparsifyConfig validation (ValueError naming the field)
    _check_training(recipe.training, where)
    gbs = recipe.run.global_batch_size
    if gbs is not None and "gradient_accumulation_steps" in recipe.training:
        raise ValueError(f"{where}: set either run.global_batch_size or training.gradient_accumulation_steps, not both "
                         "(the accumulation is computed from the global batch)")


_TRAINING_POSITIVE_INTS = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                           "gradient_accumulation_steps")


_TRAINING_INTS = ("eval_steps", "save_steps", "logging_steps", "warmup_steps", "save_total_limit",
                  "dataloader_num_workers")


def _check_training(training: dict, where: str) -> None:
    """The training section: explicit checks of the integer fields, then ``TrainingArguments`` itself.

    Every problem is a ``ValueError`` naming ``training.<key>``.
    """
    if "max_steps" not in training:
        raise ValueError(f"{where}: training.max_steps must be set to a positive number of optimizer steps "
                         "(the sparse schedule is sized from it)")
    for key in _TRAINING_POSITIVE_INTS + _TRAINING_INTS:
        if key not in training:
            continue
        value = training[key]
        if key in _TRAINING_INTS and (value is None or isinstance(value, float)):
            continue  # TrainingArguments accepts None / a float ratio for these (checked below)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where}: training.{key} = {value!r} has the wrong type; expected an integer")
        if key in _TRAINING_POSITIVE_INTS and value <= 0:
            what = " number of optimizer steps (the sparse schedule is sized from it)" if key == "max_steps" else ""
            raise ValueError(f"{where}: training.{key} = {value!r}; expected a positive integer{what}")
        if key in _TRAINING_INTS and value < 0:
            raise ValueError(f"{where}: training.{key} = {value!r}; expected an integer >= 0")
    _construct_training_arguments(training, where)


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
