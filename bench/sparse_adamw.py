"""hf_chts.SparseAdamW vs AdamW on the same sparsified model: optimizer-state bytes, peak RSS, step time.

    python bench/sparse_adamw.py                 # the table of bench/README.md (~15-25 min on 2 busy cores)
    python bench/sparse_adamw.py --quick         # smoke run (tiny shapes, 1 repeat)

One table, two parts, 1 torch thread:

- memory: LLaMA-60M and LLaMA-130M shapes (all decoder blocks; vocabulary 1024 instead of 32000, so
  the sparsified layers dominate) sparsified with SET at 30 / 10 / 5 % density; each optimizer in its
  own subprocess: 2 training steps of 512 tokens with a topology update after the first. Reported:
  optimizer-state bytes (every state tensor) and the peak training RSS (VmHWM minus the RSS before
  the model was built). Masked AdamW here is ``torch.optim.AdamW(fused=True)`` (transformers'
  default); SparseAdamW uses the fused kernel too.
- time: forward + backward + optimizer step of the LLaMA-60M shape (``--time-blocks`` decoder blocks,
  vocabulary 1024) at 30 % density, 512 and 2048 tokens per step; dense model + fused AdamW, sparse
  model + masked AdamW (for-loop and fused, the engine attached) and SparseAdamW (for-loop and fused),
  medians of ``--repeats`` interleaved rounds; the optimizer step alone is timed in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from bench import _common as common
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore

SHAPES = {
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
VOCAB = 1024
DENSITIES = (0.3, 0.1, 0.05)
SEQ = 256
LABELS = ("dense + fused AdamW", "masked AdamW for-loop", "masked AdamW fused", "SparseAdamW for-loop",
          "SparseAdamW fused")
GOALS = {"state_30": 0.32, "state_10": 0.12, "rss_30": 0.70, "step_30": 1.02}


def build_model(shape: dict, blocks: int | None = None, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    settings = dict(shape, num_hidden_layers=blocks or shape["num_hidden_layers"])
    config = transformers.LlamaConfig(**settings, num_key_value_heads=settings["num_attention_heads"], vocab_size=VOCAB,
                                      max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1)
    return transformers.AutoModelForCausalLM.from_config(config).train()


def rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (Linux)."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_optimizer(kind: str, params):
    import torch

    from hf_chts import SparseAdamW

    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    if kind == "adamw_loop":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=False)
    if kind == "sparse_fused":
        return SparseAdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    if kind == "sparse_loop":
        return SparseAdamW(params, lr=1e-3, weight_decay=0.1, foreach=False)
    raise ValueError(kind)


def state_bytes(optimizer) -> int:
    import torch

    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def memory_child(shape: str, density: float, kind: str, tokens: int) -> dict:
    """One process: build, sparsify, 2 steps with an update after the first; state bytes and peak RSS."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline is read)

    from hf_chts import SparseTrainingEngine, SparsifyConfig, sparsify
    from hf_chts.sparse_adamw import SparseAdamW  # noqa: F401

    torch.set_num_threads(1)
    before = rss_bytes("VmRSS")
    model = build_model(SHAPES[shape])
    sparsify(model, SparsifyConfig(method="set", target_density=density, update_interval=1, seed=0))
    optimizer = make_optimizer(kind, model.parameters())
    engine = SparseTrainingEngine(model, total_steps=8, optimizer=optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (tokens // SEQ, SEQ), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in the Trainer's steady state
        engine.step()
    assert engine.history, "no topology update ran"
    sparse_numel = sum(layer.mask.numel() for layer in engine.layers.values())
    return {"state_bytes": state_bytes(optimizer), "peak_rss": rss_bytes("VmHWM") - before,
            "sparse_numel": sparse_numel, "params": sum(p.numel() for p in model.parameters())}


def run_memory(shape: str, density: float, kind: str, tokens: int) -> dict:
    command = [sys.executable, __file__, "--memory-child", shape, str(density), kind, str(tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return eval(result.stdout.strip().splitlines()[-1], {})  # the child's dict of ints


def time_steps(shape: str, blocks: int, token_counts: tuple[int, ...], repeats: int) -> dict:
    """Interleaved full-step and optimizer-step medians (seconds) per (tokens, variant)."""
    import torch

    from hf_chts import SparseTrainingEngine, SparsifyConfig, sparsify

    torch.set_num_threads(1)
    dense = build_model(SHAPES[shape], blocks)
    sparse = build_model(SHAPES[shape], blocks)
    sparsify(sparse, SparsifyConfig(method="set", target_density=0.3, update_interval=10**6, seed=0))
    variants = {"dense + fused AdamW": (dense, make_optimizer("adamw_fused", dense.parameters()))}
    for label, kind in zip(LABELS[1:], ("adamw_loop", "adamw_fused", "sparse_loop", "sparse_fused")):
        variants[label] = (sparse, make_optimizer(kind, sparse.parameters()))
    engines = [SparseTrainingEngine(sparse, total_steps=10**7, optimizer=opt) for m, opt in variants.values()
               if m is sparse]
    generator = torch.Generator().manual_seed(0)
    results = {}
    for tokens in token_counts:
        ids = torch.randint(0, VOCAB, (tokens // SEQ, SEQ), generator=generator)
        step_times = {label: [] for label in variants}
        opt_times = {label: [] for label in variants}
        for round_index in range(repeats + 1):  # round 0 warms up (creates the optimizer state)
            for label, (model, optimizer) in variants.items():
                started = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                before_step = time.perf_counter()
                optimizer.step()
                after_step = time.perf_counter()
                optimizer.zero_grad(set_to_none=False)
                if round_index:
                    step_times[label].append(after_step - started)
                    opt_times[label].append(after_step - before_step)
        for label in variants:
            results[(tokens, label)] = (statistics.median(step_times[label]), statistics.median(opt_times[label]))
    for engine in engines:
        engine.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--time-blocks", type=int, default=2, help="decoder blocks of the timed LLaMA-60M shape")
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="folder for sparse_adamw.{txt,json}")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        shape, density, kind, tokens = args.memory_child
        print(memory_child(shape, float(density), kind, int(tokens)))
        return 0
    started = time.perf_counter()
    shapes = ("tiny",) if args.quick else ("llama-60m", "llama-130m")
    repeats = 1 if args.quick else args.repeats
    rows, record = [], {"machine": common.machine_info(), "memory": [], "time": []}
    ratios = {}
    for shape in shapes:
        for density in DENSITIES:
            adamw = run_memory(shape, density, "adamw_fused", 512)
            sparse = run_memory(shape, density, "sparse_fused", 512)
            state, rss = sparse["state_bytes"] / adamw["state_bytes"], sparse["peak_rss"] / adamw["peak_rss"]
            ratios[(shape, density)] = (state, rss)
            record["memory"].append({"shape": shape, "density": density, "adamw": adamw, "sparse_adamw": sparse})
            rows.append({"what": f"{shape} @ {density:.0%}: optimizer state MiB",
                         "adamw": f"{adamw['state_bytes'] / 2**20:.1f}", "sparse": f"{sparse['state_bytes'] / 2**20:.1f}",
                         "ratio": f"{state:.3f}x"})
            rows.append({"what": f"{shape} @ {density:.0%}: peak training RSS MiB",
                         "adamw": f"{adamw['peak_rss'] / 2**20:.0f}", "sparse": f"{sparse['peak_rss'] / 2**20:.0f}",
                         "ratio": f"{rss:.3f}x"})
    time_shape = "tiny" if args.quick else "llama-60m"
    timings = time_steps(time_shape, None if args.quick else args.time_blocks, (512, 2048), repeats)
    for (tokens, label), (step_s, opt_s) in timings.items():
        record["time"].append({"tokens": tokens, "variant": label, "step_s": step_s, "optimizer_step_s": opt_s})
    for tokens in (512, 2048):
        step = {label: timings[(tokens, label)][0] for label in LABELS}
        opt = {label: timings[(tokens, label)][1] for label in LABELS}
        dense = step["dense + fused AdamW"]
        rows.append({"what": f"{tokens} tok/step: step time / dense fused AdamW ({dense * 1e3:.0f} ms)",
                     "adamw": f"loop {step['masked AdamW for-loop'] / dense:.3f}x, fused {step['masked AdamW fused'] / dense:.3f}x",
                     "sparse": f"loop {step['SparseAdamW for-loop'] / dense:.3f}x, fused {step['SparseAdamW fused'] / dense:.3f}x",
                     "ratio": f"{step['SparseAdamW fused'] / step['masked AdamW for-loop']:.3f}x masked loop"})
        rows.append({"what": f"{tokens} tok/step: optimizer step ms (dense fused {opt['dense + fused AdamW'] * 1e3:.1f})",
                     "adamw": f"loop {opt['masked AdamW for-loop'] * 1e3:.1f}, fused {opt['masked AdamW fused'] * 1e3:.1f}",
                     "sparse": f"loop {opt['SparseAdamW for-loop'] * 1e3:.1f}, fused {opt['SparseAdamW fused'] * 1e3:.1f}",
                     "ratio": f"{opt['SparseAdamW fused'] / opt['masked AdamW fused']:.3f}x masked fused"})
    title = (f"SparseAdamW vs AdamW (1 thread, vocab {VOCAB}; time: {time_shape}"
             f"{'' if args.quick else f' {args.time_blocks} blocks'}, medians of {repeats} interleaved rounds)")
    text = common.table(rows, [("what", "measurement"), ("adamw", "masked AdamW"), ("sparse", "SparseAdamW"),
                               ("ratio", "SparseAdamW / AdamW")], title=title, left=3)
    goals = []
    if not args.quick:
        state30, rss30 = ratios[("llama-60m", 0.3)]
        state10 = ratios[("llama-60m", 0.1)][0]
        step30 = max(timings[(t, "SparseAdamW fused")][0] / timings[(t, "dense + fused AdamW")][0] for t in (512, 2048))
        faster = all(timings[(t, "SparseAdamW fused")][0] < timings[(t, "masked AdamW for-loop")][0] for t in (512, 2048))
        goals = [f"goal state <= {GOALS['state_30']}x AdamW at 30 %: {'met' if state30 <= GOALS['state_30'] else 'MISSED'} "
                 f"({state30:.3f}x)",
                 f"goal state <= {GOALS['state_10']}x AdamW at 10 %: {'met' if state10 <= GOALS['state_10'] else 'MISSED'} "
                 f"({state10:.3f}x)",
                 f"goal peak training RSS <= {GOALS['rss_30']}x at 30 %: {'met' if rss30 <= GOALS['rss_30'] else 'MISSED'} "
                 f"({rss30:.3f}x)",
                 f"goal step <= {GOALS['step_30']}x dense fused AdamW at 30 %: "
                 f"{'met' if step30 <= GOALS['step_30'] else 'MISSED'} (worst {step30:.3f}x)",
                 f"goal faster than masked for-loop AdamW: {'met' if faster else 'MISSED'}"]
    text += "\n" + "\n".join(goals) + f"\nwall time {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f}"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sparse_adamw_quick" if args.quick else "sparse_adamw"
    (out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    record["time"] = [dict(r) for r in record["time"]]
    common.write_json(out / f"{name}.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
