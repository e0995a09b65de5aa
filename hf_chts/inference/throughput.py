"""Measure a causal LM's inference: prefill and decode tokens/s, peak memory, logit differences.

Used by ``hf-chts bench-inference`` and ``bench/inference.py``. Models are
timed interleaved (one round of each model in turn, best round kept), so a
load change on a shared machine hits every model alike and ratios measured in
one call are comparable.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field_name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process inside a ``with`` block (Linux ``VmHWM``; ``None`` elsewhere).

    ``peak_bytes`` is the high-water mark during the block, ``extra_bytes`` its
    rise above the resident size at entry. On CUDA use
    ``torch.cuda.max_memory_allocated`` instead (not done here).
    """

    def __enter__(self) -> "PeakMemory":
        self.start_bytes = self.peak_bytes = self.extra_bytes = None
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return self
        rss = _status_kib("VmRSS")
        self.start_bytes = None if rss is None else rss * 1024
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM")
        if hwm is not None and self.start_bytes is not None:
            self.peak_bytes = hwm * 1024
            self.extra_bytes = max(0, self.peak_bytes - self.start_bytes)


def random_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one forward over the prompt ``ids`` (building the KV cache)."""
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    return time.perf_counter() - start


def _cache_argument(model: nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` (transformers >= 5.24) or ``past_key_values`` (older)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds of ``new_tokens`` greedy decoding steps after a prefill of ``ids`` (the prefill is not counted)."""
    name = _cache_argument(model)
    out = model(input_ids=ids, use_cache=True)
    cache, next_ids = out[name], out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_ids, use_cache=True, **{name: cache})
        cache, next_ids = out[name], out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@dataclass
class ThroughputResult:
    """Best-of-rounds tokens/s of one model, and the peak memory of its first round."""

    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # by batch size
    peak_extra_bytes: int | None = None

    def to_dict(self) -> dict:
        return {"prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": {str(b): v for b, v in self.decode_tokens_per_s.items()},
                "peak_extra_bytes": self.peak_extra_bytes}


#: length of the decode measurement's prompt
DECODE_PROMPT_TOKENS = 16


def compare_throughput(models: dict[str, nn.Module], *, vocab_size: int, prompt_tokens: int = 128,
                       new_tokens: int = 32, decode_batches=(1, 8), rounds: int = 3) -> dict[str, ThroughputResult]:
    """Prefill tokens/s (batch 1, ``prompt_tokens``) and decode tokens/s per batch size of each model.

    Rounds run the models in turn; each number is the best round. The decode
    prompt is 16 tokens. ``peak_extra_bytes`` is the rise of resident memory
    during the model's first round (activations, KV cache, kernel workspaces).
    """
    prompt = random_ids(1, prompt_tokens, vocab_size, seed=1)
    decode_prompts = {batch: random_ids(batch, DECODE_PROMPT_TOKENS, vocab_size, seed=2) for batch in decode_batches}
    results = {name: ThroughputResult() for name in models}
    for model in models.values():  # warm-up (allocator, MKL handles), not timed
        prefill_seconds(model, prompt[:, :8])
        decode_seconds(model, decode_prompts[decode_batches[0]], 2)
    for round_index in range(rounds):
        for name, model in models.items():
            result = results[name]
            with PeakMemory() as memory:
                prefill = prefill_seconds(model, prompt)
                decode = {batch: decode_seconds(model, ids, new_tokens) for batch, ids in decode_prompts.items()}
            if round_index == 0:
                result.peak_extra_bytes = memory.extra_bytes
            result.prefill_tokens_per_s = max(result.prefill_tokens_per_s, prompt_tokens / prefill)
            for batch, seconds in decode.items():
                speed = batch * new_tokens / seconds
                result.decode_tokens_per_s[batch] = max(result.decode_tokens_per_s.get(batch, 0.0), speed)
    return results


@torch.inference_mode()
def max_logit_difference(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> float:
    """Largest absolute difference of the two models' logits on ``ids`` (float32)."""
    return float((model(input_ids=ids).logits.float() - reference(input_ids=ids).logits.float()).abs().max())
