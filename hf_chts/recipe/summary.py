"""The run summary: ``run_summary.json``, the training-curves plot and the printed summary."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ..config import SparsifyConfig
from ..io_utils import atomic_path, atomic_write_text
from ..schedules import SparseSchedule
from .data import LMData
from .schema import SUMMARY_FILE, Recipe, sparsify_config

logger = logging.getLogger(__name__)

FINAL_DIR = "final"


PLOT_FILE = "training_curves.png"


def _safe_exp(value: float | None) -> float | None:
    if value is None:
        return None
    return math.exp(value) if value < 700 else math.inf


def sparsity_history(callback) -> list[dict[str, Any]]:
    engine = getattr(callback, "engine", None)
    history = getattr(engine, "history", None) or []
    keep = ("step", "target_density", "density", "anp", "overlap", "removed", "regrown", "reset", "removal_fraction")
    return [{key: getattr(stats, key) for key in keep} for stats in history]


def loss_curves(log_history: list[dict]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "loss": e["loss"], **({"learning_rate": e["learning_rate"]} if "learning_rate" in e else {})}
             for e in log_history if "loss" in e and "step" in e]
    evaluation = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": evaluation}


METHOD_NAMES = {"chtss": "CHTss", "chts": "CHTs", "cht": "CHT", "set": "SET", "rigl": "RigL", "gmp": "GMP",
                "dense": "dense"}


def dense_baseline_record(dense_summary: dict[str, Any]) -> dict[str, Any]:
    """What a sparse run's summary keeps of its dense baseline's summary (``eval.compare_dense``)."""
    keep = ("val_loss", "val_ppl", "train_loss", "steps", "final_density", "wall_time_seconds", "loss_curve")
    return {**{key: dense_summary.get(key) for key in keep},
            "output_dir": str(Path(dense_summary["checkpoint"]).parent)}


def comparison_line(summary: dict[str, Any]) -> str | None:
    """``"CHTss 30 %: val ppl 21.4, dense: 19.8"`` when the run has a dense baseline, else ``None``."""
    dense = summary.get("dense_baseline")
    if not dense:
        return None

    def ppl(value):
        return "n/a" if value is None else f"{value:.3f}"

    name = METHOD_NAMES.get(summary["method"], summary["method"])
    return f"{name} {summary['target_density'] * 100:g} %: val ppl {ppl(summary['val_ppl'])}, dense: {ppl(dense['val_ppl'])}"


def build_summary(recipe: Recipe, trainer, callback, data: LMData, *, report, metrics: dict, ranks: list,
                  reload_check: dict | None, lm_eval: dict | None, final_dir: Path, started: float,
                  train_output=None, dense_baseline: dict | None = None) -> dict[str, Any]:
    """The ``run_summary.json`` record of a finished run (``report``: the trained model's ``SparsityReport``;
    ``dense_baseline``: :func:`dense_baseline_record` of the same recipe trained dense, or ``None``)."""
    config = sparsify_config(recipe)
    val_loss = metrics.get("eval_loss")
    return {
        "recipe_name": Path(recipe.source).stem if recipe.source else "recipe",
        "recipe_path": recipe.source,
        "recipe": recipe.to_dict(),
        "method": config.method,
        "target_density": config.target_density,
        "final_density": report.density,
        "final_anp": report.anp,
        "live_links": report.live_links,
        "total_links": report.total_links,
        "val_loss": val_loss,
        "val_ppl": _safe_exp(val_loss),
        "dense_baseline": dense_baseline,
        "reload_check": reload_check,
        "lm_eval": lm_eval,
        "steps": trainer.state.global_step,
        "train_loss": getattr(train_output, "training_loss", None),
        "wall_time_seconds": time.time() - started,
        "world_size": trainer.args.world_size,
        "ranks": ranks,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "data": data.stats,
        "checkpoint": str(final_dir),
        "sparsity_history": sparsity_history(callback),
        "loss_curve": loss_curves(trainer.state.log_history),
    }


def write_summary(recipe: Recipe, summary: dict[str, Any]) -> None:
    """Draw the plot (``summary["plot"]``: its path, or ``None`` without matplotlib), write ``run_summary.json``
    atomically and print the summary."""
    out = recipe.output_dir
    config = sparsify_config(recipe)
    summary["plot"] = str(out / PLOT_FILE) if plot_training_curves(summary, config, out / PLOT_FILE) else None
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary, recipe)


def plot_training_curves(summary: dict, config: SparsifyConfig, path: Path) -> bool:
    """``training_curves.png``: density target vs actual, loss, ANP. Skipped (False) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("hf_chts: matplotlib is not installed; skipping training_curves.png (pip install 'hf_chts[plot]')")
        return False
    steps = summary["steps"]
    history = summary["sparsity_history"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if not config.is_dense and steps > 0:
        try:
            schedule = SparseSchedule.from_config(config, steps)
            grid = list(range(0, steps + 1, max(1, steps // 400)))
            ax.plot(grid, [schedule.density_at(s) if s >= schedule.update_interval else config.initial_density
                           for s in grid], label="target (schedule)", drawstyle="steps-post")
        except ValueError:
            pass
    if history:
        ax.plot([h["step"] for h in history], [h["density"] for h in history], "o", ms=3, label="actual (updates)")
    ax.set(title="density", xlabel="optimizer step", ylabel="density")
    if ax.get_legend_handles_labels()[0]:  # a dense run has no schedule and no updates
        ax.legend()
    ax = axes[1]
    curves = summary["loss_curve"]
    if curves["train"]:
        ax.plot([e["step"] for e in curves["train"]], [e["loss"] for e in curves["train"]], label="train loss")
    if curves["eval"]:
        ax.plot([e["step"] for e in curves["eval"]], [e["eval_loss"] for e in curves["eval"]], "s-", label="val loss")
    dense = (summary.get("dense_baseline") or {}).get("loss_curve") or {"train": [], "eval": []}
    if dense["train"]:
        ax.plot([e["step"] for e in dense["train"]], [e["loss"] for e in dense["train"]], "--", alpha=0.7,
                label="dense train loss")
    if dense["eval"]:
        ax.plot([e["step"] for e in dense["eval"]], [e["eval_loss"] for e in dense["eval"]], "s--",
                label="dense val loss")
    ax.set(title="loss", xlabel="optimizer step", ylabel="cross-entropy")
    ax.legend()
    ax = axes[2]
    if history:
        ax.plot([h["step"] for h in history], [h["anp"] for h in history], "o-", ms=3)
    ax.set(title="active neuron percentage (ANP)", xlabel="optimizer step", ylabel="ANP", ylim=(0, 1.05))
    comparison = comparison_line(summary)
    fig.suptitle(f"{summary['recipe_name']}: {config.method}, target density {config.target_density}"
                 + (f"  ({comparison})" if comparison else ""))
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a temp file in the same folder, then os.replace
            fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return True


def eval_command_line(recipe: Recipe, checkpoint: Path, lm_eval: dict | None = None) -> str:
    """The ``hf-chts eval`` command that evaluates the saved checkpoint with the run's tasks."""
    parts = ["hf-chts", "eval", str(checkpoint)]
    tasks = list(lm_eval["tasks"]) if lm_eval else list(recipe.eval.tasks)
    if lm_eval and lm_eval.get("include_path"):
        parts += ["--include-path", lm_eval["include_path"]]
    parts += ["--tasks", ",".join(tasks) if tasks else "lambada_openai,hellaswag"]
    if recipe.eval.limit is not None:
        parts += ["--limit", str(recipe.eval.limit)]
    return " ".join(parts)


def print_summary(summary: dict, recipe: Recipe) -> None:
    ppl = summary["val_ppl"]
    lines = [
        "",
        "=" * 72,
        f"hf_chts run finished: {summary['recipe_name']} ({summary['method']}, {summary['steps']} steps, "
        f"{summary['wall_time_seconds']:.1f} s, {summary['world_size']} process(es))",
        f"  final density      {summary['final_density']:.4f} (target {summary['target_density']})",
        f"  ANP                {summary['final_anp']:.4f}",
        f"  validation PPL     {ppl:.3f}" if ppl is not None else "  validation PPL     (not evaluated)",
    ]
    if comparison_line(summary):
        lines.append(f"  vs dense baseline  {comparison_line(summary)} ({summary['dense_baseline']['output_dir']})")
    if summary.get("reload_check"):
        check = summary["reload_check"]
        lines.append(f"  reload check       in-memory loss {check['in_memory_loss']:.6f} vs reloaded "
                     f"{check['reloaded_loss']:.6f} ({'match' if check['match'] else 'MISMATCH'})")
    if (summary.get("lm_eval") or {}).get("skipped"):
        lines.append(f"  lm-eval            skipped: {summary['lm_eval']['skipped']}")
    if summary.get("lm_eval"):
        for task, metrics in summary["lm_eval"]["metrics"].items():
            shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
            lines.append(f"  lm-eval {task:<28} {shown}")
    lines += [
        f"  checkpoint         {summary['checkpoint']}",
        f"  summary            {recipe.output_dir / SUMMARY_FILE}",
        f"  plot               {summary.get('plot') or '(skipped)'}",
        f"  evaluate it with:  {eval_command_line(recipe, Path(summary['checkpoint']), summary.get('lm_eval'))}",
        "=" * 72,
    ]
    print("\n".join(lines))
