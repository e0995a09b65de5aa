"""Refusing to resume a sparse run under a different :class:`~hf_chts.config.SparsifyConfig`.

A saved engine state (step, RNG, masks) continues one trajectory; every field
of the config shapes that trajectory (densities, schedule, update interval,
removal/regrowth rules, seed, targeted modules), so resuming with another
value would silently finish a different run. Only the fields in
:data:`RESUME_SAFE_FIELDS` (they change how a result is computed, not the
result) may differ, and only when the caller names them explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import SparsifyConfig

#: Fields that may differ between the saved state and the resuming run, when named in ``allow_config_change``.
RESUME_SAFE_FIELDS = ("ch_memory_budget_mb",)


def _as_dict(config: SparsifyConfig | dict[str, Any]) -> dict[str, Any]:
    if isinstance(config, SparsifyConfig):
        return config.to_dict()
    return SparsifyConfig.from_dict(dict(config)).to_dict()  # resolve presets so equal configs compare equal


def config_changes(saved: SparsifyConfig | dict[str, Any],
                   current: SparsifyConfig | dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` for every field that differs (fields sorted by name)."""
    old, new = _as_dict(saved), _as_dict(current)
    missing = object()
    return {name: (old.get(name, "<unset>"), new.get(name, "<unset>")) for name in sorted(set(old) | set(new))
            if old.get(name, missing) != new.get(name, missing)}


def check_allowed_changes(allow_config_change: Iterable[str] | None) -> tuple[str, ...]:
    """Validate an ``allow_config_change`` list: only names in :data:`RESUME_SAFE_FIELDS` are accepted."""
    if allow_config_change is None:
        return ()
    if isinstance(allow_config_change, str):
        allow_config_change = [allow_config_change]
    names = tuple(allow_config_change)
    unsafe = [name for name in names if name not in RESUME_SAFE_FIELDS]
    if unsafe:
        raise ValueError(f"allow_config_change: {', '.join(map(repr, unsafe))} cannot change on resume (it changes "
                         f"the training trajectory); fields that may: {', '.join(RESUME_SAFE_FIELDS)}")
    return names


def check_resume_config(saved: SparsifyConfig | dict[str, Any], current: SparsifyConfig | dict[str, Any], *,
                        allow_config_change: Iterable[str] | None = None, where: str = "engine state") -> None:
    """Raise ``ValueError`` listing every field (old → new) that differs and is not explicitly allowed."""
    allowed = check_allowed_changes(allow_config_change)
    try:
        changes = config_changes(saved, current)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: the saved SparsifyConfig is not valid ({error})") from error
    refused = {name: values for name, values in changes.items() if name not in allowed}
    if refused:
        listed = "; ".join(f"{name}: {old!r} → {new!r}" for name, (old, new) in refused.items())
        safe = [name for name in refused if name in RESUME_SAFE_FIELDS]
        opt_in = (f"; to accept {', '.join(safe)} pass allow_config_change={safe!r}" if safe else "")
        raise ValueError(f"{where} was saved with a different SparsifyConfig ({listed}); resume with the saved "
                         f"values or start a new run in another output folder{opt_in}")
