"""The recipe schema: section dataclasses, validation, command-line overrides, input and output paths."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import json
import os
import re
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import SparsifyConfig
from ..io_utils import looks_like_local_path
from .presets import MODEL_PRESETS, model_settings

SUMMARY_FILE = "run_summary.json"
RECIPE_COPY = "recipe.yaml"  # the resolved recipe (with overrides), written before training: the run marker
BUILTIN_CORPORA = ("pydoc_topics",)


# =========================================================================== schema
@dataclass
class RunSection:
    """Where the run goes and how it is identified."""

    output_dir: str = "runs/run"
    seed: int = 0
    overwrite: bool = False
    resume: bool = False
    global_batch_size: int | None = None  # sets gradient_accumulation_steps = global / (per-device batch × processes)
    log_per_layer_density: bool = False
    torch_threads: int | None = None  # torch.set_num_threads per process (tiny CPU models: 1 avoids OpenMP overhead)


@dataclass
class DataSection:
    """Text source (exactly one of builtin / text_files / dataset), split and packing."""

    builtin: str | None = None
    text_files: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    streaming: bool = False
    text_column: str = "text"
    sample_by: str = "paragraph"  # builtin / text_files: one document per line | paragraph | document
    train_split: str = "train"
    validation_split: str | None = None
    validation_fraction: float = 0.05
    validation_documents: int = 2000  # streaming without validation_split: first N documents held out
    block_size: int = 256
    max_train_samples: int | None = None
    max_validation_samples: int | None = 512
    num_proc: int | None = None


@dataclass
class BPESection:
    vocab_size: int = 1024
    min_frequency: int = 2
    max_documents: int | None = 100_000  # training documents read for the BPE (the whole corpus when in memory and None)


@dataclass
class TokenizerSection:
    name: str | None = None
    train_bpe: BPESection | None = None
    cache_dir: str | None = None  # BPE cache (default: $HF_CHTS_CACHE or ~/.cache/hf_chts)/tokenizers


@dataclass
class ModelSection:
    preset: str = "llama-tiny"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False


@dataclass
class EvalSection:
    perplexity: bool = True
    check_reload: bool = True
    tasks: list[str] = field(default_factory=list)
    local_task_from_heldout: bool = False
    local_task_documents: int = 64
    limit: int | float | None = None
    batch_size: int = 8


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    model: ModelSection = field(default_factory=ModelSection)
    sparsify: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    eval: EvalSection = field(default_factory=EvalSection)
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


SECTIONS: dict[str, type | None] = {
    "run": RunSection, "data": DataSection, "tokenizer": TokenizerSection, "model": ModelSection,
    "sparsify": None, "training": None, "eval": EvalSection,
}
# training keys the recipe sets elsewhere
_TRAINING_RESERVED = {"output_dir": "run.output_dir", "seed": "run.seed", "data_seed": "run.seed",
                      "overwrite_output_dir": "run.overwrite / --overwrite",
                      "resume_from_checkpoint": "run.resume"}


# =========================================================================== parsing
def _did_you_mean(key: str, allowed) -> str:
    match = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _unknown_key(key: str, section: str, allowed, where: str) -> ValueError:
    allowed = sorted(allowed)
    shown = ", ".join(allowed) if len(allowed) <= 20 else ", ".join(allowed[:20]) + ", ..."
    label = "top level" if not section else f"section '{section}'"
    return ValueError(f"{where}: unknown key {key!r} in {label}{_did_you_mean(key, allowed)}; allowed keys: {shown}")


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _fix_floats(value):
    """YAML 1.1 reads ``3e-3`` (no dot) as a string; read it as a float."""
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _fix_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_floats(v) for v in value]
    return value


def _training_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _section_keys(section: str) -> set[str]:
    cls = SECTIONS[section]
    if section == "sparsify":
        return {f.name for f in dataclasses.fields(SparsifyConfig) if not f.name.startswith("_")}
    if section == "training":
        return _training_fields() - set(_TRAINING_RESERVED)
    return {f.name for f in dataclasses.fields(cls)}


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
            raise _unknown_key(key, section, allowed, where)
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
    raw = _fix_floats(raw)
    for section in raw:
        if section not in SECTIONS:
            raise _unknown_key(section, "", SECTIONS, where)
    kwargs = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if cls is not None:
            kwargs[section] = _build_section(cls, values, section, where)
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{where}: section '{section}' must be a mapping of key: value, got {values!r}")
        allowed = _section_keys(section)
        for key in values:
            if section == "training" and key in _TRAINING_RESERVED:
                raise ValueError(f"{where}: training.{key} is set by the recipe's {_TRAINING_RESERVED[key]}; "
                                 f"remove it from the training section")
            if key not in allowed:
                raise _unknown_key(key, section, allowed, where)
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
                         f"{_did_you_mean(data.builtin, BUILTIN_CORPORA)}")
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
                         f"{_did_you_mean(model.preset, MODEL_PRESETS)}")
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


# integer fields of the training section the recipe itself computes with (batch arithmetic, schedule length)
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


def parse_overrides(tokens: list[str] | None) -> list[tuple[str, Any]]:
    """``["--training.max_steps", "50", "--model.hidden_size=32"]`` -> ``[("training.max_steps", 50), ...]``.

    Values are read with ``yaml.safe_load`` (so ``null``, ``true``, ``[a, b]``,
    ``{vocab_size: 512}`` work); a key with no value means ``true``.
    """
    tokens = list(tokens or [])
    pairs: list[tuple[str, Any]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) <= 2:
            raise ValueError(f"override {token!r}: expected --section.key value (e.g. --training.max_steps 50)")
        key, sep, text = token[2:].partition("=")
        if not sep:
            if index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
                text = tokens[index + 1]
                index += 1
            else:
                text = "true"
        index += 1
        value = _fix_floats(yaml.safe_load(text)) if text != "" else ""
        pairs.append((key, value))
    return pairs


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]], where: str = "override") -> dict:
    """Set dotted keys in a raw recipe mapping; unknown sections/keys -> did-you-mean ValueError."""
    raw = copy.deepcopy(raw or {})
    for key, value in overrides:
        parts = key.split(".")
        label = f"{where} --{key}"
        if len(parts) < 2:
            raise ValueError(f"{label}: expected --section.key (sections: {', '.join(SECTIONS)})"
                             f"{_did_you_mean(parts[0], SECTIONS)}")
        section = parts[0]
        if section not in SECTIONS:
            raise _unknown_key(section, "", SECTIONS, label)
        allowed = _section_keys(section)
        if section == "training" and parts[1] in _TRAINING_RESERVED:
            raise ValueError(f"{label}: training.{parts[1]} is set by {_TRAINING_RESERVED[parts[1]]}")
        if parts[1] not in allowed:
            raise _unknown_key(parts[1], section, allowed, label)
        if len(parts) > 2:
            if (section, parts[1]) == ("tokenizer", "train_bpe") and len(parts) == 3:
                sub_allowed = {f.name for f in dataclasses.fields(BPESection)}
                if parts[2] not in sub_allowed:
                    raise _unknown_key(parts[2], "tokenizer.train_bpe", sub_allowed, label)
            elif section != "training":  # e.g. --training.lr_scheduler_kwargs.min_lr_rate 0.1
                raise ValueError(f"{label}: {section}.{parts[1]} has no sub-keys")
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        node = raw[section]
        for part in parts[1:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | list[tuple[str, Any]] | None = None, *,
                overwrite: bool = False) -> Recipe:
    """Read, override and validate a recipe; check that every input path exists.

    Raises ``FileNotFoundError`` (recipe, text files, local dataset path) or
    ``ValueError`` (unknown key with a did-you-mean hint, bad value) — nothing
    is downloaded, trained or written here.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        folder = path.parent if str(path.parent) else Path(".")
        if folder.is_dir():
            names = [p.name for p in folder.glob("*.yaml")]
            hint = _did_you_mean(path.name, names) or (f" (recipes there: {', '.join(sorted(names))})" if names else "")
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist{hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    recipe_from_dict(raw, where=str(path), check=not overrides)  # the file's own unknown keys / types first
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)
    raw = apply_overrides(raw, overrides or [])
    recipe = recipe_from_dict(raw, where=f"{path} (with overrides)" if overrides else str(path))
    recipe.source = str(path)
    if overwrite:
        recipe.run.overwrite = True
    check_input_paths(recipe)
    return recipe


def sparsify_config(recipe: Recipe, where: str = "recipe") -> SparsifyConfig:
    """``SparsifyConfig(**recipe.sparsify)`` with the run seed as default seed."""
    values = dict(recipe.sparsify)
    values.setdefault("seed", recipe.run.seed)
    try:
        return SparsifyConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{where}: section 'sparsify': {error}") from error


# =========================================================================== inputs and output folder
def resolve_text_files(patterns: list[str]) -> list[str]:
    """Expand globs; every entry must match at least one existing file."""
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else ([expanded] if os.path.isfile(expanded) else [])
        if not matches:
            kind = "pattern matches no file" if glob.has_magic(expanded) else "file does not exist"
            raise FileNotFoundError(f"data.text_files: {pattern!r}: {kind} (relative paths resolve against "
                                    f"the working directory {os.getcwd()})")
        files.extend(os.path.abspath(m) for m in matches)
    return files


def check_input_paths(recipe: Recipe) -> None:
    data = recipe.data
    if data.text_files:
        data.text_files = resolve_text_files(data.text_files)
    if data.dataset and looks_like_local_path(data.dataset) and not os.path.exists(os.path.expanduser(data.dataset)):
        raise FileNotFoundError(f"data.dataset: local path {data.dataset!r} does not exist (a Hub dataset is named "
                                "'org/name', e.g. Skylion007/openwebtext)")
    name = recipe.tokenizer.name
    if name and looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"tokenizer.name: local path {name!r} does not exist")


def _comparable(recipe_dict: dict) -> dict:
    data = copy.deepcopy(recipe_dict)
    for key in ("overwrite", "resume"):
        data.get("run", {}).pop(key, None)
    return data


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_diff_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def check_output_dir(recipe: Recipe) -> str:
    """Decide what to do with ``run.output_dir``: ``"new"``, ``"resume"`` or ``"overwrite"``.

    Raises ``FileExistsError`` when the folder holds a different (or finished)
    run and neither ``--overwrite`` nor ``run.resume`` was given, or when it is
    a non-empty folder that is not an hf_chts run (never deleted).
    """
    out = recipe.output_dir
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise FileExistsError(f"run.output_dir {str(out)!r} exists and is not a folder")
    marker, summary = out / RECIPE_COPY, out / SUMMARY_FILE
    if not marker.exists() and not summary.exists():
        if any(out.iterdir()):
            raise FileExistsError(f"run.output_dir {str(out)!r} is a non-empty folder that holds no hf_chts run "
                                  f"({RECIPE_COPY} / {SUMMARY_FILE} missing); choose a new or empty folder")
        return "new"
    try:
        old = yaml.safe_load(marker.read_text(encoding="utf-8")) if marker.exists() else \
            json.loads(summary.read_text(encoding="utf-8")).get("recipe", {})
    except (yaml.YAMLError, json.JSONDecodeError, OSError):
        old = {}
    differences = _diff_keys(_comparable(old or {}), _comparable(recipe.to_dict()))
    finished = summary.exists()
    if recipe.run.overwrite:
        return "overwrite"
    if recipe.run.resume:
        if differences:
            print(f"hf_chts: resuming in {out} with a changed recipe: {'; '.join(differences[:8])}", file=sys.stderr)
        return "resume"
    if differences:
        raise FileExistsError(
            f"run.output_dir {str(out)!r} already holds a different run (recipe differs: {'; '.join(differences[:5])}"
            f"{' ...' if len(differences) > 5 else ''}); pass --overwrite to replace it, set run.resume: true to "
            "continue it, or choose another run.output_dir")
    if finished:
        raise FileExistsError(f"run.output_dir {str(out)!r} already holds a finished run of this recipe "
                              f"({SUMMARY_FILE}); pass --overwrite to train it again or choose another run.output_dir")
    return "new"  # same recipe, unfinished: start again from scratch (run.resume: true continues instead)


def prepare_output_dir(recipe: Recipe, mode: str) -> None:
    """Main process only: clear the folder when overwriting (it holds an hf_chts run) and write the recipe copy."""
    out = recipe.output_dir
    if mode == "overwrite" and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    from ..io_utils import atomic_write_text

    atomic_write_text(out / RECIPE_COPY, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
