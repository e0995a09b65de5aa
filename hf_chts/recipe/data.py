"""Recipe data: the byte-level BPE tokenizer (cached) and the packed token blocks.

The documents come from :mod:`hf_chts.recipe.corpus`. Tokenizing and packing are
``datasets.map`` passes (batched; for file-backed data each pass is written to, and on a later
run read back from, ``datasets``' cache by its fingerprint), so memory holds one batch of
documents at a time, whatever the corpus size. Streamed corpora are packed on the fly
(:class:`PackedStream`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .corpus import Corpus
from .schema import Recipe

logger = logging.getLogger(__name__)

BPE_CACHE_VERSION = 1


# =========================================================================== tokenizer
def _cache_root(recipe: Recipe) -> Path:
    if recipe.tokenizer.cache_dir:
        return Path(recipe.tokenizer.cache_dir).expanduser()
    return Path(os.environ.get("HF_CHTS_CACHE", Path.home() / ".cache" / "hf_chts")).expanduser() / "tokenizers"


def _bpe_training_texts(recipe: Recipe, corpus: Corpus):
    """A factory of fresh iterators over the BPE's training texts, read lazily (never the whole column at once)."""
    limit = recipe.tokenizer.train_bpe.max_documents
    if corpus.streaming:
        return lambda: (row["text"] for row in itertools.islice(corpus.train, limit or 100_000))
    count = len(corpus.train) if limit is None else min(limit, len(corpus.train))
    return lambda: itertools.islice(
        (text for batch in corpus.train.iter(batch_size=PACK_BATCH_DOCUMENTS) for text in batch["text"]), count)


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
#: documents per batch of the tokenizing and packing ``datasets.map`` passes (the memory bound)
PACK_BATCH_DOCUMENTS = 1000


def pack_blocks(token_lists, block_size: int):
    """Concatenate token lists and cut them into ``[n, block_size]`` blocks (the tail is dropped)."""
    import numpy as np

    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64)
    count = len(flat) // block_size
    return flat[: count * block_size].reshape(count, block_size)


def _pack_function(block_size: int):
    def pack(batch):
        return {"input_ids": pack_blocks(batch["input_ids"], block_size)}

    return pack


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


def token_count(tokenized) -> int:
    """Tokens in a tokenized dataset's ``input_ids``, summed by Arrow (the column stays on disk)."""
    import pyarrow.compute as pc

    total = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py()
    return int(total or 0)


def _packed_dataset(tokenized, block_size: int, max_blocks: int | None, label: str, num_proc: int | None = None):
    """Blocks of exactly ``block_size`` tokens (``datasets.map``, batched; the tail of each batch of
    :data:`PACK_BATCH_DOCUMENTS` documents, < ``block_size`` tokens, is dropped) and the token count."""
    tokens = token_count(tokenized)
    packed = tokenized.map(_pack_function(block_size), batched=True, batch_size=PACK_BATCH_DOCUMENTS,
                           remove_columns=tokenized.column_names, num_proc=num_proc,
                           desc=f"Packing {label} into blocks of {block_size}")
    if max_blocks is not None and len(packed) > max_blocks:
        packed = packed.select(range(max_blocks))
    if len(packed) == 0:
        raise ValueError(f"the {label} split has {tokens} tokens: fewer than one block of data.block_size = "
                         f"{block_size}; lower block_size or add text")
    return packed, tokens


def build_lm_datasets(recipe: Recipe, tokenizer, corpus: Corpus) -> LMData:
    """Tokenise (with an EOS after every document) and pack into blocks of ``data.block_size``."""
    data = recipe.data
    tokenize = _tokenize_function(tokenizer)
    validation_tok = corpus.validation.map(tokenize, batched=True, remove_columns=corpus.validation.column_names,
                                           desc="Tokenizing validation", num_proc=data.num_proc)
    validation, val_tokens = _packed_dataset(validation_tok, data.block_size, data.max_validation_samples, "validation",
                                             data.num_proc)
    held_out = corpus.validation.select(range(min(len(corpus.validation), recipe.eval.local_task_documents)))
    texts = list(held_out["text"])  # the documents eval.local_task_from_heldout may use
    stats = {"validation_tokens": val_tokens, "validation_blocks": len(validation), "block_size": data.block_size}
    if corpus.streaming:
        train_tok = corpus.train.map(tokenize, batched=True, remove_columns=["text"])
        train = PackedStream(train_tok, data.block_size, data.max_train_samples)
        stats.update(train_tokens=-1, train_blocks=-1)
    else:
        train_tok = corpus.train.map(tokenize, batched=True, remove_columns=corpus.train.column_names,
                                     desc="Tokenizing train", num_proc=data.num_proc)
        train, train_tokens = _packed_dataset(train_tok, data.block_size, data.max_train_samples, "train",
                                              data.num_proc)
        stats.update(train_tokens=train_tokens, train_blocks=len(train))
    return LMData(train, validation, texts, stats)


def collate_blocks(examples: list[dict]) -> dict:
    """Stack equal-length blocks; ``labels = input_ids`` (the model shifts them)."""
    input_ids = torch.stack([torch.as_tensor(example["input_ids"], dtype=torch.long) for example in examples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}
