"""`hf-chts --help` and `import hf_chts` stay light: no torch / transformers until a command needs them."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "datasets", "numpy", "yaml", "lm_eval")
LIGHT_MODULES = ("hf_chts/__init__.py", "hf_chts/cli.py", "hf_chts/version.py")


def module_level_imports(path: Path) -> set[str]:
    """Top-level modules a file imports when it is imported (imports inside functions excluded)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_package_and_cli_import_only_the_standard_library_at_module_level():
    allowed = {"__future__", "argparse", "importlib", "sys", ".version"}
    for relative in LIGHT_MODULES:
        extra = module_level_imports(ROOT / relative) - allowed
        assert not extra, f"{relative} imports {sorted(extra)} at module level; import them where they are used"


HELP_SCRIPT = (
    "import sys\n"
    "from hf_chts.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "import hf_chts\n"
    "assert hf_chts.__version__\n"
    f"print('imported:', ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help_imports_no_heavy_library(argv):
    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: hf-chts" in result.stdout
    imported = result.stdout.strip().splitlines()[-1]
    assert imported == "imported:", f"`hf-chts {' '.join(argv)}` {imported}"


@pytest.mark.slow  # a timed subprocess: a sanity bound only; the goal (< 1 s) is measured by bench/cli_startup.py
def test_help_starts_quickly():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hf_chts.cli", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "train" in result.stdout
    print(f"hf-chts --help: {elapsed:.2f} s")
    assert elapsed < 5.0, f"hf-chts --help took {elapsed:.1f} s"
