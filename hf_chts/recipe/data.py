"""Recipe data: corpus loading and splitting, the byte-level BPE tokenizer (cached), packed token blocks."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..suggest import did_you_mean
from .schema import BUILTIN_CORPORA, Recipe

logger = logging.getLogger(__name__)

BPE_CACHE_VERSION = 1


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
                         f"columns: {', '.join(names)}{did_you_mean(column, names)}")
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
        return PreTrainedTokenizerFast.from_pretrained(str(folder), trust_remote_code=False), folder, True

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
            tokenizer = AutoTokenizer.from_pretrained(tok.name, trust_remote_code=False)
        except Exception as error:
            raise FileNotFoundError(f"tokenizer.name: could not load {tok.name!r}: {type(error).__name__}: {error}. "
                                    "Hub tokenizers need network access or a local cache") from error
    else:
        if corpus is None:
            raise ValueError("tokenizer.train_bpe needs the corpus: build_tokenizer(recipe, corpus)")
        tokenizer, folder, cached = train_bpe_tokenizer(
            _bpe_training_texts(recipe, corpus), tok.train_bpe.vocab_size, tok.train_bpe.min_frequency,
            _cache_root(recipe))
        logger.info("hf_chts: BPE tokenizer (%d tokens) %s at %s", len(tokenizer),
                    "loaded from cache" if cached else "trained and cached", folder)
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
