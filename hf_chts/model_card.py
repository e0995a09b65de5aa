"""The model card (``README.md``) every sparse save writes (docs/hub.md#2-the-model-card).

:func:`write_model_card` builds a ``huggingface_hub.ModelCard`` from a checkpoint
folder's ``config.json`` and file list, the ``sparsify_config.json`` record the caller
passes (docs/checkpoint-format.md; this module reads no checkpoint format) and what only the caller knows (the model's ANP,
evaluation results, tokens trained) and writes it into that folder. It never
replaces a README that hf_chts did not write, unless told to: a card written by
hf_chts carries the marker ``hf_chts: {generated_card: true}`` in its YAML
metadata; the draft card ``transformers.Trainer`` generates counts as replaceable too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint_files import CONFIG_FILE, SPARSE_WEIGHTS_FILE, SPARSITY_FILE
from .io_utils import atomic_write_text, read_bounded_bytes
from .report import sparsity_report
from .state import find_state
from .version import REPOSITORY_URL, __version__

logger = logging.getLogger("hf_chts.checkpoint")  # the logger name users configure for checkpoint messages

CARD_FILE = "README.md"
MARKER_KEY = "hf_chts"
TAGS = ("hf_chts", "sparse", "dynamic-sparse-training")
FORMAT_SPEC = f"{REPOSITORY_URL}/blob/main/docs/checkpoint-format.md"  # the wheel ships no docs/
# transformers.Trainer.create_model_card ends its draft card with this comment (transformers/modelcard.py)
TRAINER_DRAFT_MARK = "This model card has been generated automatically according to the information the Trainer"


def card_owner(path: str | os.PathLike) -> str | None:
    """Who wrote the card at ``path``: ``"hf_chts"``, ``"trainer"`` (the Trainer's draft), ``"user"``, or
    ``None`` when there is no file."""
    from huggingface_hub import ModelCard

    path = Path(path)
    if not path.is_file():
        return None
    try:  # a regular file only (never /proc or a device), read up to its size + 1 byte
        text = read_bounded_bytes(path, max_bytes=16 * 2**20, what="model card").decode("utf-8")
        card = ModelCard(text, ignore_metadata_errors=True)
        marker = card.data.to_dict().get(MARKER_KEY)
    except Exception:  # noqa: BLE001 - an unreadable README is the user's: keep it
        return "user"
    if isinstance(marker, dict) and marker.get("generated_card") is True:
        return "hf_chts"
    return "trainer" if TRAINER_DRAFT_MARK in text else "user"


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "not recorded"
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _eval_table(eval_results: dict[str, dict[str, float]]) -> str:
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task in sorted(eval_results):
        for metric, value in sorted(eval_results[task].items()):
            rows.append(f"| {task} | {metric} | {_number(float(value))} |")
    return "\n".join(rows)


def _eval_metadata(eval_results: dict[str, dict[str, float]]) -> list:
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                       metric_value=float(value))
            for task in sorted(eval_results) for metric, value in sorted(eval_results[task].items())
            if isinstance(value, (int, float)) and math.isfinite(float(value))]


def load_location(name: str, repo_id: str | None) -> str:
    """What the card's snippets load: the Hub repo id when known (``org/name``), else a local path to fill in
    (a bare folder name would be looked up on the Hub)."""
    return repo_id if repo_id and "/" in repo_id else f"path/to/{name}"


def _load_section(name: str, compact: bool) -> str:
    sparse = (f"```python\nimport hf_chts\n\nmodel = hf_chts.load_sparse(\"{name}\")  # masks and SparsifyConfig "
              "restored: training can continue sparse\n```")
    if compact:
        return ("The weights are stored in the compact format (live values only), which only hf_chts reads:\n\n"
                + sparse)
    return ("Masked weights are stored as zeros, so plain transformers loads the model (it then runs, and costs, "
            "like a dense model):\n\n"
            f"```python\nfrom transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("
            f"\"{name}\")\n```\n\nWith hf_chts the model is loaded sparse:\n\n" + sparse)


def _files_section(files: list[str], compact: bool, version: Any) -> str:
    described = {
        "config.json": "the transformers model config",
        SPARSITY_FILE: "the bit-packed masks of the sparsified layers (safetensors)",
        CONFIG_FILE: "the `SparsifyConfig`, a density summary and the sparse-training progress",
        SPARSE_WEIGHTS_FILE: "the live values of the sparsified weights (compact format)",
        "generation_config.json": "generation defaults",
    }
    weights = "the weights" + (" without the sparsified matrices" if compact else ", zeros at masked positions")
    lines = []
    for name in sorted(files):
        if name.startswith("model") and name.endswith((".safetensors", ".index.json")):
            lines.append(f"- `{name}`: {weights}")
        elif name in described:
            lines.append(f"- `{name}`: {described[name]}")
        elif name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template")):
            lines.append(f"- `{name}`: the tokenizer")
    lines.append(f"- `{CARD_FILE}`: this card")
    return ("\n".join(lines) + f"\n\nThe layout is the hf_chts sparse checkpoint format (version {version}), "
            f"specified in [docs/checkpoint-format.md]({FORMAT_SPEC}) of the hf_chts repository.")


def build_model_card(folder: str | os.PathLike, *, record: dict | None, model: nn.Module | None = None,
                     eval_results: dict[str, dict[str, float]] | None = None, tokens_trained: int | None = None,
                     repo_id: str | None = None, base_model: str | None = None, appendix: str | None = None):
    """The ``huggingface_hub.ModelCard`` of the sparse checkpoint in ``folder`` (not written).

    ``record`` is the checkpoint's ``sparsify_config.json`` record (a save writes the card before
    the record; for a saved folder, ``hf_chts.checkpoint.read_sparsify_config(folder)``).

    ``model`` (the sparsified model that was saved) gives the ANP; without it the
    ANP of the last topology update recorded in the engine history is used.
    ``eval_results`` is ``{task: {metric: value}}``; ``repo_id`` names the model (default: the folder
    name) and, when it is a Hub id (``org/name``), is what the loading snippets load (else they show
    ``path/to/<name>`` to fill in); ``base_model`` (a Hub id) goes into the metadata;
    ``appendix`` (markdown) ends the card (the Trainer's training details,
    docs/hub.md#3-pushes-carry-the-sparsity-files).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    if record is None:
        raise ValueError(f"{folder} has no {CONFIG_FILE}: not a sparse checkpoint, no card to build")
    config, summary, engine = record["config"], record.get("summary") or {}, record.get("engine") or {}
    model_config = {}
    if (folder / "config.json").is_file():
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = model_config.get("model_type", "unknown")
    architecture = (model_config.get("architectures") or [model_type])[0]
    compact = record.get("weights_format") == "compact"
    history = engine.get("history") or []
    anp = sparsity_report(model).anp if model is not None and find_state(model) is not None else (
        history[-1].get("anp") if history else None)
    name = repo_id or folder.resolve().name
    location = load_location(name, repo_id)
    eval_results = {task: dict(metrics) for task, metrics in (eval_results or {}).items() if metrics}
    schedule = engine.get("schedule") or {}
    method = config.get("method")

    data = ModelCardData(
        library_name="hf_chts" if compact else "transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, str(method), model_type],
        base_model=base_model,
        model_name=name if eval_results else None,
        eval_results=_eval_metadata(eval_results) or None,
    )
    data.hf_chts = {"generated_card": True, "hf_chts_version": __version__,
                    "format_version": record.get("format_version"), "method": method,
                    "density": summary.get("density"), "anp": anp}
    if config.get("schedule") == "constant":
        window = f"constant at density {config.get('target_density')}"
    else:
        window = (f"{config.get('schedule')} from density {config.get('initial_density')} to "
                  f"{config.get('target_density')} between {config.get('decay_start_fraction')} and "
                  f"{config.get('decay_end_fraction')} of training")
    updates = (f"; {schedule['updates_done']} of {schedule.get('updates_total', '?')} done"
               if "updates_done" in schedule else "")
    steps = engine.get("completed_steps")
    origin = ("trained by dynamic sparse training, the topology evolving with the method's removal and regrowth "
              "rules," if steps else "sparsified (no sparse training recorded)")
    rows = [
        ("method", f"`{method}` (init `{config.get('init')}`, removal `{config.get('removal')}`, regrowth "
                   f"`{config.get('regrowth')}` / `{config.get('regrowth_selection')}`)"),
        ("target density", _number(config.get("target_density"))),
        ("final density (measured)", _number(summary.get("density"))),
        ("live / total links", f"{_number(summary.get('live_links'))} / {_number(summary.get('total_links'))}"
                               f" in {summary.get('sparsified_layers', '?')} sparsified layers"),
        ("ANP (active-neuron post-percolation rate)", _number(anp)),
        ("density schedule", window),
        ("topology updates", f"every {config.get('update_interval')} steps until "
                             f"{config.get('update_end_fraction')} of training, removal fraction "
                             f"{config.get('removal_fraction')} ({config.get('removal_fraction_schedule')})"
                             f"{updates}"),
        ("steps trained", f"{_number(steps)} of {_number(engine.get('total_steps'))}" if steps is not None
         else "not recorded (saved without a training engine)"),
        ("tokens trained", _number(tokens_trained)),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows])
    evaluation = (_eval_table(eval_results) if eval_results else
                  f"No evaluation results were recorded with this save; `hf-chts eval {location} --tasks ...` "
                  "measures them with lm-eval (`--update-card` adds them here).")
    files = sorted({p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} | {CONFIG_FILE})
    body = f"""
# {name}

A `{architecture}` ({model_type}) causal language model {origin} with hf_chts (method `{method}`): its
sparsified linear layers keep a fraction {_number(summary.get('density'))} of their links.

## Sparsity and training

{table}

The full `SparsifyConfig` is in `{CONFIG_FILE}` (`hf_chts.SparsifyConfig.from_pretrained("{location}")`).

## Evaluation

{evaluation}

## How to load

{_load_section(location, compact)}

## Files

{_files_section(files, compact, record.get('format_version'))}
"""
    if appendix:
        body += f"\n{appendix.strip()}\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(folder: str | os.PathLike, *, existing_card: str | os.PathLike | None = None,
                     overwrite_card: bool = False, **card_kwargs) -> Path | None:
    """Write ``folder/README.md`` (see :func:`build_model_card` for ``card_kwargs``); return its path.

    ``existing_card`` is the README whose owner decides (default ``folder/README.md``;
    a checkpoint staged in a temporary folder passes the final folder's README).
    A README hf_chts did not write (nor the Trainer's draft) is kept, with a warning,
    unless ``overwrite_card=True``; then nothing is written and ``None`` is returned.
    """
    folder = Path(folder)
    existing = Path(existing_card) if existing_card is not None else folder / CARD_FILE
    if card_owner(existing) == "user" and not overwrite_card:
        logger.warning("hf_chts: %s was not written by hf_chts; kept it and wrote no model card "
                       "(pass overwrite_card=True to replace it)", existing)
        return None
    card = build_model_card(folder, **card_kwargs)
    atomic_write_text(folder / CARD_FILE, str(card))
    return folder / CARD_FILE
