"""End of a run: evaluation, sparse checkpoint and reload check, lm-eval, run summary, plot."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..config import SparsifyConfig
from .data import LMData, collate_blocks
from .schema import SUMMARY_FILE, Recipe, sparsify_config

FINAL_DIR = "final"
PLOT_FILE = "training_curves.png"


def validation_loss(model, dataset, batch_size: int = 8) -> float:
    """Token-mean next-token loss of ``model`` over packed blocks (fp32, no autocast, deterministic)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate_blocks([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = model(**batch).loss
            tokens = batch["labels"][:, 1:].numel()
            total += float(loss) * tokens
            count += tokens
    model.train(was_training)
    return total / max(count, 1)


def _safe_exp(value: float | None) -> float | None:
    if value is None:
        return None
    return math.exp(value) if value < 700 else math.inf


def sparsity_history(callback) -> list[dict[str, Any]]:
    engine = getattr(callback, "engine", None)
    history = getattr(engine, "history", None) or []
    keep = ("step", "target_density", "density", "anp", "overlap", "removed", "regrown", "removal_fraction")
    return [{key: getattr(stats, key) for key in keep} for stats in history]


def loss_curves(log_history: list[dict]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "loss": e["loss"], **({"learning_rate": e["learning_rate"]} if "learning_rate" in e else {})}
             for e in log_history if "loss" in e and "step" in e]
    evaluation = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": evaluation}


def plot_training_curves(summary: dict, config: SparsifyConfig, path: Path) -> bool:
    """``training_curves.png``: density target vs actual, loss, ANP. Skipped (False) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hf_chts: matplotlib is not installed; skipping training_curves.png (pip install 'hf_chts[plot]')")
        return False
    from ..schedules import SparseSchedule

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
    ax.legend()
    ax = axes[1]
    curves = summary["loss_curve"]
    if curves["train"]:
        ax.plot([e["step"] for e in curves["train"]], [e["loss"] for e in curves["train"]], label="train loss")
    if curves["eval"]:
        ax.plot([e["step"] for e in curves["eval"]], [e["eval_loss"] for e in curves["eval"]], "s-", label="val loss")
    ax.set(title="loss", xlabel="optimizer step", ylabel="cross-entropy")
    ax.legend()
    ax = axes[2]
    if history:
        ax.plot([h["step"] for h in history], [h["anp"] for h in history], "o-", ms=3)
    ax.set(title="active neuron percentage (ANP)", xlabel="optimizer step", ylabel="ANP", ylim=(0, 1.05))
    fig.suptitle(f"{summary['recipe_name']}: {config.method}, target density {config.target_density}")
    fig.tight_layout()
    from ..io_utils import atomic_path

    try:
        with atomic_path(path) as tmp:  # a temp file in the same folder, then os.replace
            fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return True


def _gather_ranks() -> list[dict[str, Any]]:
    """(rank, pid, host) of every process; one entry when not distributed."""
    import socket

    import torch.distributed as dist

    me = {"rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "host": socket.gethostname()}
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, me)
        return gathered
    return [me]


def run_lm_eval(recipe: Recipe, model, tokenizer, data: LMData) -> dict[str, Any] | None:
    """lm-eval tasks (and tasks built from held-out text) on ``model``; main process only."""
    from .. import evaluation

    tasks = list(recipe.eval.tasks)
    include_path = None
    if recipe.eval.local_task_from_heldout:
        include_path = recipe.output_dir / "lm_eval_tasks"
        texts = data.validation_texts[: recipe.eval.local_task_documents]
        tasks.extend(evaluation.write_local_tasks(include_path, texts, seed=recipe.run.seed))
    if not tasks:
        return None
    device = str(next(model.parameters()).device)
    results = evaluation.evaluate_model(model, tokenizer, tasks, include_path=include_path,
                                        batch_size=recipe.eval.batch_size, limit=recipe.eval.limit, device=device)
    if results is None:
        return None
    print(evaluation.results_table(results))
    return {"tasks": tasks, "include_path": str(include_path) if include_path else None,
            "metrics": evaluation.finite_metrics(results), "results": evaluation.jsonable_results(results)}


def weights_are_sharded(model) -> bool:
    """True when a sparse layer's weight is a DTensor (FSDP2 ``fully_shard``): forward passes are collective."""
    from ..layers import sparse_layers

    return any(layer.is_sharded for layer in sparse_layers(model).values())


def _local_device(model) -> torch.device:
    parameter = next(model.parameters())
    return getattr(parameter, "to_local", lambda: parameter)().device


def _save_gathered(model, full_state_dict: dict, final_dir: Path, tokenizer) -> None:
    """Main process, sharded weights: write ``final_dir`` from the gathered full state dict.

    ``save_sparse`` reads the (sharded) model's own weights, so the weights come
    from ``full_state_dict`` (masked again with the full masks, which every rank
    holds) through the class's ``save_pretrained``; ``write_sparsity_files`` adds
    ``sparsity.safetensors`` and ``sparsify_config.json`` from the full masks.
    """
    from ..checkpointing.format import weight_key
    from ..checkpointing.saving import write_sparsity_files
    from ..layers import sparse_layers

    state = dict(full_state_dict)
    for name, layer in sparse_layers(model).items():
        key = weight_key(name)
        tensor = state.get(key)
        keep = layer.storage_view(layer.mask)
        if torch.is_tensor(tensor) and tensor.shape == keep.shape:
            state[key] = tensor * keep.to(device=tensor.device, dtype=tensor.dtype)
        else:
            raise ValueError(f"hf_chts: the gathered state dict has no full weight {key!r} for the sparse layer "
                             f"{name!r} (got {None if tensor is None else tuple(tensor.shape)})")
    final_dir.mkdir(parents=True, exist_ok=True)
    type(model).save_pretrained(model, str(final_dir), state_dict=state, is_main_process=True)
    write_sparsity_files(model, final_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(final_dir))


def finish_run(recipe: Recipe, trainer, callback, tokenizer, data: LMData, *, started: float,
               train_output=None) -> dict[str, Any]:
    """Evaluate, save the sparse checkpoint, reload and re-check it, run lm-eval, write the summary and plot.

    Every process must call it (evaluation is collective); only the main
    process writes files. Returns the summary (the main process's copy).
    """
    from ..checkpoint import load_sparse, save_sparse
    from ..model import sparsity_report

    out = recipe.output_dir
    model = trainer.model
    is_main = trainer.is_world_process_zero()
    config = sparsify_config(recipe)
    metrics = trainer.evaluate() if recipe.eval.perplexity else {}
    val_loss = metrics.get("eval_loss")
    ranks = _gather_ranks()
    final_dir = out / FINAL_DIR
    summary: dict[str, Any] = {}
    sharded = weights_are_sharded(model)
    # FSDP2: a forward pass and full_tensor() are collective, so nothing below may run them on one rank.
    # Every rank takes part in gathering the full state dict; the main process writes it.
    full_state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if is_main:
        report = sparsity_report(model)
        if sharded:
            _save_gathered(trainer.accelerator.unwrap_model(model), full_state_dict, final_dir, tokenizer)
            del full_state_dict
        else:
            save_sparse(model, str(final_dir), tokenizer=tokenizer)
        print(f"hf_chts: sparse checkpoint saved to {final_dir}")
        reload_check = None
        reloaded = None
        if recipe.eval.check_reload or recipe.eval.tasks or recipe.eval.local_task_from_heldout:
            reloaded = load_sparse(str(final_dir))  # a plain (unsharded) copy: evaluating it is not collective
            reloaded.to(_local_device(model))
        if sharded and recipe.eval.check_reload:
            print(f"hf_chts: weights are sharded (FSDP2): the validation loss is the Trainer's eval_loss from every "
                  f"rank; skipping the in-memory vs reloaded comparison of {final_dir} (it would run the sharded "
                  "model on the main process alone)")
        elif recipe.eval.check_reload and recipe.eval.perplexity:
            in_memory = validation_loss(model, data.validation, recipe.eval.batch_size)
            from_disk = validation_loss(reloaded, data.validation, recipe.eval.batch_size)
            match = math.isclose(in_memory, from_disk, rel_tol=1e-5, abs_tol=1e-6)
            reload_check = {"in_memory_loss": in_memory, "reloaded_loss": from_disk, "match": match}
            print(f"hf_chts: validation loss in memory {in_memory:.6f}, reloaded from {final_dir} {from_disk:.6f} "
                  f"-> {'match' if match else 'MISMATCH: the checkpoint does not reproduce the trained model'}")
        lm_eval = run_lm_eval(recipe, reloaded if reloaded is not None else model, tokenizer, data)
        steps = trainer.state.global_step
        summary = {
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
            "reload_check": reload_check,
            "lm_eval": lm_eval,
            "steps": steps,
            "train_loss": getattr(train_output, "training_loss", None),
            "wall_time_seconds": time.time() - started,
            "world_size": trainer.args.world_size,
            "ranks": ranks,
            "parameters": sum(p.numel() for p in model.parameters()),
            "data": data.stats,
            "checkpoint": str(final_dir),
            "sparsity_history": sparsity_history(callback),
            "loss_curve": loss_curves(trainer.state.log_history),
        }
        from ..io_utils import atomic_write_text

        summary["plot"] = str(out / PLOT_FILE) if plot_training_curves(summary, config, out / PLOT_FILE) else None
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
        print_summary(summary, recipe)
    trainer.accelerator.wait_for_everyone()
    return summary


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
    if summary.get("reload_check"):
        check = summary["reload_check"]
        lines.append(f"  reload check       in-memory loss {check['in_memory_loss']:.6f} vs reloaded "
                     f"{check['reloaded_loss']:.6f} ({'match' if check['match'] else 'MISMATCH'})")
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
