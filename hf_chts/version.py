"""The package version (one place; ``hf_chts.__version__`` and checkpoint records read it)."""

__version__ = "0.1.0"
