"""The English corpus of bench/quality.py: GCIDE, the public-domain Collaborative International
Dictionary of English (Webster 1913 + WordNet), as installed by the Debian package ``dict-gcide``.

    apt-get install dict-gcide        # -> /usr/share/dictd/gcide.dict.dz (40 MB of text)

Each dictionary entry (definitions, etymologies and literary quotations) becomes one document:
markup is dropped (pronunciation ``\\Af*fect"\\``, cross-reference braces ``{Afeard}``, source tags
``[1913 Webster]``) and whitespace collapsed. The entries keep their alphabetical order and are cut
into contiguous shards, so related neighbouring entries (``Affect``, ``Affected``) land in the
same split; one shard in 20 is validation, another one in 20 is test, the rest is training.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

GCIDE_PATH = Path("/usr/share/dictd/gcide.dict.dz")
INSTALL_HINT = "install it with `apt-get install dict-gcide` (see bench/README.md) or pass --corpus FILE"

_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
_SOURCE_TAG_LINE = re.compile(r"^\s*\[[^\]\n]*\]\s*$")
_BRACES = re.compile(r"[{}]")
_SPACES = re.compile(r"\s+")


def read_corpus_text(path: Path) -> str:
    """The raw text of ``path`` (gzip/dictzip when it ends in .gz/.dz); a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found: {INSTALL_HINT}")
    opener = gzip.open if path.suffix in (".gz", ".dz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def dictionary_entries(text: str) -> list[str]:
    """Split a dictd text into cleaned entries (one string each, single-spaced).

    An entry starts with a non-indented line after a blank line; dictd's own ``00-database-*``
    header entries are skipped.
    """
    entries: list[list[str]] = []
    previous_blank = True
    for line in text.splitlines():
        if not line.strip():
            previous_blank = True
            continue
        if previous_blank and not line[0].isspace():
            entries.append([])
        previous_blank = False
        if entries and not _SOURCE_TAG_LINE.match(line):
            entries[-1].append(line)
    cleaned = []
    for lines in entries:
        if lines and lines[0].startswith("00-database"):
            continue
        body = _BRACES.sub("", _PRONUNCIATION.sub("", " ".join(lines)))
        body = _SPACES.sub(" ", body).strip()
        if len(body) > 1:
            cleaned.append(body)
    return cleaned


def split_documents(documents: list[str], shards: int = 200) -> dict[str, list[str]]:
    """Contiguous shards of the ordered documents: shard i is val if i % 20 == 7, test if i % 20 == 17."""
    if len(documents) < 40:
        raise ValueError(f"the corpus has {len(documents)} documents; at least 40 are needed for train/val/test splits")
    shards = min(shards, len(documents))
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for index in range(shards):
        shard = documents[index * len(documents) // shards:(index + 1) * len(documents) // shards]
        name = "val" if index % 20 == 7 else "test" if index % 20 == 17 else "train"
        splits[name].extend(shard)
    if not splits["val"] or not splits["test"]:
        raise ValueError("the corpus is too small to give both a validation and a test shard")
    return splits


def fingerprint(parts: list[str]) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def load_splits(path: Path) -> dict[str, list[str]]:
    """Train/val/test document lists of the dictionary at ``path``."""
    documents = dictionary_entries(read_corpus_text(path))
    if not documents:
        raise ValueError(f"corpus file {path} has no dictionary entries (blank-line separated, headword at column 0)")
    return split_documents(documents)
