"""Recipe text sources -> documents split into train and validation, all through ``datasets``.

Sources (exactly one, docs in recipes/README.md): ``data.builtin`` (a corpus shipped with
Python), ``data.text_files`` (plain text, one document per line / paragraph / file),
``data.data_files`` (text / json / jsonl / parquet / csv files, read by
``datasets.load_dataset`` with the builder of their extension), and ``data.dataset`` (a Hub
dataset, a local dataset folder for ``load_dataset``, or a ``Dataset.save_to_disk`` folder,
read by ``datasets.load_from_disk``). Files are read into ``datasets``' Arrow cache
(memory-mapped), so a corpus larger than RAM never has to fit in memory.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..suggest import did_you_mean
from .schema import BUILTIN_CORPORA, Recipe
from .validation import data_file_format

#: a datasets.save_to_disk folder holds one of these
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


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


def is_saved_dataset(path: str) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    folder = Path(path).expanduser()
    return folder.is_dir() and any((folder / name).is_file() for name in SAVED_DATASET_MARKERS)


def load_saved_dataset(path: str, split: str, field: str, streaming: bool):
    """One split of a ``save_to_disk`` folder (a ``DatasetDict``'s ``split``; a single ``Dataset`` whole)."""
    import datasets

    loaded = datasets.load_from_disk(str(Path(path).expanduser()))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{field} = {split!r} is not a split of the saved dataset {path}; its splits: "
                             f"{', '.join(loaded)}{did_you_mean(split, list(loaded))}")
        loaded = loaded[split]
    return loaded.to_iterable_dataset() if streaming else loaded


def _load_files(files: list[str], builder: str, data, streaming: bool):
    import datasets

    kwargs = {"sample_by": data.sample_by} if builder == "text" else {}
    full = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming, **kwargs)
    if builder == "text":  # one document per line / paragraph / file, without the separating newlines
        full = full.map(lambda batch: {"text": [text.strip("\n") for text in batch["text"]]}, batched=True)
    return full


def load_corpus(recipe: Recipe) -> Corpus:
    """Load the documents and split them into train / validation (deterministically, by ``run.seed``)."""
    import datasets

    data, seed = recipe.data, recipe.run.seed
    column = data.text_column
    if data.builtin:
        full = datasets.Dataset.from_dict({"text": builtin_documents(data.builtin, data.sample_by)})
        column = "text"
    elif data.text_files:
        full, column = _load_files(data.text_files, "text", data, data.streaming), "text"
    elif data.data_files:
        builder = data_file_format(data.data_files)
        full = _load_files(data.data_files, builder, data, data.streaming)
        column = "text" if builder == "text" else column
    elif is_saved_dataset(data.dataset):
        full = load_saved_dataset(data.dataset, data.train_split, f"{recipe.source or 'recipe'}: data.train_split",
                                  data.streaming)
    else:
        kwargs = dict(path=data.dataset, name=data.dataset_config, split=data.train_split, streaming=data.streaming)
        try:
            full = datasets.load_dataset(**kwargs)
        except Exception as error:  # offline / missing dataset: say which and how to fix
            raise FileNotFoundError(
                f"data.dataset: could not load {data.dataset!r} (config {data.dataset_config!r}, split "
                f"{data.train_split!r}, streaming={data.streaming}): {type(error).__name__}: {error}. Hub datasets need "
                "network access (unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) or a local cache") from error
    source = data.dataset or data.data_files or data.text_files or data.builtin
    names = list(full.column_names or []) if getattr(full, "column_names", None) else None
    if names is not None and column not in names:
        raise ValueError(f"{recipe.source or 'recipe'}: data.text_column = {column!r} is not a column of {source}; "
                         f"set it to one of the columns: {', '.join(names)}{did_you_mean(column, names)}")
    if column != "text":
        full = full.rename_column(column, "text")
    if names is not None and len(names) > 1:
        full = full.remove_columns([n for n in names if n != column])
    full = full.filter(lambda batch: [bool(text and text.strip()) for text in batch["text"]], batched=True)

    if data.validation_split:
        if is_saved_dataset(data.dataset):
            validation = load_saved_dataset(data.dataset, data.validation_split,
                                            f"{recipe.source or 'recipe'}: data.validation_split", data.streaming)
        else:
            validation = datasets.load_dataset(path=data.dataset, name=data.dataset_config,
                                               split=data.validation_split, streaming=data.streaming)
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
