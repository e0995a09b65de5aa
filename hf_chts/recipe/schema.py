"""The recipe schema: its sections (dataclasses), the keys each section allows, and unknown-key errors.

Values are typed by transformers' ``HfArgumentParser`` (:mod:`hf_chts.recipe.typed`),
cross-field rules live in :mod:`hf_chts.recipe.validation`, command-line overrides in
:mod:`hf_chts.recipe.overrides`, reading a recipe file in :mod:`hf_chts.recipe.loading`
and the input/output paths in :mod:`hf_chts.recipe.paths`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SparsifyConfig
from ..suggest import did_you_mean

SUMMARY_FILE = "run_summary.json"


DENSE_BASELINE_DIR = "dense-baseline"  # eval.compare_dense: the dense run of the same recipe, inside the run folder


RECIPE_COPY = "recipe.yaml"  # the resolved recipe (with overrides), written before training: the run marker


BUILTIN_CORPORA = ("pydoc_topics",)


SPARSE_ADAMW_OPTIM = "hf_chts_sparse_adamw"  # training.optim value: hf_chts.SparseAdamW (docs/sparse-optimizer.md)


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


#: file extensions of data.data_files -> the datasets builder that reads them (compressed variants too)
DATA_FILE_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                     ".csv": "csv"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass
class DataSection:
    """Text source (exactly one of builtin / text_files / data_files / dataset), split and packing."""

    builtin: str | None = None
    text_files: list[str] | None = None
    data_files: list[str] | None = None  # text / json / jsonl / parquet / csv, read by datasets.load_dataset
    dataset: str | None = None  # a Hub dataset, a local dataset folder, or a Dataset.save_to_disk folder
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
    """The model trained from scratch: a LLaMA ``preset`` or ``name_or_path`` (the config of a Hub model or of
    a local folder holding a ``config.json``), then the explicit fields and ``config_overrides``."""

    preset: str | None = "llama-tiny"  # unset when name_or_path is given
    name_or_path: str | None = None
    config_overrides: dict[str, Any] | None = None  # any other field of the model's transformers config
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool | None = None  # presets: false; name_or_path: the config's own


@dataclass
class EvalSection:
    perplexity: bool = True
    check_reload: bool = True
    tasks: list[str] = field(default_factory=list)
    local_task_from_heldout: bool = False
    local_task_documents: int = 64
    limit: float | None = None  # examples per lm-eval task: a count (>= 1) or a fraction (< 1)
    batch_size: int = 8
    compare_dense: bool = False  # also train the same recipe dense (<output_dir>/dense-baseline) and compare


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


# sections inside a section: tokenizer.train_bpe
NESTED_SECTIONS: dict[str, dict[str, type]] = {"tokenizer": {"train_bpe": BPESection}}


def section_class(section: str) -> type:
    """The dataclass that types a section: the recipe's own, ``SparsifyConfig`` or ``TrainingArguments``."""
    if section == "sparsify":
        return SparsifyConfig
    if section == "training":
        from transformers import TrainingArguments

        return TrainingArguments
    return SECTIONS[section]


# training keys the recipe sets elsewhere
TRAINING_RESERVED = {"output_dir": "run.output_dir", "seed": "run.seed", "data_seed": "run.seed",
                      "overwrite_output_dir": "run.overwrite / --overwrite",
                      "resume_from_checkpoint": "run.resume"}


def _training_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def section_keys(section: str) -> set[str]:
    cls = SECTIONS[section]
    if section == "sparsify":
        return {f.name for f in dataclasses.fields(SparsifyConfig) if not f.name.startswith("_")}
    if section == "training":
        return _training_fields() - set(TRAINING_RESERVED)
    return {f.name for f in dataclasses.fields(cls)}


def unknown_key_error(key: str, section: str, allowed, where: str) -> ValueError:
    allowed = sorted(allowed)
    shown = ", ".join(allowed) if len(allowed) <= 20 else ", ".join(allowed[:20]) + ", ..."
    label = "top level" if not section else f"section '{section}'"
    return ValueError(f"{where}: unknown key {key!r} in {label}{did_you_mean(key, allowed)}; allowed keys: {shown}")


def sparsify_config(recipe: Recipe, where: str = "recipe") -> SparsifyConfig:
    """``SparsifyConfig(**recipe.sparsify)`` with the run seed as default seed."""
    values = dict(recipe.sparsify)
    values.setdefault("seed", recipe.run.seed)
    try:
        return SparsifyConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{where}: section 'sparsify': {error}") from error
