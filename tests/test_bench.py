"""The benchmark scripts in bench/ keep working: each one's --quick mode runs and writes finite numbers.

These are smoke tests, not benchmarks: tiny shapes, a few steps, output into tmp_path.
"""

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

# benchmark smoke runs (they train) are in the slow tier; the pure helpers' unit tests stay in the default tier

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


FAKE_DICTIONARY_ENTRY = """{word} \\{word}"i*ty\\, n. [L. {{{word}us}}.]
   1. The state of being {word}; a {word} thing, as {{seen}} in the {field}.
      [1913 Webster]

            The {word} of the {field} was seen afar.       --Milton.
      [1913 Webster]

"""


def fake_dictionary(path, entries=400):
    """A small dictd-style text (never the GCIDE data set): ``entries`` made-up entries."""
    words = ["amber", "brook", "cinder", "dune", "ember", "fable", "glade", "harbor", "inlet", "juniper"]
    fields = ["meadow", "valley", "river", "forest", "harbor"]
    text = "00-database-info\n   made-up entries for a test\n\n" + "".join(
        FAKE_DICTIONARY_ENTRY.format(word=f"{words[i % 10]}{i}", field=fields[i % 5]) for i in range(entries))
    path.write_text(text)
    return path


def test_corpus_entries_are_cleaned_and_split_without_overlap(tmp_path):
    corpus = load("_corpus")
    entries = corpus.dictionary_entries(fake_dictionary(tmp_path / "dict.txt", entries=100).read_text())
    assert len(entries) == 100  # the 00-database header entry is skipped
    assert entries[3] == ("dune3 , n. [L. dune3us.] 1. The state of being dune3; a dune3 thing, as seen in the "
                          "forest. The dune3 of the forest was seen afar. --Milton.")
    splits = corpus.split_documents(entries, shards=20)
    assert splits["val"] == entries[35:40] and splits["test"] == entries[85:90]  # shards 7 and 17 of 20
    assert splits["train"] == entries[:35] + entries[40:85] + entries[90:]
    with pytest.raises(FileNotFoundError, match="apt-get install dict-gcide"):
        corpus.read_corpus_text(tmp_path / "missing.dict.dz")


def test_paired_t_interval_and_pairing_by_seed():
    report = load("_quality_report")
    mean, low, high = report.t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half width 4.303 / sqrt(3)
    assert mean == 2.0 and abs(high - low - 2 * 4.303 / 3 ** 0.5) < 1e-9
    rows = [dict(method=m, density=d, seed=s, test_ppl=p) for m, d, s, p in [
        ("chtss@1.0", 0.3, 0, 50.0), ("chtss@1.0", 0.3, 1, 52.0), ("chtss@1.0", 0.3, 2, 57.0),
        ("chts", 0.3, 0, 51.0), ("chts", 0.3, 1, 55.0), ("dense", 1.0, 1, 60.0), ("dense", 1.0, 2, 58.0)]]
    pairs = {(p["a"], p["b"]): p for p in report.paired_differences(rows)}
    assert pairs[("chtss@1.0", "chts")]["seeds"] == [0, 1] and pairs[("chtss@1.0", "chts")]["diffs"] == [-1.0, -3.0]
    assert pairs[("chtss@1.0", "dense")]["seeds"] == [1, 2] and pairs[("chtss@1.0", "dense")]["diffs"] == [-8.0, -1.0]
    assert ("chtss@1.0", "set") not in pairs


def test_learning_rate_is_chosen_on_validation_loss_only():
    quality = load("quality")
    rows = [dict(lr=1e-3, val_loss=4.0, test_loss=3.0), dict(lr=3e-3, val_loss=3.5, test_loss=3.9),
            dict(lr=1e-2, val_loss=3.7, test_loss=2.0)]
    assert quality.choose_lr(rows) == 3e-3


def test_paper_protocol_scales_the_paper_run_down_in_proportion():
    quality = load("quality")
    args = quality.parse_args(["--protocol", "paper", "--corpus", "unused"])
    tokens = args.steps * args.batch * args.seq
    assert tokens / quality.sparsified_params(args) >= 20  # the paper trains ~50 tokens per parameter
    interval = quality.update_interval(args)
    assert int(0.75 * args.steps) // interval >= 70  # ≥ 70 topology updates while t ≤ 0.75 T
    assert len(args.lrs) >= 3 and args.methods == quality.PAPER_METHODS and args.zeta == 0.1
    assert {"dense", "set", "rigl", "chts", "chtss@1.0", "chtss-released@0.5", "chts-released"} <= set(args.methods)
    released = quality.sparsify_config(args, "chtss-released@0.5", 0.3, seed=0)
    assert released.parity and released.initial_density == 0.5 and released.decay_end_fraction == 0.8
    # the released 10-step re-warm-up per Δ = 100, scaled to this Δ
    assert released.lr_rewarmup_steps == max(1, round(0.1 * interval))
    assert not quality.sparsify_config(args, "chts", 0.3, seed=0).parity
    assert quality.parse_args(["--protocol", "paper", "--hidden", "48"]).hidden == 48  # explicit flags win
    short = quality.parse_args([])
    assert short.steps == 300 and short.protocol == "short"


def test_lr_grid_is_extended_until_the_choice_is_inside():
    quality = load("quality")
    best = 0.05  # validation loss is lowest at 0.05, beyond the grid's upper edge
    calls = []

    def run_at(lr):
        calls.append(lr)
        return dict(lr=lr, val_loss=abs(math.log(lr / best)))

    grid, rows = quality.select_on_grid(run_at, [3e-3, 6e-3, 1.2e-2], extensions=5)
    chosen = quality.choose_lr(rows)
    assert grid[0] < chosen < grid[-1] and len(rows) == len(grid)
    assert grid[:3] == [3e-3, 6e-3, 1.2e-2] and grid[3] == pytest.approx(2.4e-2) and grid[4] == pytest.approx(4.8e-2)
    assert quality.select_on_grid(run_at, [3e-3, 6e-3, 1.2e-2], extensions=0)[0] == [3e-3, 6e-3, 1.2e-2]
    assert quality.select_on_grid(lambda lr: None, [1e-3, 2e-3, 4e-3], extensions=3)[0] == [1e-3, 2e-3, 4e-3]


def test_every_chtss_variant_is_paired_with_chts_set_and_every_method_with_dense():
    report = load("_quality_report")
    pairs = report.paired_methods(["dense", "set", "chts", "chtss@1.0", "chtss-released@0.5", "chts-released"])
    assert ("chtss@1.0", "chts") in pairs and ("chtss@1.0", "set") in pairs and ("chtss@1.0", "chts-released") in pairs
    assert ("chtss-released@0.5", "chts-released") in pairs and ("chtss@1.0", "chtss-released@0.5") in pairs
    assert {a for a, b in pairs if b == "dense"} == {"set", "chts", "chtss@1.0", "chtss-released@0.5", "chts-released"}
    assert ("set", "chts") not in pairs and ("dense", "dense") not in pairs


def test_side_by_side_table_pairs_rows_by_method_and_density():
    report = load("_quality_report")
    row = lambda m, d, ppl, lr: dict(method=m, density=d, test_ppl_mean=ppl, test_ppl_std=1.0, lr=lr, seeds=3)
    text = report.side_by_side_table([row("chtss@1.0", 0.3, 107.09, 3e-3), row("gmp", 0.1, 9.0, 1e-2)],
                                     [row("chtss@1.0", 0.3, 95.5, 1e-2), row("set", 0.3, 60.0, 1e-2)], "before")
    line = next(l for l in text.splitlines() if l.startswith("chtss@1.0"))
    assert "107.09" in line and "95.50" in line and "-11.59" in line
    assert "-" == next(l for l in text.splitlines() if l.startswith("set")).split()[2]  # no earlier row
    assert next(l for l in text.splitlines() if l.startswith("gmp")).rstrip().endswith("-")


@pytest.mark.slow
def test_quality_quick(tmp_path):
    quality = load("quality")
    corpus_file = fake_dictionary(tmp_path / "dict.txt")
    argv = ["--quick", "--corpus", str(corpus_file), "--out", str(tmp_path / "out"), "--no-progress"]
    result = quality.main(argv)
    selection, tested = result["selection"], result["tested"]
    assert len(selection) == 4  # dense and chtss@1.0, two learning rates each, selection seed 0
    for method in ("dense", "chtss@1.0"):
        rows = [r for r in selection if r["method"] == method]
        best = min(rows, key=lambda r: r["val_loss"])["lr"]
        density = 1.0 if method == "dense" else 0.3
        assert result["chosen"][(method, density)] == best
        assert sorted(r["seed"] for r in tested if r["method"] == method) == [0, 1]
        assert all(r["lr"] == best for r in tested if r["method"] == method)
    chtss = [r for r in tested if r["method"] == "chtss@1.0"]
    assert all(abs(r["final_density"] - 0.3) < 1e-3 and r["updates"] >= 10 for r in chtss)
    for run in chtss:  # removed_fraction = links cut / links live just before that update
        before = [run["initial_density"]] + [u["density"] for u in run["update_log"]]
        for density, update in zip(before, run["update_log"]):
            assert 0 < update["removed_fraction"] <= 1
            live_before = density * run["total_links"]
            assert abs(update["removed_fraction"] * live_before - update["removed"]) <= 1e-6 * update["removed"] + 1e-6
    assert all(math.isfinite(r["test_ppl"]) and len(r["curve"]) >= 3 for r in tested)
    runs = (tmp_path / "out" / "quality_runs.jsonl").read_text().splitlines()
    assert len(runs) == 6  # 4 selection runs + 2 new test runs (seed 0 at the chosen LR is reused)
    assert quality.main(argv)["tested"] == tested  # a restart trains nothing and reports the same rows
    assert (tmp_path / "out" / "quality_runs.jsonl").read_text().splitlines() == runs
    assert (tmp_path / "out" / "curves_density0.3.png").stat().st_size > 1000
    assert "chtss@1.0 − dense" in (tmp_path / "out" / "quality_table.txt").read_text()


@pytest.mark.slow
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


@pytest.mark.slow
def test_regrowth_task_quick(tmp_path):
    task = load("regrowth_task")
    result = task.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    rows = read_csv(tmp_path / "regrowth_task_quick.csv")
    assert [r["variant"] for r in rows] == task.QUICK_VARIANTS
    for row in rows:
        assert 0.0 <= float(row["acc_mean"]) <= 1.0 and math.isfinite(float(row["loss_mean"]))
        assert abs(float(row["density"]) - 0.05) < 0.01
    assert all(r["updates"] > 0 for r in result["runs"])


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow  # six training subprocesses
def test_sparse_adamw_quick(tmp_path):
    import json

    bench = load("sparse_adamw")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "sparse_adamw_quick.json").read_text())
    assert [row["density"] for row in record["memory"]] == [0.3, 0.1, 0.05]
    for row in record["memory"]:  # the sparsified layers' moments shrink with density; dense ones stay
        assert row["sparse_adamw"]["state_bytes"] < row["adamw"]["state_bytes"]
        assert finite(row["sparse_adamw"]["peak_rss"]) and row["sparse_adamw"]["peak_rss"] > 0
    states = [row["sparse_adamw"]["state_bytes"] for row in record["memory"]]
    assert states == sorted(states, reverse=True)
    assert {(row["tokens"], row["variant"]) for row in record["time"]} == {
        (tokens, label) for tokens in (512, 2048) for label in bench.LABELS}
    assert all(finite(row["step_s"]) and row["step_s"] > row["optimizer_step_s"] > 0 for row in record["time"])
    assert "SparseAdamW" in (tmp_path / "sparse_adamw_quick.txt").read_text()
