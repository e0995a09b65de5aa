"""bench/gpu_check.py runs its checks on the CPU (tiny shape), so a GPU run finds no typo.

The table's failure path is tested too: a wrong expected density, a section that raises, and a
NaN planted at a masked position must each turn into a FAIL row / a non-zero exit.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY_ARGS = ["--device", "cpu", "--tiny", "--steps", "8", "--dense-steps", "4", "--update-interval", "2",
             "--threads", "0",  # leave the test process's thread count alone
             "--max-step-ratio", "inf"]  # step time on a shared CPU is no test (benchmarks measure it)
ROWS = ["device", "engine: masks on device", "engine: one topology update", "CH2-L3n scores: cpu == cpu",
        "CH3-L3n scores: cpu == cpu", "SparseAdamW: state bytes, == masked AdamW", "bf16 CHTss run: loss finite", "bf16 CHTss run: loss decreases",
        "CHTss: density follows schedule", "CHTss: final density = target", "CHTss: masked weights exactly 0",
        "CHTss: masks on device after run", "peak memory sparse / dense", "step time sparse / dense"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def statuses(output: str) -> dict[str, str]:
    """check name -> status, read from the printed table."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(\S.*?)\s{2,}(PASS|FAIL|n/a)\b", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


@pytest.mark.slow  # a benchmark smoke run (the whole check on a tiny shape)
def test_every_check_passes_on_cpu_tiny(gpu_check, capsys):
    assert gpu_check.main(TINY_ARGS) == 0
    table = statuses(capsys.readouterr().out)
    assert list(table) == ROWS
    assert table.pop("peak memory sparse / dense") == "n/a"  # measured on cuda only
    assert set(table.values()) == {"PASS"}


@pytest.mark.slow  # a benchmark smoke run (the whole check on a tiny shape)
def test_wrong_density_fails_the_table(gpu_check, capsys, monkeypatch):
    right = gpu_check.expected_density
    monkeypatch.setattr(gpu_check, "expected_density", lambda engine, step: right(engine, step) + 0.05)
    monkeypatch.setattr(gpu_check, "check_engine", lambda *args: [])  # not under test here; saves time
    assert gpu_check.main(TINY_ARGS) == 1
    table = statuses(capsys.readouterr().out)
    assert table["CHTss: density follows schedule"] == "FAIL"
    assert table["CHTss: final density = target"] == "PASS"  # checked against the config, not the schedule
    assert [name for name, status in table.items() if status == "FAIL"] == ["CHTss: density follows schedule"]


@pytest.mark.slow  # a benchmark smoke run (the whole check on a tiny shape)
def test_a_section_that_raises_is_a_fail_row(gpu_check, capsys, monkeypatch):
    def broken(*args):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(gpu_check, "check_engine", broken)
    assert gpu_check.main(TINY_ARGS[:-2]) == 1  # also: default step-time limit may fail on a busy CPU
    captured = capsys.readouterr()
    assert re.search(r"^engine\s+FAIL\s+RuntimeError\s+Expected all tensors", captured.out, re.M)
    assert "CHTss: masked weights exactly 0" in captured.out  # the other sections still ran
    assert "Traceback" in captured.err


def test_masked_nonzero_count_sees_nan_and_inf(gpu_check, make_tiny_model):
    from hf_chts import SparseTrainingEngine, SparsifyConfig, sparsify

    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="set", target_density=0.5, update_interval=1))
    engine = SparseTrainingEngine(model, total_steps=10)
    assert gpu_check.count_masked_nonzero(engine) == 0
    layer = next(iter(engine.layers.values()))
    masked = (~layer.mask).nonzero()
    live = layer.mask.nonzero()
    with torch.no_grad():
        layer.weight[tuple(live[0])] = float("nan")  # live positions are not checked
        layer.weight[tuple(masked[0])] = float("nan")
        layer.weight[tuple(masked[1])] = float("-inf")
    assert gpu_check.count_masked_nonzero(engine) == 2


def test_cuda_requested_without_cuda_fails(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--device", "cuda"]) == 1
    assert statuses(capsys.readouterr().out) == {"device": "FAIL"}


def test_sparse_adamw_row_passes_and_fails_when_repack_loses_moments(gpu_check, monkeypatch):
    from hf_chts.sparse_adamw import SparseAdamW

    setup = gpu_check.load_setup(gpu_check.parse_args(TINY_ARGS))
    (row,) = gpu_check.check_sparse_adamw(setup, torch.device("cpu"))
    assert row.status == "PASS" and "bit-exact" in row.detail
    assert float(row.value.split("x")[0]) < 0.75  # 30 % of the sparsified layers' moments + the dense ones (tiny: many)

    def repack_zeroing(self, weight, old_mask, new_mask, keep):  # mutant: every link restarts at 0
        for key in ("exp_avg", "exp_avg_sq"):
            self.state[weight][key] = torch.zeros(int(new_mask.sum()))

    monkeypatch.setattr(SparseAdamW, "repack", repack_zeroing)
    (row,) = gpu_check.check_sparse_adamw(setup, torch.device("cpu"))
    assert row.status == "FAIL"
