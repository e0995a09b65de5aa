"""Tables, paired confidence intervals and learning-curve plots of bench/quality.py."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

try:
    from bench import _common as common
except ImportError:  # run as a script: python bench/quality.py
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore

# two-sided 95 % quantiles of Student's t by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
COMPARED_WITH_CHTSS = ("chts", "chts-released", "set")  # every CHTss variant − each of these, then each − dense


def paired_methods(methods) -> list[tuple[str, str]]:
    """The (a, b) pairs reported: every CHTss variant against CHTs (ours and released) and SET, the default
    CHTss (from density 1.0) against the other start densities, then every sparse method against dense."""
    present = list(dict.fromkeys(methods))
    pairs = [(a, b) for a in present if a.startswith("chtss") for b in COMPARED_WITH_CHTSS if b in present]
    if "chtss@1.0" in present:
        pairs += [("chtss@1.0", b) for b in present if b.startswith("chtss") and b != "chtss@1.0"]
    return pairs + [(a, "dense") for a in present if a != "dense" and "dense" in present]


def t_interval(differences: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95 % t-interval of the mean; low = high = nan with fewer than 2 values."""
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(differences) - 1, 1.96) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def selection_table(selection: list[dict], chosen: dict) -> str:
    lrs = sorted({r["lr"] for r in selection})
    rows = []
    for (method, density), group in _by(selection, "method", "density").items():
        by_lr = {r["lr"]: r for r in group}
        row = dict(method=method, density=f"{density:.2f}", chosen=common.fmt(chosen.get((method, density)), "g"))
        for lr in lrs:
            row[f"lr{lr:g}"] = f"{by_lr[lr]['val_ppl']:.2f}" if lr in by_lr else "-"
        rows.append(row)
    columns = [("method", "method"), ("density", "density")] + [(f"lr{lr:g}", f"val ppl @ {lr:g}") for lr in lrs]
    return common.table(rows, columns + [("chosen", "chosen LR")],
                        "LR selection: validation perplexity of the selection seed (lowest of the grid wins; "
                        "a column outside the grid is shown when such a run exists)")


def summarize(tested: list[dict]) -> list[dict]:
    dense = [r["test_ppl"] for r in tested if r["method"] == "dense"]
    dense_mean = statistics.mean(dense) if dense else float("nan")
    summary = []
    for (method, density), group in _by(tested, "method", "density").items():
        ppl_mean, ppl_std = common.mean_std([r["test_ppl"] for r in group])
        summary.append(dict(
            method=method, density=density, lr=group[0]["lr"], seeds=len(group), test_ppl_mean=ppl_mean,
            test_ppl_std=ppl_std, ratio_to_dense=ppl_mean / dense_mean,
            train_loss_mean=common.mean_std([r["train_loss"] for r in group])[0],
            val_ppl_mean=common.mean_std([r["val_ppl"] for r in group])[0],
            final_density=common.mean_std([r["final_density"] for r in group])[0],
            anp=common.mean_std([r["anp"] for r in group])[0], updates=group[0]["updates"],
            train_s=common.mean_std([r["train_seconds"] for r in group])[0],
            update_s=common.mean_std([r["update_seconds"] for r in group])[0],
        ))
    return sorted(summary, key=lambda s: (-s["density"], s["test_ppl_mean"]))


def test_table(summary: list[dict]) -> str:
    rows = [dict(method=s["method"], density=f"{s['density']:.2f}", lr=f"{s['lr']:g}", seeds=str(s["seeds"]),
                 ppl=f"{s['test_ppl_mean']:.2f} ± {s['test_ppl_std']:.2f}", ratio=f"{s['ratio_to_dense']:.3f}",
                 train=f"{s['train_loss_mean']:.3f}", final=f"{s['final_density']:.3f}", anp=f"{s['anp']:.3f}",
                 updates=str(s["updates"]), secs=f"{s['train_s']:.0f}", upd=f"{s['update_s']:.1f}")
            for s in summary]
    columns = [("method", "method"), ("density", "density"), ("lr", "LR"), ("seeds", "seeds"),
               ("ppl", "test ppl (mean ± std)"), ("ratio", "ratio to dense"), ("train", "train loss"),
               ("final", "final density"), ("anp", "ANP"), ("updates", "updates"), ("secs", "train s/run"),
               ("upd", "topo-update s/run")]
    return common.table(rows, columns, "Test perplexity at each method's chosen LR (lower is better); "
                                       "train loss = mean of the last 50 steps")


def paired_differences(tested: list[dict]) -> list[dict]:
    """Per-seed test-ppl differences a − b (same seed = same init and data order) and their 95 % t-interval."""
    by_key = {(r["method"], r["density"], r["seed"]): r for r in tested}
    densities = sorted({r["density"] for r in tested if r["method"] != "dense"}, reverse=True)
    result = []
    for density in densities:
        for a, b in paired_methods(r["method"] for r in tested):
            density_b = 1.0 if b == "dense" else density
            seeds = sorted(s for (m, d, s) in by_key if m == a and d == density and (b, density_b, s) in by_key)
            if not seeds:
                continue
            diffs = [by_key[(a, density, s)]["test_ppl"] - by_key[(b, density_b, s)]["test_ppl"] for s in seeds]
            mean, low, high = t_interval(diffs)
            result.append(dict(a=a, b=b, density=density, seeds=seeds, diffs=diffs, mean=mean, low=low, high=high))
    return result


def paired_table(pairs: list[dict]) -> str:
    rows = [dict(pair=f"{p['a']} − {p['b']}", density=f"{p['density']:.2f}",
                 diffs=" / ".join(f"{d:+.2f}" for d in p["diffs"]), mean=f"{p['mean']:+.2f}",
                 ci=f"[{p['low']:+.2f}, {p['high']:+.2f}]",
                 verdict="a better" if p["high"] < 0 else "b better" if p["low"] > 0 else "no difference shown")
            for p in pairs]
    columns = [("pair", "pair (a − b)"), ("density", "density"), ("diffs", "per-seed Δ test ppl"),
               ("mean", "mean Δ"), ("ci", "95% t-interval"), ("verdict", "verdict")]
    return common.table(rows, columns, "Paired per-seed differences of test perplexity (negative: a is better)")


def schedule_diagnostics(tested: list[dict]) -> list[dict]:
    """Per method: updates while the density is still ≥ 0.9 and the share of links each cut, and the harshest
    update (largest fraction of live links cut) with its step, LR and training loss beside dense's."""
    dense = {r["seed"]: r for r in tested if r["method"] == "dense"}

    def dense_loss_at(seed: int, step: int) -> float:  # the dense run's train loss at the nearest curve point
        if seed not in dense or step < dense[seed]["curve"][0]["step"] / 2:
            return float("nan")
        return min(dense[seed]["curve"], key=lambda p: abs(p["step"] - step))["train_loss"]

    result = []
    for (method, density), group in _by([r for r in tested if r.get("update_log")], "method", "density").items():
        harshest = [max(r["update_log"], key=lambda u: u["removed_fraction"]) for r in group]
        near_dense = [[u for u in r["update_log"] if u["density"] >= 0.9] for r in group]  # dense-phase updates
        result.append(dict(
            method=method, density=density,
            dense_phase_updates=statistics.mean(len(updates) for updates in near_dense),
            dense_phase_cut=statistics.mean(u["removed_fraction"] for us in near_dense for u in us)
            if any(near_dense) else float("nan"),
            mean_cut=statistics.mean(u["removed_fraction"] for r in group for u in r["update_log"]),
            # links (re)initialised to 0 per update / live links (runs recorded before the count existed: nan)
            mean_reset=statistics.mean(u.get("reset_fraction", math.nan) for r in group for u in r["update_log"]),
            dense_phase_reset=statistics.mean(u.get("reset_fraction", math.nan) for us in near_dense for u in us)
            if any(near_dense) else float("nan"),
            max_cut=statistics.mean(u["removed_fraction"] for u in harshest),
            max_cut_step=statistics.median(u["step"] for u in harshest),
            lr_at_max_cut=statistics.mean(u["lr"] for u in harshest),
            loss_at_max_cut=statistics.mean(u["train_loss"] for u in harshest),
            dense_loss_there=statistics.mean(dense_loss_at(r["seed"], u["step"]) for r, u in zip(group, harshest)),
        ))
    return sorted(result, key=lambda d: (-d["density"], d["method"]))


def diagnostics_table(diagnostics: list[dict]) -> str:
    rows = [dict(method=d["method"], density=f"{d['density']:.2f}", mean_cut=f"{d['mean_cut']:.3f}",
                 phase=f"{d['dense_phase_updates']:.0f}", phase_cut=common.fmt(d["dense_phase_cut"], ".3f"),
                 reset=common.fmt(d.get("mean_reset", math.nan), ".3f"),
                 phase_reset=common.fmt(d.get("dense_phase_reset", math.nan), ".3f"),
                 max_cut=f"{d['max_cut']:.3f}", step=f"{d['max_cut_step']:.0f}", lr=f"{d['lr_at_max_cut']:.2e}",
                 loss=f"{d['loss_at_max_cut']:.3f}", dense=common.fmt(d["dense_loss_there"], ".3f"))
            for d in diagnostics]
    columns = [("method", "method"), ("density", "density"), ("mean_cut", "mean cut/update"),
               ("reset", "reset/update"), ("phase", "updates at density ≥ 0.9"), ("phase_cut", "cut/update there"),
               ("phase_reset", "reset/update there"),
               ("max_cut", "max cut/update"), ("step", "at step"), ("lr", "LR there"), ("loss", "train loss there"),
               ("dense", "dense's train loss there")]
    return common.table(rows, columns, "Topology schedule: fraction of live links cut per update (scheduled "
                                       "pruning + removal) and reset to 0 per update (empty before it or cut by its "
                                       "decay pruning); mean over test seeds")


def plot_curves(tested: list[dict], out: Path) -> list[Path]:
    """One PNG per target density: validation and training loss vs step, mean over the test seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    dense = [r for r in tested if r["method"] == "dense"]
    for density in sorted({r["density"] for r in tested if r["method"] != "dense"}, reverse=True):
        figure, (val_axis, train_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
        groups = _by(dense + [r for r in tested if r["density"] == density and r["method"] != "dense"], "method")
        for (method,), group in sorted(groups.items()):
            steps = [p["step"] for p in group[0]["curve"]]
            for axis, key in ((val_axis, "val_loss"), (train_axis, "train_loss")):
                values = [statistics.mean(r["curve"][i][key] for r in group) for i in range(len(steps))]
                axis.plot(steps, [math.exp(v) for v in values], marker="o", markersize=3,
                          label=f"{method} (lr {group[0]['lr']:g}, {len(group)} seeds)",
                          linestyle="--" if method == "dense" else "-")
        for axis, name in ((val_axis, "validation"), (train_axis, "training (mean of the interval)")):
            axis.set_yscale("log")
            axis.set_xlabel("optimizer step")
            axis.set_ylabel(f"{name} perplexity")
            axis.grid(True, which="both", alpha=0.3)
        val_axis.legend(fontsize=8)
        figure.suptitle(f"bench/quality.py learning curves, target density {density:g} (mean over test seeds)")
        figure.tight_layout()
        path = out / f"curves_density{density:g}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        paths.append(path)
    return paths


def side_by_side_table(before: list[dict], after: list[dict], label: str) -> str:
    """Test perplexity per (method, density) of an earlier report (``before``: its quality.json summary) beside
    this one's, with each run's chosen LR; a row missing on one side shows '-'."""
    old = {(r["method"], r["density"]): r for r in before}
    new = {(r["method"], r["density"]): r for r in after}
    rows = []
    for key in sorted(set(old) | set(new), key=lambda k: (-k[1], k[0])):
        a, b = old.get(key), new.get(key)
        cell = (lambda r: f"{r['test_ppl_mean']:.2f} ± {r['test_ppl_std']:.2f} (lr {r['lr']:g}, {r['seeds']} seeds)"
                if r else "-")
        change = f"{b['test_ppl_mean'] - a['test_ppl_mean']:+.2f}" if a and b else "-"
        rows.append(dict(method=key[0], density=f"{key[1]:.2f}", before=cell(a), after=cell(b), change=change))
    columns = [("method", "method"), ("density", "density"), ("before", f"test ppl {label}"),
               ("after", "test ppl now"), ("change", "change")]
    return common.table(rows, columns, f"Side by side: {label} and now")


def write_report(out: Path, selection: list[dict], chosen: dict, tested: list[dict], budget: str,
                 machine: dict, compare_with: Path | None = None) -> dict:
    """Write quality_table.txt, quality.csv, quality.json and the curve PNGs into ``out``; return the text.
    ``compare_with``: an earlier result folder whose quality.json summary is shown beside this one."""
    summary = summarize(tested)
    pairs = paired_differences(tested)
    diagnostics = schedule_diagnostics(tested)
    parts = [budget, selection_table(selection, chosen), test_table(summary), paired_table(pairs),
             diagnostics_table(diagnostics)]
    if compare_with is not None:
        import json

        earlier = json.loads((Path(compare_with) / "quality.json").read_text(encoding="utf-8"))["summary"]
        parts.append(side_by_side_table(earlier, summary, f"in {Path(compare_with).name}"))
    text = "\n\n".join(parts)
    (out / "quality_table.txt").write_text(text + "\n", encoding="utf-8")
    common.write_csv(out / "quality.csv", summary)
    plots = plot_curves(tested, out) if tested else []
    common.write_json(out / "quality.json", dict(
        budget=budget, machine=machine, chosen_lr=[dict(method=m, density=d, lr=lr) for (m, d), lr in chosen.items()],
        summary=summary, paired=pairs, diagnostics=diagnostics))
    return dict(text=text, summary=summary, paired=pairs, diagnostics=diagnostics, plots=plots)
