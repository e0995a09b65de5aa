"""lm-eval-harness glue: evaluate a (sparse) model in memory or a checkpoint from the CLI.

- :func:`evaluate_model` runs ``lm_eval.simple_evaluate`` on an in-memory model
  (``HFLM(pretrained=model, tokenizer=...)``) and adds the model's density and ANP.
- :func:`eval_command` is ``hf-chts eval <checkpoint-or-repo> --tasks t1,t2``: it
  loads the checkpoint with :func:`hf_chts.load_sparse` (compact format included,
  ``--model-args dtype=...,device=...`` as in lm-eval, device defaulting to the best
  available), evaluates, saves lm-eval's results JSON with ``hf_chts`` density/ANP
  added through lm-eval's ``EvaluationTracker``, and prints lm-eval's table.
- :func:`write_local_tasks` writes offline lm-eval tasks (a multiple-choice task
  and a perplexity task) built from plain texts, e.g. held-out training text.

A checkpoint written by :func:`hf_chts.save_sparse` (dense format) also works
with the stock CLI: ``lm_eval --model hf --model_args pretrained=<folder>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

RESULT_KEYS_DROPPED = ("samples",)  # per-document outputs: large, and not needed in the summary


# ================================================================ local tasks
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from .io_utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _clean_texts(texts) -> list[str]:
    cleaned = [" ".join(str(text).split()) for text in texts]
    return [text for text in cleaned if text]


def _choice_documents(texts: list[str], num_choices: int, context_words: int, continuation_words: int,
                      seed: int) -> list[dict]:
    """Cloze documents: the true continuation of a text against continuations of other texts."""
    rng = random.Random(seed)
    pieces = []
    for text in texts:
        words = text.split()
        if len(words) >= context_words + continuation_words:
            pieces.append((" ".join(words[:context_words]),
                           " " + " ".join(words[context_words:context_words + continuation_words])))
    if len(pieces) < num_choices:
        raise ValueError(
            f"write_local_tasks: only {len(pieces)} texts have at least {context_words + continuation_words} words; "
            f"a {num_choices}-way multiple-choice task needs at least {num_choices}. Pass longer or more texts, "
            "or lower context_words / continuation_words / num_choices"
        )
    answers = sorted({answer for _, answer in pieces})
    if len(answers) < num_choices:
        raise ValueError(
            f"write_local_tasks: the texts give only {len(answers)} distinct continuations; a {num_choices}-way "
            f"multiple-choice task needs at least {num_choices} (pass more varied texts)"
        )
    documents = []
    for context, answer in pieces:
        others = rng.sample([other for other in answers if other != answer], num_choices - 1)
        label = rng.randrange(num_choices)
        choices = others[:label] + [answer] + others[label:]
        documents.append({"context": context, "choices": choices, "label": label})
    return documents


def write_local_tasks(folder: str | os.PathLike, texts, *, prefix: str = "hf_chts_local", num_choices: int = 4,
                      context_words: int = 24, continuation_words: int = 8, seed: int = 0,
                      kinds: tuple[str, ...] = ("choice", "perplexity")) -> list[str]:
    """Write offline lm-eval tasks built from ``texts`` into ``folder``; return their names.

    - ``{prefix}_choice`` (``output_type: multiple_choice``, metrics ``acc`` and
      ``acc_norm``): each text's first ``context_words`` words are the prompt,
      its next ``continuation_words`` words the right answer, and the same span
      of ``num_choices - 1`` other texts the distractors (deterministic with ``seed``).
    - ``{prefix}_perplexity`` (``output_type: loglikelihood_rolling``, metrics
      ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``) over the texts.

    The data files are JSON lines next to the YAMLs, referenced by absolute
    path (lm-eval resolves relative ``data_files`` against the working
    directory). Use with ``--include_path <folder>`` (CLI) or
    ``TaskManager(include_path=folder)``.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    texts = _clean_texts(texts)
    if not texts:
        raise ValueError("write_local_tasks: no non-empty text given")
    unknown = set(kinds) - {"choice", "perplexity"}
    if unknown:
        raise ValueError(f"write_local_tasks: unknown task kinds {sorted(unknown)}; expected 'choice' and/or 'perplexity'")
    from .io_utils import atomic_write_text

    names = []
    if "choice" in kinds:
        name = f"{prefix}_choice"
        data = folder / f"{name}.jsonl"
        _write_jsonl(data, _choice_documents(texts, num_choices, context_words, continuation_words, seed))
        atomic_write_text(folder / f"{name}.yaml", _yaml({
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        }))
        names.append(name)
    if "perplexity" in kinds:
        name = f"{prefix}_perplexity"
        data = folder / f"{name}.jsonl"
        _write_jsonl(data, [{"text": text} for text in texts])
        atomic_write_text(folder / f"{name}.yaml", _yaml({
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "loglikelihood_rolling",
            "test_split": "test",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            # aggregation and direction spelled out: lm-eval warns about each one left to its default
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
            "metadata": {"version": 1.0},
        }))
        names.append(name)
    return names


# ================================================================ evaluation
def _task_list(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(task).strip() for task in tasks if str(task).strip()]
    if not names:
        raise ValueError("no lm-eval task given: pass task names, e.g. --tasks hellaswag,arc_easy")
    return names


def make_task_manager(tasks: list[str], include_path: str | os.PathLike | None = None):
    """A ``TaskManager`` that scans only ``include_path`` when it holds every task (fast, offline),
    else the built-in tasks too; ``ValueError`` listing the tasks found nowhere."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--include-path {include_path} is not a folder of lm-eval task YAMLs")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None, include_defaults=True)
    unknown = [task for task in tasks if task not in manager.all_tasks and not manager.match_tasks([task])]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; list them with `lm_eval ls tasks`"
            + (f" or check the YAMLs in {include_path}" if include_path else "; local tasks need --include-path")
        )
    return manager


def sparsity_summary(model: nn.Module) -> dict[str, Any]:
    """``{"density", "anp", "method", "live_links", "total_links"}`` of a (possibly dense) model."""
    from .inference.convert import inference_info
    from .model import sparsity_report
    from .state import find_state

    info = inference_info(model)
    if info is not None:  # converted for inference: the masks are gone, the conversion kept the numbers
        return info.summary()
    state = find_state(model)
    if state is None:
        return {"density": 1.0, "anp": None, "method": None, "sparse": False}
    report = sparsity_report(model)
    return {"density": report.density, "anp": report.anp, "method": state.config.method,
            "target_density": state.config.target_density, "live_links": report.live_links,
            "total_links": report.total_links, "sparse": True}


def evaluate_model(model: nn.Module, tokenizer, tasks, *, include_path: str | os.PathLike | None = None,
                   batch_size: int | str = 8, limit: int | float | None = None, num_fewshot: int | None = None,
                   device: str = "cpu", bootstrap_iters: int = 1000, evaluation_tracker=None,
                   model_args: str = "", task_manager=None) -> dict | None:
    """Zero-/few-shot evaluation of an in-memory model with lm-eval-harness.

    Args:
        model: a causal LM (sparsified or not); moved to ``device``.
        tokenizer: its tokenizer.
        tasks: task names (list or comma-separated string).
        include_path: folder of extra task YAMLs; when every task is found there,
            the built-in task index is not scanned.
        batch_size, limit, num_fewshot: as in ``lm_eval.simple_evaluate``.
        device: where the model runs.
        bootstrap_iters: bootstrap iterations for the stderr of non-mean metrics (0 skips them).
        evaluation_tracker: an ``lm_eval.loggers.EvaluationTracker`` that records the run's
            configuration (save the results with its ``save_results_aggregated``).
        model_args: lm-eval's model description for the tracker (``"pretrained=<folder>,dtype=..."``).
        task_manager: a ``TaskManager`` from :func:`make_task_manager` (built here when ``None``).

    Returns:
        lm-eval's results dict plus ``results["hf_chts"] = {"density", "anp", "method", ...}``
        on the main process; ``None`` on other ranks.
    """
    from .checkpointing.saving import is_main_process

    if not is_main_process():
        return None
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = _task_list(tasks)
    manager = task_manager if task_manager is not None else make_task_manager(names, include_path)
    if limit is not None and float(limit).is_integer() and limit >= 1:
        limit = int(limit)  # lm-eval: >= 1 is a count of examples, < 1 a fraction
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, bootstrap_iters=bootstrap_iters,
                                  evaluation_tracker=evaluation_tracker, model_args=model_args)
    finally:
        model.train(was_training)
    if results is None:
        return None
    results = dict(results)
    results["hf_chts"] = sparsity_summary(model)
    return results


def jsonable_results(results: dict) -> dict:
    """lm-eval results without per-sample data, round-tripped through JSON (non-serialisable values become strings)."""
    from lm_eval.utils import handle_non_serializable

    kept = {key: value for key, value in results.items() if key not in RESULT_KEYS_DROPPED}
    return json.loads(json.dumps(kept, default=handle_non_serializable))


def _is_stderr(metric: str) -> bool:
    return "_stderr" in metric


def results_table(results: dict) -> str:
    """lm-eval's own results table (``lm_eval.utils.make_table``; groups too), then density and ANP."""
    from lm_eval.utils import make_table

    tables = [make_table(results)]
    if results.get("groups"):
        tables.append(make_table(results, "groups"))
    summary = results.get("hf_chts", {})
    anp = summary.get("anp")
    tables.append(f"density {summary.get('density', float('nan')):.4f}   ANP {'n/a' if anp is None else format(anp, '.4f')}"
                  f"   method {summary.get('method')}")
    return "\n".join(tables)


def best_device() -> str:
    """``cuda`` when a GPU is visible, else Apple ``mps``, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> str:
    """``device`` if this machine has it; else ``ValueError`` naming the flag and the fix (before any loading)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device / --model-args device={device!r} is not a torch device "
                         "(e.g. cpu, cuda, cuda:1, mps)") from error
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise ValueError(f"--device / --model-args device={device!r}: this machine has {count} CUDA device(s); "
                             "pass --device cpu, or omit --device to use the best available device")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device / --model-args device={device!r}: MPS is not available on this machine; "
                             "pass --device cpu, or omit --device to use the best available device")
    return device


MODEL_ARGS = ("dtype", "device")  # the --model-args keys hf-chts eval takes (lm-eval's names)


def parse_model_args(text: str | None) -> dict[str, str]:
    """``"dtype=bfloat16,device=cuda:0"`` -> ``{"dtype": "bfloat16", "device": "cuda:0"}`` (lm-eval's syntax)."""
    from lm_eval.utils import simple_parse_args_string

    values = simple_parse_args_string(text or "")
    unknown = sorted(set(values) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(f"--model-args: unknown key(s) {', '.join(unknown)}; hf-chts eval takes "
                         f"{', '.join(MODEL_ARGS)} (e.g. --model-args dtype=bfloat16,device=cuda)")
    if "dtype" in values:
        import torch

        if values["dtype"] != "auto" and not isinstance(getattr(torch, str(values["dtype"]), None), torch.dtype):
            raise ValueError(f"--model-args: dtype={values['dtype']!r} is not a torch dtype "
                             "(e.g. float32, bfloat16, float16, auto)")
    return {key: str(value) for key, value in values.items()}


def _saved_results_file(tracker) -> Path:
    """The file ``EvaluationTracker.save_results_aggregated`` wrote (it logs, not raises, when writing fails)."""
    path = Path(tracker.output_path)
    date_id = getattr(tracker, "date_id", None)
    if path.suffix == ".json":
        written = path.with_name(f"{path.stem}_{date_id}.json")
    else:
        written = path / str(tracker.general_config_tracker.model_name_sanitized) / f"results_{date_id}.json"
    if date_id is None or not written.is_file():
        raise OSError(f"lm-eval could not write the results under {path} (see its log above)")
    return written


DEFAULT_RESULTS_FOLDER = "eval_results"  # hf-chts eval's default --output-path, in the working directory


def results_output_path(requested: str | None, folder: Path) -> str:
    """Where lm-eval's tracker writes: ``--output-path``, by default ``./eval_results``; never inside the
    checkpoint ``folder`` (every file there belongs to its save): an explicit path there is refused, the
    default moves beside the checkpoint."""
    output = Path(requested).expanduser() if requested else Path.cwd() / DEFAULT_RESULTS_FOLDER
    checkpoint = Path(folder).resolve()
    resolved = output.resolve()
    if resolved == checkpoint or checkpoint in resolved.parents:
        if requested:
            raise ValueError(f"--output-path {requested} is inside the checkpoint {folder}: evaluation does not write "
                             "into a checkpoint (every file there belongs to its save); choose a path outside it")
        output = checkpoint.parent / DEFAULT_RESULTS_FOLDER
    return str(output)


def eval_command(args) -> int:
    """``hf-chts eval <checkpoint-or-repo> --tasks t1,t2 [--model-args dtype=...,device=...] [--output-path p]
    [--update-card]``: the checkpoint is read only, unless ``--update-card`` asks to add the results to its card."""
    from .errors import UserError
    from .extras import missing_extra

    if missing_extra("lm_eval"):
        raise UserError(f"hf-chts eval runs lm-eval: {missing_extra('lm_eval')}")
    from lm_eval.loggers import EvaluationTracker
    from transformers import AutoTokenizer

    from .checkpoint import load_sparse
    from .checkpointing.loading import resolve_checkpoint, verified_record

    model_args = parse_model_args(getattr(args, "model_args", None))
    device = check_device(model_args.get("device") or getattr(args, "device", None) or best_device())
    update_card = bool(getattr(args, "update_card", False))
    if update_card and getattr(args, "inference", False):
        raise ValueError("--update-card needs the masked model (it rewrites the card with the sparse state): "
                         "drop --inference")
    if update_card and not Path(args.checkpoint).expanduser().is_dir():
        raise ValueError(f"--update-card rewrites the model card of a local checkpoint folder; {args.checkpoint!r} "
                         "is not one (download it first, e.g. with huggingface_hub.snapshot_download)")
    names = _task_list(args.tasks)
    folder = resolve_checkpoint(args.checkpoint, revision=getattr(args, "revision", None))
    output = results_output_path(args.output_path, folder)
    verified_record(folder)  # every file from one save, regular files only, before the tokenizer opens any
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as error:  # before the weights load; transformers' message names no fix
        raise ValueError(f"{folder}: no loadable tokenizer in the checkpoint ({type(error).__name__}: {error}); "
                         "save it there with hf_chts.save_sparse(model, folder, tokenizer=tokenizer) or "
                         "tokenizer.save_pretrained(folder)") from error
    manager = make_task_manager(names, args.include_path)  # an unknown task is refused before the model loads
    dtype = model_args.get("dtype")
    dtype_kwargs = {"dtype": dtype} if dtype else {}
    if getattr(args, "inference", False):  # sparse kernels, only live weights in memory (docs/inference.md)
        model = load_sparse(folder, inference=True, kernel=args.kernel, **dtype_kwargs)
    else:
        model = load_sparse(folder, **dtype_kwargs)
    tracker = EvaluationTracker(output_path=output)
    described = ",".join([f"pretrained={args.checkpoint}"] + [f"{k}={v}" for k, v in model_args.items()])
    results = evaluate_model(model, tokenizer, names, include_path=args.include_path,
                             batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
                             device=device, bootstrap_iters=getattr(args, "bootstrap_iters", 1000),
                             evaluation_tracker=tracker, model_args=described, task_manager=manager)
    if results is None:
        return 0
    results = jsonable_results(results)
    results["hf_chts"].update(checkpoint=str(args.checkpoint), device=device, dtype=str(next(model.parameters()).dtype))
    tracker.save_results_aggregated(results=results, samples=None)
    print(results_table(results))
    print(f"results written to {_saved_results_file(tracker)}")
    if update_card:
        _add_results_to_card(folder, model, results)
    return 0


def _add_results_to_card(folder: Path, model: nn.Module, results: dict) -> None:
    """Rewrite the model card of the local checkpoint ``folder`` with the evaluation results, committed as a
    save of its sparsity files and card (docs/hub.md#2-the-model-card): later loads verify it like any
    save. A README hf_chts did not write is kept (with a warning)."""
    from .checkpointing.saving import write_sparsity_files
    from .model_card import CARD_FILE, card_owner

    if card_owner(folder / CARD_FILE) == "user":
        logger.warning("hf_chts: %s was not written by hf_chts; --update-card left it unchanged", folder / CARD_FILE)
        return
    write_sparsity_files(model, folder, card_kwargs={"eval_results": finite_metrics(results)})
    print(f"model card updated: {folder / CARD_FILE}")


def finite_metrics(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the numeric, non-stderr metrics (helper for checks and summaries)."""
    table = {}
    for task, metrics in results.get("results", {}).items():
        table[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                       if isinstance(value, (int, float)) and not _is_stderr(key) and key not in ("alias", "sample_len")
                       and math.isfinite(float(value))}
    return table


__all__ = ["evaluate_model", "eval_command", "write_local_tasks", "make_task_manager", "sparsity_summary",
           "jsonable_results", "results_table", "finite_metrics", "best_device", "check_device", "parse_model_args"]
