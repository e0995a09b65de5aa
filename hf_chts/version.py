"""The package version (one place; ``hf_chts.__version__`` and checkpoint records read it) and its repository."""

__version__ = "0.1.0"

#: the source repository: the docs (docs/), recipes and benchmarks live there, not in the wheel
#: (model cards link it; pyproject.toml's [project.urls] names the same address)
REPOSITORY_URL = "https://github.com/hf-chts/hf_chts"
