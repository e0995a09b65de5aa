"""Did-you-mean hints for error messages about unknown names (config fields, recipe keys, presets)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(key: object, allowed: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest allowed name, or ``""`` when none is close."""
    match = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), for short names."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _stem(name: str) -> str:
    lowered = name.lower()
    for suffix in (".yaml", ".yml"):
        if lowered.endswith(suffix):
            return lowered[: -len(suffix)]
    return lowered


def did_you_mean_file(name: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` only for a typo of an existing file name: same name up to case and the
    ``.yml``/``.yaml`` extension, or at most two edits away with the same numbers in it (so
    ``llama-7b-chtss.yaml`` does not suggest ``llama-1b-chtss.yaml``, nor ``gpt2-chtss.yaml`` a LLaMA recipe)."""
    import re

    def numbers(text: str) -> list[str]:
        return re.findall(r"\d+", text)

    stem = _stem(name)
    best = None
    for candidate in sorted(candidates):
        other = _stem(candidate)
        distance = _edit_distance(stem, other)
        if distance <= 2 and numbers(stem) == numbers(other) and (best is None or distance < best[0]):
            best = (distance, candidate)
    return f" (did you mean {best[1]!r}?)" if best else ""
