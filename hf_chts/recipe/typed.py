"""Recipe values -> typed dataclass fields, through transformers' ``HfArgumentParser``.

Every recipe section is a dataclass (``RunSection`` ... ``EvalSection``,
``SparsifyConfig``, ``transformers.TrainingArguments``). A section's values,
from the YAML file or from ``--section.key value`` on the command line, are
handed to ``HfArgumentParser`` as ``--key value`` tokens, so each field is
converted and checked by the same rules as in any Hugging Face training script
(``learning_rate: fast`` -> ``invalid float value: 'fast'``). Two things
``HfArgumentParser`` cannot express are handled here: ``null`` (allowed only for
fields typed ``X | None``) and a list given to a field that also takes a single
value (e.g. ``report_to``, ``SparsifyConfig.target_modules``): each element is
converted on its own. A mapping-only field (``model.config_overrides``) takes a YAML
mapping, or JSON text on the command line.
"""

from __future__ import annotations

import functools
import json
import re
import types
import typing
from typing import Any

NULL_TOKENS = ("null", "None")  # a command-line value that means "unset" (YAML's null)


class RecipeValueError(ValueError):
    """A recipe value ``HfArgumentParser`` refused (the message names the field)."""


def _argparse_error(message: str):
    raise RecipeValueError(re.sub(r"^argument [^:]+: ", "", message))


@functools.lru_cache(maxsize=None)
def section_parser(cls: type):
    """``HfArgumentParser(cls)`` whose errors raise instead of exiting the process."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, add_help=False, allow_abbrev=False)
    parser.error = _argparse_error  # argparse calls error() for every bad value; never sys.exit
    return parser


def _union_args(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _takes_list(annotation) -> bool:
    return any(typing.get_origin(arg) is list for arg in _union_args(annotation))


def _takes_dict(annotation) -> bool:
    """A mapping-only field (``dict | None``); ``dict | str`` fields (TrainingArguments' JSON-or-path
    options) go through ``HfArgumentParser`` as text, as before."""
    args = _union_args(annotation)
    return str not in args and any(arg is dict or typing.get_origin(arg) is dict for arg in args)


def _convert_dict(value) -> dict:
    """A mapping field (``model.config_overrides``): a YAML mapping, or JSON text on the command line."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecipeValueError(f"expected a mapping (JSON on the command line, e.g. '{{\"n_inner\": 64}}'): "
                                   f"{error}") from None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise RecipeValueError("expected a mapping of names to values")
    return dict(value)


def _tokens(value) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [token for item in value for token in _tokens(item)]
    return [str(value)]


def _convert(parser, key: str, value) -> Any:
    tokens = _tokens(value)
    argv = [f"--{key}={tokens[0]}"] if len(tokens) == 1 else [f"--{key}", *tokens]  # '=': values like -1e-3
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise RecipeValueError(f"expected a single value, got {len(rest) + 1}")
    return getattr(namespace, key)


def typed_values(cls: type, values: dict[str, Any], label: str, where: str) -> dict[str, Any]:
    """Convert and check ``values`` (field name -> YAML value or command-line string) for dataclass ``cls``.

    Returns the converted values of the given keys only (the dataclass defaults
    stay defaults). Raises ``ValueError`` ``"<where>: <label>.<key> = <value> has
    the wrong type (<why>)"``. Keys must already be known fields of ``cls``.
    """
    parser = section_parser(cls)
    hints = typing.get_type_hints(cls)
    typed = {}
    for key, value in values.items():
        annotation = hints[key]
        try:
            if value is None or (isinstance(value, str) and value in NULL_TOKENS):
                if type(None) not in _union_args(annotation):
                    raise RecipeValueError("null is not allowed here; give a value or leave the key out")
                typed[key] = None
            elif _takes_dict(annotation):
                typed[key] = _convert_dict(value)
            elif isinstance(value, list):
                if not _takes_list(annotation):
                    raise RecipeValueError("expected a single value, not a list")
                typed[key] = _convert_list(parser, key, value)
            else:
                typed[key] = _convert(parser, key, value)
        except RecipeValueError as error:
            raise ValueError(f"{where}: {label}.{key} = {value!r} has the wrong type ({error})") from None
    return typed


def _convert_list(parser, key: str, value: list) -> list:
    """A list value: all tokens at once (``nargs='+'`` fields), or one element at a time for a field
    that takes one token but also accepts a list (``report_to: [tensorboard, trackio]``)."""
    if not value:
        return []
    namespace, rest = parser.parse_known_args([f"--{key}", *_tokens(value)])
    if rest:
        return [_convert(parser, key, item) for item in value]
    converted = getattr(namespace, key)
    return list(converted) if isinstance(converted, (list, tuple)) else [converted]
