"""The benchmark scripts in bench/ keep working: each one's --quick mode runs and writes finite numbers.

These are smoke tests, not benchmarks: tiny shapes, a few steps, output into tmp_path.
"""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark smoke runs: the slow tier

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_quality_quick(tmp_path):
    quality = load("quality")
    result = quality.main(["--quick", "--out", str(tmp_path), "--no-progress", "--fresh"])
    rows = read_csv(tmp_path / "quality_quick.csv")
    assert [(r["method"], float(r["density"])) for r in rows] == [("dense", 1.0), ("chtss", 0.3)]
    for row in rows:
        for key in ("ppl_mean", "ratio_to_dense", "anp", "final_density"):
            assert math.isfinite(float(row[key])), (row["method"], key)
    chtss = next(r for r in result["summary"] if r["method"] == "chtss")
    assert abs(chtss["final_density"] - 0.3) < 1e-3 and chtss["updates"] >= 10
    assert "chtss" in result["table"] and "ratio to dense" in result["table"]
    data = json.loads((tmp_path / "quality_quick.json").read_text())
    assert len(data["runs"]) == 2


def test_speed_quick(tmp_path):
    speed = load("speed")
    result = speed.main(["--quick", "--out", str(tmp_path), "--no-progress"])["results"]
    step = {(r["optimizer"], r["method"]): r for r in result["step"]}
    peers = [m for m in ("sparsimony SET", "torch.ao WeightNormSparsifier") if ("adamw", m) in step]
    assert set(step) == {(o, m) for o in ("adamw", "adamw-fused") for m in ["dense", "hf_chts"] + peers}
    assert "torch.ao WeightNormSparsifier" in peers  # ships with torch: never silently skipped
    for (optimizer, method), row in step.items():
        assert finite(row["wall_ms"]) and finite(row["cpu_ms"]) and row["ratio_cpu_pairs"] > 0, (optimizer, method)
        if method == "dense":
            assert row["density"] is None and row["ratio_wall"] == row["ratio_cpu"] == 1.0
        else:  # every sparse contender really masks the same layers at the same density
            assert abs(row["density"] - 0.3) < 0.01, (optimizer, method, row["density"])
    masking = {row["kernel"]: row for row in result["masking"]}
    assert masking["zero_masked_: int view * bool mask (hf_chts)"]["exact"]
    assert not masking["tensor.mul_(bool mask) (hf_chts before)"]["exact"]  # 0 * NaN is NaN
    assert all(finite(row["cpu_ms"]) for row in result["masking"])
    assert finite(result["sqrt"]["dense_ms"]) and finite(result["sqrt"]["masked_ms"])
    assert [r["layer"] for r in result["update"]] == ["64x64", "128x128"]
    for row in result["update"]:
        for key in ("remove_s", "ch2_matrix_s", "ch2_chunked_s", "sampling_s", "regrow_total_s", "path_ch3_s"):
            assert finite(row[key]), key
        assert row["chunk_max_abs_diff"] < 1e-3  # chunking does not change the scores
    assert finite(result["overhead"]["overhead_pct_micro_batch"])
    assert result["memory"]["mask_bytes_per_weight"] <= 1.0
    assert finite(result["memory"]["sparse_peak_rss_mb"])
    checkpoint = result["checkpoint"]
    assert finite(checkpoint["compact_over_dense"]) and checkpoint["compact_bytes"] < checkpoint["dense_bytes"]
    assert len(read_csv(tmp_path / "speed_quick_update.csv")) == 2
    assert (tmp_path / "speed_quick.txt").read_text().strip()


def test_regrowth_task_quick(tmp_path):
    task = load("regrowth_task")
    result = task.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    rows = read_csv(tmp_path / "regrowth_task_quick.csv")
    assert [r["variant"] for r in rows] == task.QUICK_VARIANTS
    for row in rows:
        assert 0.0 <= float(row["acc_mean"]) <= 1.0 and math.isfinite(float(row["loss_mean"]))
        assert abs(float(row["density"]) - 0.05) < 0.01
    assert all(r["updates"] > 0 for r in result["runs"])


def test_inference_quick(tmp_path):
    inference = load("inference")
    result = inference.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"dense", "csr", "auto"}
    for row in rows.values():
        for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "weight_ratio", "max_logit_diff"):
            assert finite(row[key]), (row["variant"], key)
        assert row["max_logit_diff"] <= 1e-4
    assert rows["csr"]["weight_ratio"] < 0.25 and rows["dense"]["weight_ratio"] == 1.0
    memory = {row["load"]: row["peak_load_mb"] for row in result["memory"]}
    assert len(memory) == 3 and all(value is None or value >= 0 for value in memory.values())
    for name in ("inference_quick.png", "inference_quick.txt", "inference_quick_memory.json"):
        assert (tmp_path / name).exists(), name


def test_train_step_contenders_time_the_same_masked_layers():
    """One round of the step comparison on a tiny LLaMA (every contender, one optimizer)."""
    import argparse

    speed = load("speed")
    shape = speed.QUICK_SHAPES["tiny-quick"]
    args = argparse.Namespace(optimizers=["adamw"], density=0.3, repeats=1, no_peers=False)
    rows, skipped = speed.train_step.step_rows("tiny", shape, lambda: speed.build_llama(shape), args)
    methods = [row["method"] for row in rows]
    assert methods[:2] == ["dense", "hf_chts"] and "torch.ao WeightNormSparsifier" in methods
    assert ("sparsimony SET" in methods) != ("sparsimony" in skipped)
    for row in rows[1:]:
        assert abs(row["density"] - 0.3) < 0.01, row["method"]
        assert finite(row["ratio_cpu"]) and row["repeats"] == 1
    built, _ = speed.train_step.contenders(lambda: speed.build_llama(shape), "adamw", 0.3)
    targets = built[1].targets
    assert len(targets) == 7 * shape["layers"] and all(c.targets == targets for c in built[2:])
