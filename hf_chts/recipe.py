"""Training recipes: a YAML file -> data, tokenizer, model, sparse Trainer run, summary.

Used by ``hf-chts train <recipe.yaml>`` and by ``recipes/pretrain.py`` (which
calls the same functions one by one, so both do the same thing). A recipe has
seven sections, every field documented in ``recipes/README.md``::

    run:       output_dir, seed, overwrite, resume, global_batch_size, ...
    data:      builtin | text_files | dataset (+ dataset_config, streaming), block_size, split
    tokenizer: name (Hub name / folder) | train_bpe: {vocab_size}
    model:     preset (llama-tiny, llama-60m, llama-130m, llama-1b) + explicit overrides
    sparsify:  SparsifyConfig fields (method, target_density, update_interval, ...)
    training:  transformers.TrainingArguments fields (max_steps, learning_rate, ...)
    eval:      perplexity, lm-eval tasks, local_task_from_heldout, limit

Every input problem (missing file, unknown key, output folder holding another
run) is raised as ``FileNotFoundError`` / ``ValueError`` / ``FileExistsError``
before anything is trained or written.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import SparsifyConfig

SUMMARY_FILE = "run_summary.json"
RECIPE_COPY = "recipe.yaml"  # the resolved recipe (with overrides), written before training: the run marker
FINAL_DIR = "final"
PLOT_FILE = "training_curves.png"
BUILTIN_CORPORA = ("pydoc_topics",)
BPE_CACHE_VERSION = 1

# --------------------------------------------------------------------------- model presets
# ALGORITHMS.md §8 (the GaLore / CHTs LLaMA family; LLaMA vocabulary 32000, untied embeddings).
# "llama-tiny" is a CPU toy whose vocabulary comes from the tokenizer.
MODEL_PRESETS: dict[str, dict[str, int | None]] = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=None),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, vocab_size=32000),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32, vocab_size=32000),
}
# Counting convention (see recipes/README.md): every parameter of LlamaForCausalLM with
# untied input and output embeddings (the LLaMA default), i.e. embeddings included.
# llama-60m -> 58.1M, llama-130m -> 134.1M, llama-1b -> 1.339B (the paper's "1B" follows
# GaLore's naming of this 1.34B configuration; no common convention puts it within 10% of 1B).


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
    if settings["hidden_size"] % settings["num_attention_heads"]:
        raise ValueError(f"{where}: model.hidden_size ({settings['hidden_size']}) must be divisible by "
                         f"model.num_attention_heads ({settings['num_attention_heads']})")
    if settings["num_attention_heads"] % settings["num_key_value_heads"]:
        raise ValueError(f"{where}: model.num_attention_heads ({settings['num_attention_heads']}) must be a multiple "
                         f"of model.num_key_value_heads ({settings['num_key_value_heads']})")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if settings[key] < 1:
            raise ValueError(f"{where}: model.{key} = {settings[key]}; expected a positive integer")
    sparsify_config(recipe, where=where)  # SparsifyConfig validation (ValueError naming the field)
    if "max_steps" not in recipe.training or int(recipe.training["max_steps"]) <= 0:
        raise ValueError(f"{where}: training.max_steps must be set to a positive number of optimizer steps "
                         "(the sparse schedule is sized from it)")
    gbs = recipe.run.global_batch_size
    if gbs is not None and "gradient_accumulation_steps" in recipe.training:
        raise ValueError(f"{where}: set either run.global_batch_size or training.gradient_accumulation_steps, not both "
                         "(the accumulation is computed from the global batch)")


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


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1


def check_input_paths(recipe: Recipe) -> None:
    data = recipe.data
    if data.text_files:
        data.text_files = resolve_text_files(data.text_files)
    if data.dataset and _looks_local(data.dataset) and not os.path.exists(os.path.expanduser(data.dataset)):
        raise FileNotFoundError(f"data.dataset: local path {data.dataset!r} does not exist (a Hub dataset is named "
                                "'org/name', e.g. Skylion007/openwebtext)")
    name = recipe.tokenizer.name
    if name and _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
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
    from .io_utils import atomic_write_text

    atomic_write_text(out / RECIPE_COPY, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


# =========================================================================== text corpus
@dataclass
class Corpus:
    """Raw documents (one column ``text``) split into train and validation."""

    train: Any  # datasets.Dataset or datasets.IterableDataset
    validation: Any  # datasets.Dataset
    streaming: bool


def builtin_documents(name: str, sample_by: str = "paragraph") -> list[str]:
    """Documents of a corpus shipped with Python (``pydoc_topics``: ``pydoc_data.topics``, ~465k chars)."""
    if name != "pydoc_topics":
        raise ValueError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    return _split_documents(texts, sample_by)


def _split_documents(texts: list[str], sample_by: str) -> list[str]:
    if sample_by == "document":
        docs = texts
    elif sample_by == "line":
        docs = [line for text in texts for line in text.splitlines()]
    else:
        docs = [part for text in texts for part in re.split(r"\n\s*\n", text)]
    return [doc.strip("\n") for doc in docs if doc.strip()]


def load_corpus(recipe: Recipe) -> Corpus:
    """Load the documents and split them into train / validation (deterministically, by ``run.seed``)."""
    import datasets

    data, seed = recipe.data, recipe.run.seed
    column = data.text_column
    if data.builtin:
        full = datasets.Dataset.from_dict({"text": builtin_documents(data.builtin, data.sample_by)})
        column = "text"
    elif data.text_files:
        if data.streaming:
            full = datasets.load_dataset("text", data_files={"train": data.text_files}, split="train",
                                         sample_by=data.sample_by, streaming=True)
        else:
            full = datasets.Dataset.from_dict({"text": _split_documents(
                [Path(f).read_text(encoding="utf-8", errors="replace") for f in data.text_files], data.sample_by)})
        column = "text"
    else:
        kwargs = dict(path=data.dataset, name=data.dataset_config, split=data.train_split, streaming=data.streaming)
        try:
            full = datasets.load_dataset(**kwargs)
        except Exception as error:  # offline / missing dataset: say which and how to fix
            raise FileNotFoundError(
                f"data.dataset: could not load {data.dataset!r} (config {data.dataset_config!r}, split "
                f"{data.train_split!r}, streaming={data.streaming}): {type(error).__name__}: {error}. Hub datasets need "
                "network access (unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) or a local cache") from error
    names = list(full.column_names or []) if getattr(full, "column_names", None) else None
    if names is not None and column not in names:
        raise ValueError(f"data.text_column = {column!r} is not a column of {data.dataset or data.text_files}; "
                         f"columns: {', '.join(names)}{_did_you_mean(column, names)}")
    if column != "text":
        full = full.rename_column(column, "text")
    if names is not None and len(names) > 1:
        full = full.remove_columns([n for n in names if n != column])
    full = full.filter(lambda example: bool(example["text"] and example["text"].strip()))

    if data.validation_split:
        validation = datasets.load_dataset(path=data.dataset, name=data.dataset_config, split=data.validation_split,
                                           streaming=data.streaming)
        if column != "text":
            validation = validation.rename_column(column, "text")
        if data.streaming:
            validation = datasets.Dataset.from_dict(
                {"text": [row["text"] for row in itertools.islice(validation, data.validation_documents)]})
        return Corpus(full, validation.select_columns(["text"]), data.streaming)
    if data.streaming:
        held = [row["text"] for row in itertools.islice(full, data.validation_documents)]
        if not held:
            raise ValueError("the training stream is empty; nothing to hold out for validation")
        return Corpus(full.skip(data.validation_documents), datasets.Dataset.from_dict({"text": held}), True)
    if len(full) < 2:
        raise ValueError(f"the corpus has {len(full)} document(s); need at least 2 to hold some out for validation")
    split = full.train_test_split(test_size=data.validation_fraction, seed=seed, shuffle=True)
    return Corpus(split["train"], split["test"], False)


# =========================================================================== tokenizer
def _cache_root(recipe: Recipe) -> Path:
    if recipe.tokenizer.cache_dir:
        return Path(recipe.tokenizer.cache_dir).expanduser()
    return Path(os.environ.get("HF_CHTS_CACHE", Path.home() / ".cache" / "hf_chts")).expanduser() / "tokenizers"


def _bpe_training_texts(recipe: Recipe, corpus: Corpus):
    limit = recipe.tokenizer.train_bpe.max_documents
    if corpus.streaming:
        return lambda: (row["text"] for row in itertools.islice(corpus.train, limit or 100_000))
    texts = corpus.train["text"]
    count = len(texts) if limit is None else min(limit, len(texts))
    return lambda: itertools.islice(iter(texts), count)


BPE_TRAININGS = 0  # how many BPE tokenizers this process trained (tests check the cache with it)


def train_bpe_tokenizer(texts_factory, vocab_size: int, min_frequency: int, cache_root: Path):
    """A byte-level BPE trained on the texts, cached under ``cache_root/bpe-<hash>`` (hash of corpus + settings).

    ``texts_factory()`` must return a fresh iterator over the same texts each call.
    A second call with the same corpus and settings loads the cached files.
    """
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(f"bpe-v{BPE_CACHE_VERSION}|{vocab_size}|{min_frequency}|".encode())
    for text in texts_factory():
        digest.update(text.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    folder = cache_root / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder)), folder, True

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    global BPE_TRAININGS
    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts_factory(), trainer=trainer)
    BPE_TRAININGS += 1
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special,
                                      unk_token=special, pad_token=special, model_max_length=1_000_000_000)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    wrapped.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return wrapped, folder, False


def build_tokenizer(recipe: Recipe, corpus: Corpus | None = None):
    """The tokenizer: ``tokenizer.name`` (Hub / folder) or a byte-level BPE trained on the training text."""
    tok = recipe.tokenizer
    if tok.name:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tok.name)
        except Exception as error:
            raise FileNotFoundError(f"tokenizer.name: could not load {tok.name!r}: {type(error).__name__}: {error}. "
                                    "Hub tokenizers need network access or a local cache") from error
    else:
        if corpus is None:
            raise ValueError("tokenizer.train_bpe needs the corpus: build_tokenizer(recipe, corpus)")
        tokenizer, folder, cached = train_bpe_tokenizer(
            _bpe_training_texts(recipe, corpus), tok.train_bpe.vocab_size, tok.train_bpe.min_frequency,
            _cache_root(recipe))
        print(f"hf_chts: BPE tokenizer ({len(tokenizer)} tokens) {'loaded from cache' if cached else 'trained and cached'}"
              f" at {folder}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# =========================================================================== tokenised, packed blocks
def pack_blocks(token_lists, block_size: int):
    """Concatenate token lists and cut them into ``[n, block_size]`` blocks (only the final tail is dropped)."""
    import numpy as np

    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64)
    count = len(flat) // block_size
    return flat[: count * block_size].reshape(count, block_size)


@dataclass
class LMData:
    """Packed training and validation blocks (``input_ids``; labels = input_ids in the collator)."""

    train: Any
    validation: Any
    validation_texts: list[str]
    stats: dict[str, int]


def _tokenize_function(tokenizer):
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    return tokenize


class PackedStream(torch.utils.data.IterableDataset):
    """Packed blocks over a streaming (tokenised) HF dataset, the tail carried over between documents."""

    def __init__(self, tokenized, block_size: int, max_blocks: int | None = None):
        self.tokenized, self.block_size, self.max_blocks = tokenized, block_size, max_blocks

    def __iter__(self):
        buffer: list[int] = []
        produced = 0
        for row in self.tokenized:
            buffer.extend(row["input_ids"])
            while len(buffer) >= self.block_size:
                block, buffer = buffer[: self.block_size], buffer[self.block_size:]
                yield {"input_ids": torch.tensor(block, dtype=torch.long)}
                produced += 1
                if self.max_blocks is not None and produced >= self.max_blocks:
                    return


def _packed_dataset(tokenized, block_size: int, max_blocks: int | None, label: str):
    import datasets

    blocks = pack_blocks(tokenized["input_ids"], block_size)
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if len(blocks) == 0:
        raise ValueError(f"the {label} split has {tokens} tokens: fewer than one block of data.block_size = "
                         f"{block_size}; lower block_size or add text")
    return datasets.Dataset.from_dict({"input_ids": blocks}), tokens


def build_lm_datasets(recipe: Recipe, tokenizer, corpus: Corpus) -> LMData:
    """Tokenise (with an EOS after every document) and pack into blocks of ``data.block_size``."""
    data = recipe.data
    tokenize = _tokenize_function(tokenizer)
    validation_tok = corpus.validation.map(tokenize, batched=True, remove_columns=corpus.validation.column_names,
                                           desc="Tokenizing validation", num_proc=data.num_proc)
    validation, val_tokens = _packed_dataset(validation_tok, data.block_size, data.max_validation_samples, "validation")
    texts = list(corpus.validation["text"])
    stats = {"validation_tokens": val_tokens, "validation_blocks": len(validation), "block_size": data.block_size}
    if corpus.streaming:
        train_tok = corpus.train.map(tokenize, batched=True, remove_columns=["text"])
        train = PackedStream(train_tok, data.block_size, data.max_train_samples)
        stats.update(train_tokens=-1, train_blocks=-1)
    else:
        train_tok = corpus.train.map(tokenize, batched=True, remove_columns=corpus.train.column_names,
                                     desc="Tokenizing train", num_proc=data.num_proc)
        train, train_tokens = _packed_dataset(train_tok, data.block_size, data.max_train_samples, "train")
        stats.update(train_tokens=train_tokens, train_blocks=len(train))
    return LMData(train, validation, texts, stats)


def collate_blocks(examples: list[dict]) -> dict:
    """Stack equal-length blocks; ``labels = input_ids`` (the model shifts them)."""
    input_ids = torch.stack([torch.as_tensor(example["input_ids"], dtype=torch.long) for example in examples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


# =========================================================================== model
def model_settings(model: ModelSection) -> dict[str, Any]:
    """The preset's architecture with the recipe's explicit overrides applied."""
    settings = dict(MODEL_PRESETS[model.preset])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "num_key_value_heads", "max_position_embeddings"):
        value = getattr(model, key)
        if value is not None:
            settings[key] = value
    settings.setdefault("num_key_value_heads", None)
    if settings["num_key_value_heads"] is None:
        settings["num_key_value_heads"] = settings["num_attention_heads"]
    settings["tie_word_embeddings"] = model.tie_word_embeddings
    return settings


def model_config(recipe: Recipe, vocab_size: int | None = None, tokenizer=None):
    """A ``LlamaConfig`` for the recipe's model; vocab defaults to the tokenizer's size."""
    from transformers import LlamaConfig

    settings = model_settings(recipe.model)
    tokenizer_size = len(tokenizer) if tokenizer is not None else None
    if settings["vocab_size"] is None:
        settings["vocab_size"] = vocab_size or tokenizer_size
    if settings["vocab_size"] is None:
        raise ValueError("model.vocab_size is unset and no tokenizer was given to take it from")
    if tokenizer_size is not None and settings["vocab_size"] < tokenizer_size:
        raise ValueError(f"model.vocab_size = {settings['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer_size} tokens; raise it or leave it unset (= the tokenizer's)")
    if settings.get("max_position_embeddings") is None:
        settings["max_position_embeddings"] = recipe.data.block_size
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(**settings, **special)


def parameter_count(preset: str, vocab_size: int | None = None, **overrides) -> dict[str, int]:
    """Parameters of a preset, computed from the architecture (no model is built).

    Returns ``total`` (every parameter, untied input/output embeddings unless
    ``tie_word_embeddings``), ``embedding`` (input + output embedding matrices),
    ``non_embedding`` and ``sparsifiable`` (the decoder linears CHTs sparsifies).
    """
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(MODEL_PRESETS)}")
    s = model_settings(ModelSection(preset=preset, vocab_size=vocab_size, **overrides))
    vocab = s["vocab_size"]
    if vocab is None:
        raise ValueError(f"preset {preset!r} takes its vocabulary from the tokenizer: pass vocab_size")
    h, f, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    head_dim = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    attention = h * h * 2 + h * kv * 2  # q, o + k, v (no biases)
    mlp = 3 * h * f  # gate, up, down
    norms = 2 * h
    sparsifiable = layers * (attention + mlp)
    embedding = vocab * h * (1 if s["tie_word_embeddings"] else 2)
    non_embedding = sparsifiable + layers * norms + h  # + final norm
    return {"total": non_embedding + embedding, "embedding": embedding, "non_embedding": non_embedding,
            "sparsifiable": sparsifiable}


def configure_torch(recipe: Recipe) -> None:
    """Per-process torch settings of the recipe (``run.torch_threads``)."""
    if recipe.run.torch_threads:
        torch.set_num_threads(recipe.run.torch_threads)


def build_model(recipe: Recipe, tokenizer):
    """A randomly initialised ``LlamaForCausalLM`` (seeded by ``run.seed``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.set_seed(recipe.run.seed)
    return AutoModelForCausalLM.from_config(model_config(recipe, tokenizer=tokenizer))


# =========================================================================== trainer
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
    world_size = world_size or _world_size()
    cuda = torch.cuda.is_available()
    values.setdefault("use_cpu", not cuda)
    values.setdefault("report_to", "none")
    values.setdefault("save_strategy", "steps" if "save_steps" in values else "no")
    if values.get("bf16") == "auto":
        values["bf16"] = bool(cuda and torch.cuda.is_bf16_supported())
    if recipe.eval.perplexity and "eval_steps" in values:
        values.setdefault("eval_strategy", "steps")
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
    """A ``transformers.Trainer`` on the packed blocks with the sparse-training callback."""
    from transformers import Trainer

    args = args if args is not None else training_arguments(recipe)
    return Trainer(model=model, args=args, train_dataset=data.train,
                   eval_dataset=data.validation if recipe.eval.perplexity else None,
                   data_collator=collate_blocks, processing_class=tokenizer, callbacks=[callback])


def make_callback(recipe: Recipe, config: SparsifyConfig):
    from .callback import CHTssTrainerCallback

    return CHTssTrainerCallback(config, log_per_layer=recipe.run.log_per_layer_density)


# =========================================================================== evaluation and summary
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


def _safe_exp(value: float | None) -> float | None:
    if value is None:
        return None
    return math.exp(value) if value < 700 else math.inf


def sparsity_history(callback) -> list[dict[str, Any]]:
    engine = getattr(callback, "engine", None)
    history = getattr(engine, "history", None) or []
    keep = ("step", "target_density", "density", "anp", "overlap", "removed", "regrown", "removal_fraction")
    return [{key: getattr(stats, key) for key in keep} for stats in history]


def loss_curves(log_history: list[dict]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "loss": e["loss"], **({"learning_rate": e["learning_rate"]} if "learning_rate" in e else {})}
             for e in log_history if "loss" in e and "step" in e]
    evaluation = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": evaluation}


def plot_training_curves(summary: dict, config: SparsifyConfig, path: Path) -> bool:
    """``training_curves.png``: density target vs actual, loss, ANP. Skipped (False) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hf_chts: matplotlib is not installed; skipping training_curves.png (pip install 'hf_chts[plot]')")
        return False
    from .schedules import SparseSchedule

    steps = summary["steps"]
    history = summary["sparsity_history"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if not config.is_dense and steps > 0:
        try:
            schedule = SparseSchedule.from_config(config, steps)
            grid = list(range(0, steps + 1, max(1, steps // 400)))
            ax.plot(grid, [schedule.density_at(s) if s >= schedule.update_interval else config.initial_density
                           for s in grid], label="target (schedule)", drawstyle="steps-post")
        except ValueError:
            pass
    if history:
        ax.plot([h["step"] for h in history], [h["density"] for h in history], "o", ms=3, label="actual (updates)")
    ax.set(title="density", xlabel="optimizer step", ylabel="density")
    ax.legend()
    ax = axes[1]
    curves = summary["loss_curve"]
    if curves["train"]:
        ax.plot([e["step"] for e in curves["train"]], [e["loss"] for e in curves["train"]], label="train loss")
    if curves["eval"]:
        ax.plot([e["step"] for e in curves["eval"]], [e["eval_loss"] for e in curves["eval"]], "s-", label="val loss")
    ax.set(title="loss", xlabel="optimizer step", ylabel="cross-entropy")
    ax.legend()
    ax = axes[2]
    if history:
        ax.plot([h["step"] for h in history], [h["anp"] for h in history], "o-", ms=3)
    ax.set(title="active neuron percentage (ANP)", xlabel="optimizer step", ylabel="ANP", ylim=(0, 1.05))
    fig.suptitle(f"{summary['recipe_name']}: {config.method}, target density {config.target_density}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _gather_ranks() -> list[dict[str, Any]]:
    """(rank, pid, host) of every process; one entry when not distributed."""
    import socket

    import torch.distributed as dist

    me = {"rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "host": socket.gethostname()}
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, me)
        return gathered
    return [me]


def run_lm_eval(recipe: Recipe, model, tokenizer, data: LMData) -> dict[str, Any] | None:
    """lm-eval tasks (and tasks built from held-out text) on ``model``; main process only."""
    from . import evaluation

    tasks = list(recipe.eval.tasks)
    include_path = None
    if recipe.eval.local_task_from_heldout:
        include_path = recipe.output_dir / "lm_eval_tasks"
        texts = data.validation_texts[: recipe.eval.local_task_documents]
        tasks.extend(evaluation.write_local_tasks(include_path, texts, seed=recipe.run.seed))
    if not tasks:
        return None
    device = str(next(model.parameters()).device)
    results = evaluation.evaluate_model(model, tokenizer, tasks, include_path=include_path,
                                        batch_size=recipe.eval.batch_size, limit=recipe.eval.limit, device=device)
    if results is None:
        return None
    print(evaluation.results_table(results))
    return {"tasks": tasks, "include_path": str(include_path) if include_path else None,
            "metrics": evaluation.finite_metrics(results), "results": evaluation.jsonable_results(results)}


def finish_run(recipe: Recipe, trainer, callback, tokenizer, data: LMData, *, started: float,
               train_output=None) -> dict[str, Any]:
    """Evaluate, save the sparse checkpoint, reload and re-check it, run lm-eval, write the summary and plot.

    Every process must call it (evaluation is collective); only the main
    process writes files. Returns the summary (the main process's copy).
    """
    from .checkpoint import load_sparse, save_sparse
    from .model import sparsity_report

    out = recipe.output_dir
    model = trainer.model
    is_main = trainer.is_world_process_zero()
    config = sparsify_config(recipe)
    metrics = trainer.evaluate() if recipe.eval.perplexity else {}
    val_loss = metrics.get("eval_loss")
    ranks = _gather_ranks()
    final_dir = out / FINAL_DIR
    summary: dict[str, Any] = {}
    if is_main:
        report = sparsity_report(model)
        save_sparse(model, str(final_dir), tokenizer=tokenizer)
        print(f"hf_chts: sparse checkpoint saved to {final_dir}")
        reload_check = None
        reloaded = None
        if recipe.eval.check_reload or recipe.eval.tasks or recipe.eval.local_task_from_heldout:
            reloaded = load_sparse(str(final_dir))
            reloaded.to(next(model.parameters()).device)
        if recipe.eval.check_reload and recipe.eval.perplexity:
            in_memory = validation_loss(model, data.validation, recipe.eval.batch_size)
            from_disk = validation_loss(reloaded, data.validation, recipe.eval.batch_size)
            match = math.isclose(in_memory, from_disk, rel_tol=1e-5, abs_tol=1e-6)
            reload_check = {"in_memory_loss": in_memory, "reloaded_loss": from_disk, "match": match}
            print(f"hf_chts: validation loss in memory {in_memory:.6f}, reloaded from {final_dir} {from_disk:.6f} "
                  f"-> {'match' if match else 'MISMATCH: the checkpoint does not reproduce the trained model'}")
        lm_eval = run_lm_eval(recipe, reloaded if reloaded is not None else model, tokenizer, data)
        steps = trainer.state.global_step
        summary = {
            "recipe_name": Path(recipe.source).stem if recipe.source else "recipe",
            "recipe_path": recipe.source,
            "recipe": recipe.to_dict(),
            "method": config.method,
            "target_density": config.target_density,
            "final_density": report.density,
            "final_anp": report.anp,
            "live_links": report.live_links,
            "total_links": report.total_links,
            "val_loss": val_loss,
            "val_ppl": _safe_exp(val_loss),
            "reload_check": reload_check,
            "lm_eval": lm_eval,
            "steps": steps,
            "train_loss": getattr(train_output, "training_loss", None),
            "wall_time_seconds": time.time() - started,
            "world_size": trainer.args.world_size,
            "ranks": ranks,
            "parameters": sum(p.numel() for p in model.parameters()),
            "data": data.stats,
            "checkpoint": str(final_dir),
            "sparsity_history": sparsity_history(callback),
            "loss_curve": loss_curves(trainer.state.log_history),
        }
        from .io_utils import atomic_write_text

        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
        summary["plot"] = str(out / PLOT_FILE) if plot_training_curves(summary, config, out / PLOT_FILE) else None
        print_summary(summary, recipe)
    trainer.accelerator.wait_for_everyone()
    return summary


def eval_command_line(recipe: Recipe, checkpoint: Path, lm_eval: dict | None = None) -> str:
    """The ``hf-chts eval`` command that evaluates the saved checkpoint with the run's tasks."""
    parts = ["hf-chts", "eval", str(checkpoint)]
    tasks = list(lm_eval["tasks"]) if lm_eval else list(recipe.eval.tasks)
    if lm_eval and lm_eval.get("include_path"):
        parts += ["--include-path", lm_eval["include_path"]]
    parts += ["--tasks", ",".join(tasks) if tasks else "lambada_openai,hellaswag"]
    if recipe.eval.limit is not None:
        parts += ["--limit", str(recipe.eval.limit)]
    return " ".join(parts)


def print_summary(summary: dict, recipe: Recipe) -> None:
    ppl = summary["val_ppl"]
    lines = [
        "",
        "=" * 72,
        f"hf_chts run finished: {summary['recipe_name']} ({summary['method']}, {summary['steps']} steps, "
        f"{summary['wall_time_seconds']:.1f} s, {summary['world_size']} process(es))",
        f"  final density      {summary['final_density']:.4f} (target {summary['target_density']})",
        f"  ANP                {summary['final_anp']:.4f}",
        f"  validation PPL     {ppl:.3f}" if ppl is not None else "  validation PPL     (not evaluated)",
    ]
    if summary.get("reload_check"):
        check = summary["reload_check"]
        lines.append(f"  reload check       in-memory loss {check['in_memory_loss']:.6f} vs reloaded "
                     f"{check['reloaded_loss']:.6f} ({'match' if check['match'] else 'MISMATCH'})")
    if summary.get("lm_eval"):
        for task, metrics in summary["lm_eval"]["metrics"].items():
            shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
            lines.append(f"  lm-eval {task:<28} {shown}")
    lines += [
        f"  checkpoint         {summary['checkpoint']}",
        f"  summary            {recipe.output_dir / SUMMARY_FILE}",
        f"  plot               {summary.get('plot') or '(skipped)'}",
        f"  evaluate it with:  {eval_command_line(recipe, Path(summary['checkpoint']), summary.get('lm_eval'))}",
        "=" * 72,
    ]
    print("\n".join(lines))


# =========================================================================== whole run
def last_checkpoint(recipe: Recipe) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(recipe.output_dir)) if recipe.output_dir.is_dir() else None


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """The whole pipeline for one (already validated) recipe; see recipes/pretrain.py for the same steps spelt out."""
    from accelerate import PartialState

    from .model import sparsify

    started = time.time()
    threads = torch.get_num_threads()
    configure_torch(recipe)
    try:
        state = PartialState()
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
        callback = make_callback(recipe, config)
        args = training_arguments(recipe, world_size=state.num_processes)
        trainer = build_trainer(recipe, model, tokenizer, data, callback, args=args)
        resume = last_checkpoint(recipe) if mode == "resume" else None
        output = trainer.train(resume_from_checkpoint=resume)
        return finish_run(recipe, trainer, callback, tokenizer, data, started=started, train_output=output)
    finally:
        torch.set_num_threads(threads)  # run.torch_threads applies to this run only


def train_command(args) -> int:
    """``hf-chts train <recipe> [--overwrite] [--key value ...]``."""
    recipe = load_recipe(args.recipe, list(getattr(args, "overrides", None) or []),
                         overwrite=bool(getattr(args, "overwrite", False)))
    check_output_dir(recipe)  # fail before loading anything heavy
    run_recipe(recipe)
    return 0
