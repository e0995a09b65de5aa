"""Did-you-mean hints for error messages about unknown names (config fields, recipe keys, presets)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(key: object, allowed: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest allowed name, or ``""`` when none is close."""
    match = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
