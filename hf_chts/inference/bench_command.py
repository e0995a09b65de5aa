"""``hf-chts bench-inference CHECKPOINT``: the inference-only sparse model vs its masked dense twin.

Both are loaded from the checkpoint (``load_sparse(path, inference=True)`` and
``load_sparse(path)``) and timed interleaved in one run (docs/inference.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from torch import nn

from ..checkpointing.loading import load_masked_model, resolve_checkpoint
from .convert import inference_info, inference_report
from .loading import load_inference_model
from .throughput import DECODE_PROMPT_TOKENS, compare_throughput, max_logit_difference, random_ids


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


_LOAD_PEAK_SCRIPT = """
import json, sys
import torch
from hf_chts.checkpointing.loading import load_masked_model
from hf_chts.inference.loading import empty_model, load_inference_model
from hf_chts.inference.throughput import PeakMemory
folder, inference, kernel = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
empty_model(__import__("pathlib").Path(folder))  # imports and model-class set-up, not counted
with PeakMemory() as peak:
    model = load_inference_model(folder, kernel=kernel) if inference else load_masked_model(folder)
print(json.dumps({"extra_bytes": peak.extra_bytes}))
"""


#: glibc settings for the measuring process: memory freed during the load goes back to the OS at once.
#: With glibc's adaptive defaults, freed blocks of a few MiB stay in the heap and the high-water mark
#: measures heap fragmentation (it varied by 100+ MiB between identical loads here), not live data.
MEASURING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def load_peak_bytes(folder, *, inference: bool, kernel: str = "auto") -> int | None:
    """Rise of resident memory while loading ``folder`` in a fresh Python process (``None`` if not measurable).

    A fresh process keeps memory freed by earlier work from hiding the peak; it
    runs with :data:`MEASURING_MALLOC_ENV`.
    """
    command = [sys.executable, "-c", _LOAD_PEAK_SCRIPT, str(folder), "1" if inference else "0", kernel]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, **MEASURING_MALLOC_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"measuring the load of {folder} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]


def _positive_ints(text: str, field: str) -> list[int]:
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise ValueError(f"--{field} must be positive integers separated by commas, got {text!r}")
    return values


def check_positions(config, folder, *, prompt_tokens: int, new_tokens: int) -> None:
    """``ValueError`` when the prefill or the decode run would exceed the model's ``max_position_embeddings``."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        return
    if prompt_tokens > limit:
        raise ValueError(f"--prompt-tokens {prompt_tokens} exceeds the model's context: {folder}/config.json "
                         f"max_position_embeddings = {limit}; use --prompt-tokens {limit} or fewer")
    if DECODE_PROMPT_TOKENS + new_tokens > limit:
        raise ValueError(f"--new-tokens {new_tokens} after the {DECODE_PROMPT_TOKENS}-token decode prompt exceeds the "
                         f"model's context: {folder}/config.json max_position_embeddings = {limit}; use "
                         f"--new-tokens {max(limit - DECODE_PROMPT_TOKENS, 1)} or fewer")


def run_bench_inference(checkpoint, *, kernel: str = "auto", prompt_tokens: int = 128, new_tokens: int = 32,
                        decode_batches=(1, 8), rounds: int = 3, revision: str | None = None) -> dict:
    """Measure the checkpoint's sparse inference model against its dense twin; a JSON-ready dict."""
    for name, value in (("prompt-tokens", prompt_tokens), ("new-tokens", new_tokens), ("rounds", rounds)):
        if int(value) < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    folder = resolve_checkpoint(checkpoint, revision=revision)
    sparse = load_inference_model(folder, kernel=kernel)
    if inference_info(sparse) is None:
        raise ValueError(f"{folder} is not a sparse checkpoint (no sparsity.safetensors); nothing to compare")
    check_positions(sparse.config, folder, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    dense = load_masked_model(folder).eval()
    vocab = sparse.config.vocab_size
    timings = compare_throughput({"sparse": sparse, "dense": dense}, vocab_size=vocab, prompt_tokens=prompt_tokens,
                                 new_tokens=new_tokens, decode_batches=tuple(decode_batches), rounds=rounds)
    report = inference_report(sparse)
    dense_bytes = report["dense_weight_bytes"]
    models = {
        "sparse": {"load_peak_extra_bytes": load_peak_bytes(folder, inference=True, kernel=kernel),
                   "model_bytes": model_bytes(sparse),
                   "sparsified_weight_bytes": report["weight_bytes"], **timings["sparse"].to_dict()},
        "dense": {"load_peak_extra_bytes": load_peak_bytes(folder, inference=False), "model_bytes": model_bytes(dense),
                  "sparsified_weight_bytes": dense_bytes, **timings["dense"].to_dict()},
    }
    return {"checkpoint": str(checkpoint), "kernel": kernel, "threads": torch.get_num_threads(),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "density": inference_info(sparse).density,
            "models": models, "kernels_by_role": report["kernels_by_role"],
            "max_logit_difference": max_logit_difference(sparse, dense, random_ids(2, min(prompt_tokens, 64), vocab))}


def format_bench(result: dict) -> str:
    """A text table of :func:`run_bench_inference`'s result."""
    sparse, dense = result["models"]["sparse"], result["models"]["dense"]

    def row(label: str, a, b, unit: str = "", scale: float = 1.0, higher_is_better: bool = True) -> str:
        if a is None or b is None:
            return f"{label:<28} {'n/a':>12} {'n/a':>12}"
        ratio = (a / b) if b else float("nan")
        return f"{label:<28} {a / scale:>12.4g} {b / scale:>12.4g} {ratio:>9.2f}x {unit}"

    lines = [f"{result['checkpoint']}: density {result['density']:.4f}, kernel {result['kernel']}, "
             f"{result['threads']} torch thread(s)",
             f"{'':<28} {'sparse':>12} {'dense twin':>12} {'sparse/dense':>10}"]
    lines.append(row(f"prefill tok/s ({result['prompt_tokens']} tok)", sparse["prefill_tokens_per_s"],
                     dense["prefill_tokens_per_s"]))
    for batch, speed in sparse["decode_tokens_per_s"].items():
        lines.append(row(f"decode tok/s (batch {batch})", speed, dense["decode_tokens_per_s"][batch]))
    mib = 2**20
    lines.append(row("sparsified weights MiB", sparse["sparsified_weight_bytes"], dense["sparsified_weight_bytes"],
                     scale=mib))
    lines.append(row("all parameters+buffers MiB", sparse["model_bytes"], dense["model_bytes"], scale=mib))
    lines.append(row("load peak RSS rise MiB", sparse["load_peak_extra_bytes"], dense["load_peak_extra_bytes"],
                     scale=mib))
    lines.append(row("run peak RSS rise MiB", sparse["peak_extra_bytes"], dense["peak_extra_bytes"], scale=mib))
    lines.append("kernel per layer type: " + ", ".join(
        f"{role} csr {c['csr']}/{c['csr'] + c['dense']}" for role, c in sorted(result["kernels_by_role"].items())))
    lines.append(f"largest |logit difference| sparse vs dense twin: {result['max_logit_difference']:.3g}")
    return "\n".join(lines)


def bench_inference_command(args) -> int:
    """``hf-chts bench-inference CHECKPOINT [--kernel auto|csr|dense] [--json]``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = run_bench_inference(args.checkpoint, kernel=args.kernel, prompt_tokens=args.prompt_tokens,
                                 new_tokens=args.new_tokens, rounds=args.rounds, revision=args.revision,
                                 decode_batches=_positive_ints(args.decode_batches, "decode-batches"))
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0
