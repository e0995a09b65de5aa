"""Cost of sparse training with hf_chts on CPU: step time, topology-update time, memory, checkpoint bytes.

    python bench/speed.py                        # everything at the default sizes (~15-25 min on 2 busy cores)
    python bench/speed.py --parts step update    # a subset: step, update, overhead, memory, checkpoint
    python bench/speed.py --quick --out /tmp/s   # smoke run (tiny shapes, 1 repeat)

Parts
- step: forward+backward+AdamW step of a sparsified LLaMA vs the same dense model and, when
  installed, the same model under sparsimony / torch.ao.pruning (bench/train_step.py), all
  interleaved in one run. 60M/130M shapes time two decoder blocks with a small vocabulary.
- masking: kernels that zero a gradient at masked positions (LLaMA-130M block weights), exact or not.
- update: per-layer topology-update time vs layer size: CH2-L3n matrix form
  (unchunked and chunked under a small memory budget), path-based CH3-L3 reference
  (skipped with an extrapolation above a time cap), soft removal and the sampling
  part of regrowth.
- overhead: one full engine update (prune/remove/percolate/regrow) of LLaMA-130M-shaped
  blocks divided by 100 training steps (Δ = 100).
- memory: mask bytes per sparsified weight, peak RSS of training with/without
  sparsity (separate subprocesses), peak extra RSS of one CH2-L3n score computation.
- checkpoint: bytes of dense, dense-with-masks and compact checkpoints (hf_chts.save_sparse).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from bench import _common as common
    from bench import train_step
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore
    import train_step  # type: ignore

SHAPES = {
    # name: hidden, ffn, layers timed, heads, seq, batch
    "tiny": dict(hidden=128, ffn=344, layers=4, heads=4, seq=128, batch=8),
    "llama-60m (2 of 8 blocks)": dict(hidden=512, ffn=1376, layers=2, heads=8, seq=256, batch=2),
    "llama-130m (2 of 12 blocks)": dict(hidden=768, ffn=2048, layers=2, heads=12, seq=256, batch=2),
    "llama-130m (2 of 12 blocks) b8": dict(hidden=768, ffn=2048, layers=2, heads=12, seq=256, batch=8),
}
QUICK_SHAPES = {"tiny-quick": dict(hidden=32, ffn=64, layers=2, heads=2, seq=32, batch=2)}
LLAMA_130M = dict(hidden=768, ffn=2048, layers=12, heads=12)
PAPER_TOKENS_PER_STEP = 512 * 256  # global batch 512 x seq 256


def build_llama(shape: dict, vocab: int = 1024, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=max(shape.get("seq", 256), 256), tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def sparse_setup(model, density: float, total_steps: int = 10**7, update_interval: int = 10**6):
    import torch

    from hf_chts import SparsifyConfig, sparsify
    from hf_chts.engine import SparseTrainingEngine

    sparsify(model, SparsifyConfig(method="chts", target_density=density, update_interval=update_interval, seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = SparseTrainingEngine(model, total_steps=total_steps, optimizer=optimizer)
    return optimizer, engine


# ------------------------------------------------------------- update time
def random_mask(rows: int, cols: int, density: float, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(rows * cols, generator=generator)
    n = int(round(density * rows * cols))
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.topk(keys, n).indices] = True
    return mask.view(rows, cols)


def chunk_budget(rows: int, cols: int, chunks: int) -> int:
    """A memory budget that makes ch_l3n_scores use about ``chunks`` row blocks on the larger side."""
    from hf_chts.topology import score_memory_bytes

    return int(score_memory_bytes(rows, cols, math.ceil(max(rows, cols) / chunks)))


def timed(fn, repeats: int):
    import statistics

    times = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def part_update(args) -> list[dict]:
    import torch
    from tqdm import tqdm

    from hf_chts.topology.ch_scores import ch3_l3_path_scores, ch_l3n_scores
    from hf_chts.topology.regrowth import regrow, select_candidates
    from hf_chts.topology.removal import soft_removal

    sizes = [(64, 64), (128, 128)] if args.quick else [(256, 256), (512, 512), (1024, 1024), (2048, 2048),
                                                        (4096, 4096), (2048, 5461)]
    rows = []
    path_times: list[tuple[int, float]] = []  # (rows*cols, seconds) for extrapolation
    generator = torch.Generator().manual_seed(0)
    for n_out, n_in in tqdm(sizes, desc="update time", disable=args.no_progress):
        n = n_out * n_in
        repeats = args.repeats if n <= 1024 * 1024 else max(1, min(args.repeats, 2)) if n <= 2048 * 2048 else 1
        mask = random_mask(n_out, n_in, args.density)
        weight = torch.randn(n_out, n_in) * mask
        live = int(mask.sum())
        n_remove = int(0.1 * live)
        t_remove, removed = timed(lambda: soft_removal(weight, mask, live - n_remove, 1.0, 1.0, generator=generator),
                                  repeats)
        t_matrix, scores = timed(lambda: ch_l3n_scores(removed, "ch2", None), repeats)
        chunks = 8
        budget = chunk_budget(n_out, n_in, chunks)
        t_chunked, scores_chunked = timed(lambda: ch_l3n_scores(removed, "ch2", budget), repeats)
        max_diff = float((scores - scores_chunked).abs().max())
        candidates = ~removed
        t_select, _ = timed(lambda: select_candidates(scores, candidates, n_remove, 1.0, generator), repeats)
        t_regrow, _ = timed(lambda: regrow(removed, n_remove, "ch2_l3n", generator=generator), repeats)
        # path-based reference, with a time cap
        path_s, path_note = None, ""
        predicted = None
        if len(path_times) >= 2:
            (n1, t1), (n2, t2) = path_times[-2], path_times[-1]
            exponent = math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and n2 != n1 else 2.0
            predicted = t2 * (n / n2) ** exponent
        elif len(path_times) == 1:
            predicted = path_times[-1][1] * (n / path_times[-1][0]) ** 2.0
        if predicted is not None and predicted > args.path_cap:
            path_note = f"skipped; extrapolated {predicted:.0f} s"
            path_s = predicted
        else:
            started = time.perf_counter()
            ch3_l3_path_scores(removed)
            path_s = time.perf_counter() - started
            path_times.append((n, path_s))
            path_note = "measured"
        rows.append(dict(
            layer=f"{n_out}x{n_in}", links=live, remove_s=t_remove, ch2_matrix_s=t_matrix,
            ch2_chunked_s=t_chunked, chunks=chunks, chunk_budget_mb=budget / 2**20, chunk_max_abs_diff=max_diff,
            sampling_s=t_select, regrow_total_s=t_regrow, update_total_s=t_remove + t_regrow,
            path_ch3_s=path_s, path_note=path_note, speedup_matrix_vs_path=path_s / t_matrix if path_s else None,
            repeats=repeats,
        ))
    return rows


# -------------------------------------------------------------- overhead
def part_overhead(args, step_rows: list[dict]) -> dict:
    """Engine update of 2 LLaMA-130M blocks, scaled to 12, divided by 100 steps of the same blocks."""
    import statistics

    import torch

    shape = dict(QUICK_SHAPES["tiny-quick"]) if args.quick else dict(SHAPES["llama-130m (2 of 12 blocks)"])
    full_layers = 2 if args.quick else LLAMA_130M["layers"]
    model = build_llama(shape)
    model.train()
    optimizer, engine = sparse_setup(model, args.density, total_steps=1000, update_interval=1)
    x = torch.randint(0, 1024, (shape["batch"], shape["seq"]))
    update_times, step_times = [], []
    for _ in range(max(1, args.repeats // 2 if not args.quick else 1)):
        started = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - started)
        stats = engine.step()  # update_interval=1: a full topology update every step
        update_times.append(stats.seconds)
    engine.close()
    step_row = next((r for r in step_rows if r["shape"] == "llama-130m (2 of 12 blocks)" and r.get("method") == "hf_chts"
                     and r.get("optimizer") == "adamw"), None)
    step_s = step_row["wall_ms"] / 1e3 if step_row else statistics.median(step_times)
    update_s = statistics.median(update_times)
    scale = full_layers / shape["layers"]
    tokens = shape["batch"] * shape["seq"]
    overhead_micro = update_s * scale / (100 * step_s * scale)
    overhead_paper = update_s * scale / (100 * step_s * scale * PAPER_TOKENS_PER_STEP / tokens)
    return dict(
        shape=f"LLaMA-130M blocks 768/2048 (measured {shape['layers']}, scaled to {full_layers})",
        update_s_measured_blocks=update_s, update_s_all_layers=update_s * scale,
        step_s_measured_blocks=step_s, tokens_per_step=tokens,
        overhead_pct_micro_batch=100 * overhead_micro,
        overhead_pct_paper_batch=100 * overhead_paper,
        note=(f"overhead = update time / (100 x step time). micro batch = {tokens} tokens/step as measured; "
              f"paper batch = 512x256 = {PAPER_TOKENS_PER_STEP} tokens/step, step time scaled linearly in tokens. "
              "Embedding/lm_head excluded from the step time (makes the percentage an over-estimate)."),
    )


# ---------------------------------------------------------------- memory
MEMPROBE = r"""
import json, sys, time
import torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
mode, hidden, ffn, layers, heads, seq, batch, density = {params!r}
def _status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")
def reset_peak():  # Linux: reset VmHWM to the current RSS (ru_maxrss would keep the parent's peak across exec)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
def rss_mb():  # peak resident set size since the last reset_peak()
    return _status("VmHWM")
def cur_mb():
    return _status("VmRSS")
out = {{}}
if mode in ("dense", "sparse"):
    import transformers
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config); model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = None
    if mode == "sparse":
        from hf_chts import SparsifyConfig, sparsify
        from hf_chts.engine import SparseTrainingEngine
        sparsify(model, SparsifyConfig(method="chts", target_density=density, update_interval=10**6, seed=0))
        engine = SparseTrainingEngine(model, total_steps=10**7, optimizer=optimizer)
    out["rss_after_build_mb"] = rss_mb()
    x = torch.randint(0, 1024, (batch, seq))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
        if engine is not None: engine.step()
    out["peak_rss_training_mb"] = rss_mb()
    if engine is not None:
        reset_peak()
        before = cur_mb()
        engine.update_topology()
        out["peak_rss_after_update_mb"] = rss_mb()
        out["update_extra_peak_mb"] = rss_mb() - before
else:  # one CH2-L3n score computation on an rows x cols mask
    from hf_chts.topology.ch_scores import ch_l3n_scores
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(hidden, ffn, generator=g) < density
    reset_peak()
    before = cur_mb()
    ch_l3n_scores(mask, "ch2", None if mode == "scores" else int(mode.split(":")[1]))
    out["scores_extra_peak_mb"] = rss_mb() - before
    out["baseline_mb"] = before
print("MEMPROBE" + json.dumps(out))
"""


def memprobe(params: tuple) -> dict:
    code = MEMPROBE.format(root=str(common.BENCH_DIR.parent), params=params)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    for line in result.stdout.splitlines():
        if line.startswith("MEMPROBE"):
            return json.loads(line[len("MEMPROBE"):])
    raise RuntimeError(f"memory probe failed: {result.stderr[-2000:]}")


def ch_temporaries_mb(rows: int, cols: int, chunk_rows: int | None = None) -> float:
    """Analytic peak of ch_l3n_scores' big temporaries (constants from hf_chts.topology.ch_scores)."""
    from hf_chts.topology import score_memory_bytes

    return score_memory_bytes(rows, cols, chunk_rows) / 2**20


def part_memory(args) -> dict:
    import torch

    shape = QUICK_SHAPES["tiny-quick"] if args.quick else SHAPES["llama-60m (2 of 8 blocks)"]
    model = build_llama(shape)
    optimizer, engine = sparse_setup(model, args.density)
    masks = [layer.mask for layer in engine.layers.values()]
    mask_bytes = sum(m.numel() * m.element_size() for m in masks)
    n_weights = sum(m.numel() for m in masks)
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = 16 * n_params  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq
    engine.close()
    del model, optimizer, engine
    params = (shape["hidden"], shape["ffn"], shape["layers"], shape["heads"], shape["seq"], shape["batch"], args.density)
    dense = memprobe(("dense",) + params)
    sparse = memprobe(("sparse",) + params)
    score_shape = (256, 256) if args.quick else (2048, 5461)
    rows, cols = score_shape
    unchunked = memprobe(("scores", rows, cols, 0, 0, 0, 0, args.density))
    budget = chunk_budget(rows, cols, 8)
    chunked = memprobe((f"chunked:{budget}", rows, cols, 0, 0, 0, 0, args.density))
    return dict(
        shape=("tiny-quick" if args.quick else "llama-60m (2 of 8 blocks)"),
        mask_bytes=mask_bytes, sparsified_weights=n_weights, mask_bytes_per_weight=mask_bytes / n_weights,
        training_state_bytes_dense=state_bytes, training_state_bytes_sparse=state_bytes + mask_bytes,
        training_state_ratio=(state_bytes + mask_bytes) / state_bytes,
        dense_peak_rss_mb=dense["peak_rss_training_mb"], sparse_peak_rss_mb=sparse["peak_rss_training_mb"],
        sparse_over_dense_rss=sparse["peak_rss_training_mb"] / dense["peak_rss_training_mb"],
        update_extra_peak_mb=sparse.get("update_extra_peak_mb"),
        scores_layer=f"{rows}x{cols}",
        scores_extra_peak_mb=unchunked["scores_extra_peak_mb"],
        scores_estimate_mb=ch_temporaries_mb(rows, cols),
        chunked_budget_mb=budget / 2**20, chunked_extra_peak_mb=chunked["scores_extra_peak_mb"],
        note="peak RSS = VmHWM of /proc/self/status in fresh subprocesses (reset with clear_refs before the measured "
             "call); extra peak = peak during the call minus RSS before it (a lower bound when freed memory is reused).",
    )


# ------------------------------------------------------------- checkpoint
def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def part_checkpoint(args) -> dict:
    import torch

    shape = QUICK_SHAPES["tiny-quick"] if args.quick else SHAPES["llama-60m (2 of 8 blocks)"]
    dense_model = build_llama(shape)
    sparse_model = build_llama(shape)
    optimizer, engine = sparse_setup(sparse_model, args.density)
    n_sparse = sum(layer.mask.numel() for layer in engine.layers.values())
    sparse_weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in engine.layers.values())
    result = dict(shape="tiny-quick" if args.quick else "llama-60m (2 of 8 blocks)", density=args.density,
                  sparsified_weights=n_sparse, sparsified_weight_bytes_dense=sparse_weight_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense_model.save_pretrained(tmp / "dense")
        files = dir_bytes(tmp / "dense")
        dense_bytes = sum(v for k, v in files.items() if k.endswith(".safetensors"))
        result["dense_bytes"] = dense_bytes
        try:
            from hf_chts.checkpoint import save_sparse

            save_sparse(sparse_model, tmp / "masked")
            save_sparse(sparse_model, tmp / "compact", compact=True)
            masked = dir_bytes(tmp / "masked")
            compact = dir_bytes(tmp / "compact")
            result["source"] = "hf_chts.checkpoint.save_sparse"
            result["masked_bytes"] = sum(v for k, v in masked.items() if k.endswith(".safetensors"))
            result["compact_bytes"] = sum(v for k, v in compact.items() if k.endswith(".safetensors"))
            result["masked_files"] = masked
            result["compact_files"] = compact
        except Exception as error:  # noqa: BLE001 - fall back to a labelled local estimate
            result["source"] = f"local estimate (save_sparse unavailable: {type(error).__name__}: {error})"
            mask_bytes = sum(math.ceil(m.numel() / 8) for m in (l.mask for l in engine.layers.values()))
            live = sum(int(l.mask.sum()) for l in engine.layers.values())
            result["masked_bytes"] = dense_bytes + mask_bytes
            result["compact_bytes"] = dense_bytes - sparse_weight_bytes + live * 4 + mask_bytes
    engine.close()
    other = result["dense_bytes"] - sparse_weight_bytes
    result["masked_over_dense"] = result["masked_bytes"] / result["dense_bytes"]
    result["compact_over_dense"] = result["compact_bytes"] / result["dense_bytes"]
    # the target is about the sparsified weights: subtract the untouched tensors (embeddings, norms, lm_head)
    result["compact_sparsified_part_bytes"] = result["compact_bytes"] - other
    result["compact_over_dense_sparsified_part"] = result["compact_sparsified_part_bytes"] / sparse_weight_bytes
    return result


# ---------------------------------------------------------------- driver
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["step", "masking", "update", "overhead", "memory", "checkpoint"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (medians are reported)")
    parser.add_argument("--path-cap", type=float, default=120.0,
                        help="skip the path-based CH3-L3 reference when its extrapolated time exceeds this (s)")
    parser.add_argument("--optimizers", nargs="+", default=list(train_step.OPTIMIZERS), choices=list(train_step.OPTIMIZERS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES) + list(QUICK_SHAPES),
                        help="step part: only these shapes (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="step part: skip sparsimony / torch.ao rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch default)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "speed_quick" if args.quick else "speed"
    json_path = args.out / f"{stem}.json"
    results: dict = {}
    if json_path.exists():  # keep parts not rerun this time
        try:
            results = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            results = {}
    results["machine"] = common.machine_info()
    results["density"] = args.density
    texts = []
    if "step" in args.parts:
        shapes = QUICK_SHAPES if args.quick else SHAPES
        results["step"], results["step_peers_skipped"] = train_step.part_step(args, shapes, build_llama)
        common.write_csv(args.out / f"{stem}_step.csv", results["step"])
    if "step" in results:
        texts.append(train_step.step_table(results["step"], args.density, results.get("step_peers_skipped", {})))
    if "masking" in args.parts:
        shape = SHAPES["llama-130m (2 of 12 blocks)"]
        results["masking"], results["sqrt"] = train_step.masking_rows(shape, args), train_step.sqrt_of_zeros_row(shape, args)
        texts.append(train_step.masking_table(results["masking"]) + "\n" + train_step.sqrt_of_zeros_text(results["sqrt"]))
    if "update" in args.parts:
        results["update"] = part_update(args)
        common.write_csv(args.out / f"{stem}_update.csv", results["update"])
    if "update" in results:
        rows = []
        for r in results["update"]:
            rows.append(dict(layer=r["layer"], links=f"{r['links']:,}", remove=f"{r['remove_s']:.4f}",
                             matrix=f"{r['ch2_matrix_s']:.4f}", chunked=f"{r['ch2_chunked_s']:.4f}",
                             sampling=f"{r['sampling_s']:.4f}", regrow=f"{r['regrow_total_s']:.4f}",
                             total=f"{r['update_total_s']:.4f}",
                             path=(f"{r['path_ch3_s']:.3f}" if r["path_note"] == "measured"
                                   else f"~{r['path_ch3_s']:.0f} (extrap.)"),
                             speedup=f"{r['speedup_matrix_vs_path']:.0f}x"))
        texts.append(common.table(rows, [("layer", "layer"), ("links", "live links"), ("remove", "soft removal s"),
                                         ("matrix", "CH2-L3n matrix s"), ("chunked", "CH2-L3n chunked(8) s"),
                                         ("sampling", "regrow sampling s"), ("regrow", "regrow total s"),
                                         ("total", "removal+regrowth s"), ("path", "path CH3-L3 s"),
                                         ("speedup", "matrix vs path")],
                                  f"Topology update per layer, density {args.density}, ζ=0.1 (median of repeats)"))
    if "overhead" in args.parts:
        results["overhead"] = part_overhead(args, results.get("step", []))
    if "overhead" in results:
        o = results["overhead"]
        texts.append(
            f"Amortised topology-update overhead at Δ=100 ({o['shape']}):\n"
            f"  one engine update of all layers: {o['update_s_all_layers']:.2f} s; training step of the measured "
            f"blocks: {o['step_s_measured_blocks'] * 1e3:.1f} ms at {o['tokens_per_step']} tokens\n"
            f"  overhead at our micro-batch: {o['overhead_pct_micro_batch']:.2f}% ; at the paper's batch "
            f"(512x256 tokens/step): {o['overhead_pct_paper_batch']:.3f}%\n  ({o['note']})")
    if "memory" in args.parts:
        results["memory"] = part_memory(args)
    if "memory" in results:
        m = results["memory"]
        texts.append(
            f"Memory ({m['shape']}, density {args.density}):\n"
            f"  masks: {m['mask_bytes']:,} bytes for {m['sparsified_weights']:,} sparsified weights = "
            f"{m['mask_bytes_per_weight']:.3f} byte/weight\n"
            f"  training state (weights+grads+AdamW moments, fp32): dense {m['training_state_bytes_dense'] / 2**20:.1f} MB, "
            f"with masks {m['training_state_bytes_sparse'] / 2**20:.1f} MB ({m['training_state_ratio']:.3f}x)\n"
            f"  peak RSS of 3 training steps: dense {m['dense_peak_rss_mb']:.0f} MB, sparse {m['sparse_peak_rss_mb']:.0f} MB "
            f"({m['sparse_over_dense_rss']:.3f}x); extra peak of one engine update: {m['update_extra_peak_mb']:.1f} MB\n"
            f"  one CH2-L3n score computation on {m['scores_layer']}: extra peak {m['scores_extra_peak_mb']:.0f} MB "
            f"unchunked (analytic estimate of the big temporaries {m['scores_estimate_mb']:.0f} MB), "
            f"{m['chunked_extra_peak_mb']:.0f} MB with an {m['chunked_budget_mb']:.0f} MB budget (8 chunks)")
    if "checkpoint" in args.parts:
        results["checkpoint"] = part_checkpoint(args)
    if "checkpoint" in results:
        c = results["checkpoint"]
        rows = [dict(kind="dense (save_pretrained)", bytes=f"{c['dense_bytes']:,}", ratio="1.000"),
                dict(kind="dense weights + masks", bytes=f"{c['masked_bytes']:,}", ratio=f"{c['masked_over_dense']:.3f}"),
                dict(kind="compact", bytes=f"{c['compact_bytes']:,}", ratio=f"{c['compact_over_dense']:.3f}"),
                dict(kind="compact, sparsified weights only", bytes=f"{c['compact_sparsified_part_bytes']:,}",
                     ratio=f"{c['compact_over_dense_sparsified_part']:.3f} (vs {c['sparsified_weight_bytes_dense']:,})")]
        texts.append(common.table(rows, [("kind", "checkpoint"), ("bytes", "bytes (*.safetensors)"),
                                         ("ratio", "ratio to dense")],
                                  f"Checkpoint size ({c['shape']}, density {c['density']}; source: {c['source']})"))
    text = "\n\n".join(texts)
    print(text)
    common.write_json(json_path, results)
    (args.out / f"{stem}.txt").write_text(text + "\n")
    return dict(results=results, table=text)


if __name__ == "__main__":
    main()
