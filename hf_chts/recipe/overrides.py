"""Command-line overrides of recipe fields: ``--section.key value`` pairs."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import yaml

from ..suggest import did_you_mean
from .schema import SECTIONS, TRAINING_RESERVED, BPESection, section_keys, unknown_key_error
from .validation import fix_yaml_floats

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
        value = fix_yaml_floats(yaml.safe_load(text)) if text != "" else ""
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
                             f"{did_you_mean(parts[0], SECTIONS)}")
        section = parts[0]
        if section not in SECTIONS:
            raise unknown_key_error(section, "", SECTIONS, label)
        allowed = section_keys(section)
        if section == "training" and parts[1] in TRAINING_RESERVED:
            raise ValueError(f"{label}: training.{parts[1]} is set by {TRAINING_RESERVED[parts[1]]}")
        if parts[1] not in allowed:
            raise unknown_key_error(parts[1], section, allowed, label)
        if len(parts) > 2:
            if (section, parts[1]) == ("tokenizer", "train_bpe") and len(parts) == 3:
                sub_allowed = {f.name for f in dataclasses.fields(BPESection)}
                if parts[2] not in sub_allowed:
                    raise unknown_key_error(parts[2], "tokenizer.train_bpe", sub_allowed, label)
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
