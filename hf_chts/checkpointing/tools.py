"""The tools behind ``hf-chts inspect`` and ``hf-chts export``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..architectures import build_topology
from ..model import modules_named
from ..topology.percolation import active_neurons
from .format import CONFIG_FILE, SPARSITY_FILE, config_from_record, module_name_of, read_masks
from .loading import (
    check_model_files, load_masked_model, quiet_transformers, read_one_save, resolve_checkpoint, validate_masks,
)
from .saving import write_checkpoint

logger = logging.getLogger("hf_chts.checkpoint")  # the logger name users configure, whichever module logs

def _meta_model(folder: Path):
    """The checkpoint's architecture on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    with torch.device("meta"), quiet_transformers():
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=False)


def inspect_checkpoint(path_or_repo_id: str | os.PathLike, *, verify: str | None = None, **hub_kwargs) -> dict:
    """Summary of a sparse checkpoint without running the model: per-layer density and
    active neurons, overall density and ANP, file sizes, method and schedule position
    (all from one save; ``verify`` as in :func:`hf_chts.checkpoint.load_sparse`)."""
    folder = resolve_checkpoint(path_or_repo_id, **hub_kwargs)
    return read_one_save(folder, lambda record: _inspect(folder, record), verify=verify)


def _inspect(folder: Path, record: dict | None) -> dict:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    if record is None or not (folder / SPARSITY_FILE).exists():
        raise ValueError(f"{folder} is not a sparse checkpoint: {SPARSITY_FILE} and {CONFIG_FILE} are required")
    config = config_from_record(folder / CONFIG_FILE, record)
    masks = read_masks(folder)
    check_model_files(folder)
    layers, anp, active_total = {}, None, (0, 0)
    by_name = {module_name_of(k): v for k, v in masks.items()}
    roles: dict[str, str] = {}
    active: dict[str, int] = {}
    total: dict[str, int] = {}
    try:
        model = _meta_model(folder)
        validate_masks(folder / SPARSITY_FILE, model, config, masks)  # the masks' own module names, no pattern
        topology = build_topology(model, modules_named(model, by_name))
        roles = {name: info.role for name, info in topology.layers.items()}
        if by_name:
            active, total = active_neurons(by_name, topology)
        active_total = (sum(active.values()), sum(total.values()))
        anp = active_total[0] / active_total[1] if active_total[1] else 1.0
    except Exception as error:
        if isinstance(error, ValueError):  # masks that do not fit the stored config: the user's error, shown
            raise
        # the architecture cannot be built (e.g. offline without its config code): densities only
        logger.warning("hf_chts inspect: cannot build the architecture for ANP (%s)", error)
    live_total = sum(int(m.sum()) for m in masks.values())
    links_total = sum(m.numel() for m in masks.values())
    for key, mask in masks.items():
        name = module_name_of(key)
        layers[key] = {
            "role": roles.get(name, "linear"), "shape": list(mask.shape), "density": float(mask.sum()) / mask.numel(),
            "live_links": int(mask.sum()), "total_links": mask.numel(),
            "active_neurons": active.get(name), "total_neurons": total.get(name),
        }
    engine = record.get("engine") or None
    return {
        "checkpoint": str(folder),
        "method": config.method,
        "target_density": config.target_density,
        "weights_format": record.get("weights_format", "dense"),
        "density": live_total / links_total if links_total else 1.0,
        "anp": anp,
        "live_links": live_total,
        "total_links": links_total,
        "layers": layers,
        "files": files,
        "schedule": None if engine is None else {
            "completed_steps": engine.get("completed_steps"),
            "total_steps": engine.get("total_steps"),
            "current_target_density": engine.get("target_density"),
            **(engine.get("schedule") or {}),
        },
    }


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)  # pragma: no cover


def format_inspection(info: dict) -> str:
    """Human-readable table of :func:`inspect_checkpoint`'s result."""
    header = f"{'layer':<52} {'role':<8} {'shape':>11} {'density':>8} {'live':>9} {'active':>11}"
    lines = [f"checkpoint: {info['checkpoint']}",
             f"method: {info['method']}   target density: {info['target_density']}   weights: {info['weights_format']}",
             "", header, "-" * len(header)]
    for key, layer in info["layers"].items():
        shape = "x".join(str(s) for s in layer["shape"])
        active = "?" if layer["active_neurons"] is None else f"{layer['active_neurons']}/{layer['total_neurons']}"
        lines.append(f"{key:<52} {layer['role']:<8} {shape:>11} {layer['density']:>8.4f} {layer['live_links']:>9} "
                     f"{active:>11}")
    lines.append("-" * len(header))
    anp = "?" if info["anp"] is None else f"{info['anp']:.4f}"
    lines.append(f"overall density {info['density']:.4f} ({info['live_links']}/{info['total_links']} links)   ANP {anp}")
    schedule = info["schedule"]
    if schedule is None:
        lines.append("schedule: no engine progress saved")
    else:
        target = schedule.get("current_target_density")
        lines.append(
            f"schedule: step {schedule.get('completed_steps')}/{schedule.get('total_steps')}"
            + (f", current target density {target:.4f}" if isinstance(target, (int, float)) else "")
            + (f", updates {schedule['updates_done']}/{schedule['updates_total']}" if "updates_done" in schedule else "")
        )
    lines.append("")
    lines.append("files:")
    for name, size in info["files"].items():
        lines.append(f"  {name:<40} {_human_size(size):>10}")
    return "\n".join(lines)


def inspect_command(args) -> int:
    """``hf-chts inspect <checkpoint> [--json]``."""
    info = inspect_checkpoint(args.checkpoint)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
    else:
        print(format_inspection(info))
    return 0


def export_checkpoint(source: str | os.PathLike, output: str | os.PathLike, *, format: str = "dense",
                      repo_id: str | None = None) -> Path:
    """Rewrite a sparse checkpoint as ``dense`` (vanilla-loadable) or ``compact``; keeps masks, config,
    engine progress and the tokenizer, and writes a model card (naming ``repo_id`` when it will be pushed)."""
    if format not in ("dense", "compact"):
        raise ValueError(f"export format {format!r} is invalid: expected 'dense' or 'compact'")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new output folder")
    folder = resolve_checkpoint(source)
    if not (folder / SPARSITY_FILE).exists():
        raise ValueError(f"{folder} has no {SPARSITY_FILE}: it is not a sparse checkpoint, nothing to export")
    model = load_masked_model(folder, dtype="auto")
    tokenizer = None
    if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as error:  # noqa: BLE001 - a tokenizer is optional in a checkpoint
            logger.warning("hf_chts export: tokenizer not copied (%s)", error)
    written = write_checkpoint(model, out, tokenizer=tokenizer, compact=format == "compact",
                               card_kwargs={"repo_id": repo_id} if repo_id else None)
    return written


def export_command(args) -> int:
    """``hf-chts export <checkpoint> <output> --format dense|compact [--push-to-hub REPO [--private]]``."""
    repo_id = getattr(args, "push_to_hub", None)
    out = export_checkpoint(args.checkpoint, args.output, format=args.format, repo_id=repo_id)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"wrote {args.format} checkpoint to {out}")
    for name, size in sizes.items():
        print(f"  {name:<40} {_human_size(size):>10}")
    if repo_id:  # docs/hub.md#3-pushes-carry-the-sparsity-files
        from ..hub import push_folder

        commit = push_folder(out, repo_id, private=getattr(args, "private", None),
                             commit_message=f"Upload {args.format} sparse checkpoint (hf-chts export)")
        print(f"pushed {out} to {getattr(commit, 'commit_url', repo_id)}")
    return 0
