"""Optional dependencies (the extras of ``pyproject.toml``): is one installed, and which extra brings it.

The base install (``pip install -e .``) trains, saves and reloads; lm-eval comes with the
``[eval]`` extra. A step that needs a missing one is skipped with :func:`missing_extra`'s note
(the recipe's lm-eval step) or refused with it (``hf-chts eval``).
"""

from __future__ import annotations

import importlib

#: importable module -> (pip package, the hf_chts extra that installs it)
OPTIONAL_MODULES = {"lm_eval": ("lm-eval", "eval"), "matplotlib": ("matplotlib", "plot")}


def missing_extra(module: str) -> str | None:
    """``None`` when ``module`` imports; otherwise a note naming its package and the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        package, extra = OPTIONAL_MODULES[module]
        return f"{package} is not installed (pip install 'hf_chts[{extra}]', or pip install -e '.[{extra}]' in a checkout)"
    return None
