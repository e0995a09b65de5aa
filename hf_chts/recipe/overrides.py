"""Command-line overrides of recipe fields, in ``HfArgumentParser``'s ``--key value`` syntax.

    --training.learning_rate 1e-3      a field of one section (always works)
    --learning_rate 1e-3               the same, when only one section has that field
    --sparsify.target_density=0.1      '=' works too
    --eval.tasks hellaswag arc_easy    several values for a list field
    --eval.local_task_from_heldout     a flag alone means true
    --tokenizer.train_bpe.vocab_size 512
    --data.dataset null                unset an optional field

Values stay strings here; each is converted and checked by the field's type
(:mod:`hf_chts.recipe.typed`), exactly as ``HfArgumentParser`` does for Hugging
Face training scripts.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from ..suggest import did_you_mean
from .schema import NESTED_SECTIONS, SECTIONS, TRAINING_RESERVED, section_keys, unknown_key_error


def parse_overrides(tokens: list[str] | None) -> list[tuple[str, Any]]:
    """``["--training.max_steps", "50", "--eval.tasks", "a", "b"]`` -> ``[("training.max_steps", "50"),
    ("eval.tasks", ["a", "b"])]``; a key with no value means ``"true"``."""
    tokens = list(tokens or [])
    pairs: list[tuple[str, Any]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) <= 2:
            raise ValueError(f"override {token!r}: expected --section.key value (e.g. --training.max_steps 50)")
        key, sep, text = token[2:].partition("=")
        index += 1
        if sep:
            values = [text]
        else:
            values = []
            while index < len(tokens) and not tokens[index].startswith("--"):
                values.append(tokens[index])
                index += 1
            values = values or ["true"]
        pairs.append((key, values[0] if len(values) == 1 else values))
    return pairs


def _section_of(key: str, label: str) -> str:
    """The section of a bare field name (``learning_rate`` -> ``training``); ambiguous or unknown -> ValueError."""
    owners = [section for section in SECTIONS if key in section_keys(section)]
    if len(owners) == 1:
        return owners[0]
    if owners:
        raise ValueError(f"{label}: {key!r} is a field of several sections ({', '.join(owners)}); write "
                         f"{' or '.join(f'--{s}.{key}' for s in owners)}")
    everything = sorted({k for section in SECTIONS for k in section_keys(section)} | set(SECTIONS))
    raise ValueError(f"{label}: unknown key {key!r}{did_you_mean(key, everything)}; expected --section.key "
                     f"(sections: {', '.join(SECTIONS)}) or a field name of one section")


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]], where: str = "override") -> dict:
    """Set (dotted) keys in a raw recipe mapping; unknown sections/keys -> did-you-mean ValueError."""
    raw = copy.deepcopy(raw or {})
    for key, value in overrides:
        label = f"{where} --{key}"
        parts = key.split(".")
        if len(parts) == 1:
            parts = [_section_of(key, label), key]
        section = parts[0]
        if section not in SECTIONS:
            raise unknown_key_error(section, "", SECTIONS, label)
        allowed = section_keys(section)
        if section == "training" and parts[1] in TRAINING_RESERVED:
            raise ValueError(f"{label}: training.{parts[1]} is set by {TRAINING_RESERVED[parts[1]]}")
        if parts[1] not in allowed:
            raise unknown_key_error(parts[1], section, allowed, label)
        nested = NESTED_SECTIONS.get(section, {}).get(parts[1])
        if len(parts) > 2:
            if nested is None or len(parts) > 3:
                raise ValueError(f"{label}: {section}.{parts[1]} has no sub-keys")
            sub_allowed = {f.name for f in dataclasses.fields(nested)}
            if parts[2] not in sub_allowed:
                raise unknown_key_error(parts[2], f"{section}.{parts[1]}", sub_allowed, label)
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        node = raw[section]
        for part in parts[1:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw
