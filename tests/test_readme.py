"""The README's Python examples run as written (in a temporary working directory)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    text = README.read_text()
    return re.findall(r"(<!-- [^>]*-->\n)?```python\n(.*?)```", text, flags=re.S)


def block_after(marker: str) -> str:
    for comment, code in python_blocks():
        if marker in comment:
            return code
    raise AssertionError(f"README has no python block marked {marker!r}")


def run_code(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


def reloaded_density(cwd: Path, folder: str) -> str:
    """The density of ``folder`` reloaded with ``hf_chts.load_sparse`` in a fresh interpreter, rounded to 3 digits."""
    check = run_code(
        "import hf_chts\n"
        f"model = hf_chts.load_sparse({folder!r})\n"
        "print(round(hf_chts.sparsity_report(model).density, 3))\n",
        cwd,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    return check.stdout.strip().splitlines()[-1]


def test_readme_two_commands_come_first():
    text = README.read_text()
    first_blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]
    assert "pip install -e" in first_blocks[0] and "hf-chts train recipes/tiny-llama-cpu.yaml" in first_blocks[0]
    assert "pytest" in first_blocks[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert first_blocks[1].strip().replace(".venv/bin/", "") in ci.replace('"$VENV"/bin/', "").replace(".venv/bin/", "")


@pytest.mark.slow
def test_python_api_example_runs(tmp_path):
    code = python_blocks()[0][1]
    result = run_code(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overall" in result.stdout and "0.3000" in result.stdout


@pytest.mark.slow
def test_accelerate_loop_example_runs_and_checkpoints(tmp_path):
    code = block_after("accelerate-example")
    result = run_code(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1].rstrip(":")) for line in lines] == list(range(10, 76, 10))
    assert lines[-1].split()[3] == "0.300"
    assert (tmp_path / "out" / "accelerate-state").is_dir()
    assert list((tmp_path / "out" / "accelerate-state").glob("custom_checkpoint_0.*"))
    assert reloaded_density(tmp_path, "out/tiny-sparse") == "0.3"


@pytest.mark.slow
def test_trainer_example_runs_and_reaches_the_target(tmp_path):
    code = block_after("trainer-example")
    result = run_code(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "out" / "final"
    record = json.loads((final / "sparsify_config.json").read_text())
    assert record["engine"]["completed_steps"] == 100
    assert [update["step"] for update in record["engine"]["history"]] == list(range(10, 71, 10))
    assert record["engine"]["history"][-1]["target_density"] == 0.3
    assert reloaded_density(tmp_path, "out/final") == "0.3"


def undefined_names(code: str) -> set[str]:
    """Names a code block reads that it never imports or assigns (and Python does not provide)."""
    import ast
    import builtins

    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)} - bound


def test_every_python_block_is_self_contained():
    """Blocks no test runs (they need the main command's output or the Hub) still parse and import what they use."""
    blocks = python_blocks()
    assert len(blocks) >= 4
    for _comment, code in blocks:
        assert not undefined_names(code), (undefined_names(code), code)
