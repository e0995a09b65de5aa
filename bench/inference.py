"""Sparse inference benchmark (issue 12): CSR / auto kernels vs the dense twin, side by side in one run.

LLaMA-130M-shaped decoder blocks (hidden 768, FFN 2048, 12 heads; 2 blocks by
default, small vocabulary so the blocks dominate), sparsified with CHTs masks
at each density and converted with ``hf_chts.to_sparse_inference``. For every
torch thread count and density the dense twin (the masked model), the "csr"
model and the "auto" model are timed interleaved: prefill tokens/s (batch 1,
128-token prompt), decode tokens/s (batch 1 and 8, 32 steps), the rise of
resident memory during a round, and the weight bytes of the sparsified layers.

    python bench/inference.py                       # full run (≈ 5-10 min on the busy 2-core machine)
    python bench/inference.py --threads 1 --densities 0.1
    python bench/inference.py --quick --out /tmp/x  # smoke run (tiny shapes)

Writes inference.json / inference.txt / inference.png (speed-up vs density) into --out.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import torch  # noqa: E402

SHAPE = dict(hidden=768, ffn=2048, heads=12, blocks=2, vocab=512)
QUICK_SHAPE = dict(hidden=64, ffn=128, heads=4, blocks=2, vocab=128)
VARIANTS = ("dense", "csr", "auto")


def build_masked_model(shape: dict, density: float, seed: int = 0):
    import transformers

    from hf_chts import SparsifyConfig, sparsify

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                                      num_hidden_layers=shape["blocks"], num_attention_heads=shape["heads"],
                                      num_key_value_heads=shape["heads"], vocab_size=shape["vocab"],
                                      max_position_embeddings=512)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return sparsify(model, SparsifyConfig(method="chts", target_density=density))


def sparsified_weight_bytes(model) -> int:
    from hf_chts.layers import sparse_layers

    return sum(layer.weight.numel() * layer.weight.element_size() for layer in sparse_layers(model).values())


def kernel_counts(model) -> str:
    from hf_chts.inference import inference_report

    counts = {"csr": 0, "dense": 0}
    for row in inference_report(model)["layers"]:
        counts[row["kernel"]] += 1
    return f"csr {counts['csr']}/{counts['csr'] + counts['dense']}"


def run(args) -> list[dict]:
    from hf_chts.inference import inference_report, to_sparse_inference
    from hf_chts.inference.throughput import compare_throughput, max_logit_difference, random_ids

    shape = QUICK_SHAPE if args.quick else dict(SHAPE, blocks=args.blocks)
    rows = []
    for density in args.densities:
        masked = build_masked_model(shape, density)
        dense_bytes = sparsified_weight_bytes(masked)
        csr = to_sparse_inference(copy.deepcopy(masked), kernel="csr")
        check_ids = random_ids(2, 32, shape["vocab"], seed=3)
        for threads in args.threads:
            torch.set_num_threads(threads)
            auto = to_sparse_inference(copy.deepcopy(masked), kernel="auto")
            models = {"dense": masked, "csr": csr, "auto": auto}
            results = compare_throughput(models, vocab_size=shape["vocab"], prompt_tokens=args.prompt_tokens,
                                         new_tokens=args.new_tokens, decode_batches=tuple(args.decode_batches),
                                         rounds=args.rounds)
            base = results["dense"]
            for name, model in models.items():
                result = results[name]
                weight = dense_bytes if name == "dense" else inference_report(model)["weight_bytes"]
                row = {"threads": threads, "density": density, "variant": name,
                       "prefill_tok_s": result.prefill_tokens_per_s,
                       "prefill_speedup": result.prefill_tokens_per_s / base.prefill_tokens_per_s,
                       "peak_extra_mb": None if result.peak_extra_bytes is None else result.peak_extra_bytes / 2**20,
                       "weight_mb": weight / 2**20, "weight_ratio": weight / dense_bytes,
                       "kernels": "dense" if name == "dense" else kernel_counts(model),
                       "max_logit_diff": 0.0 if name == "dense" else max_logit_difference(model, masked, check_ids)}
                for batch in args.decode_batches:
                    row[f"decode_b{batch}_tok_s"] = result.decode_tokens_per_s[batch]
                    speed, dense_speed = result.decode_tokens_per_s[batch], base.decode_tokens_per_s[batch]
                    row[f"decode_b{batch}_speedup"] = speed / dense_speed
                rows.append(row)
                if not args.no_progress:
                    print(f"threads {threads} density {density:.2f} {name:<5} prefill x{row['prefill_speedup']:.2f} "
                          + " ".join(f"decode b{b} x{row[f'decode_b{b}_speedup']:.2f}" for b in args.decode_batches),
                          flush=True)
    return rows


def run_memory(args) -> list[dict]:
    """Peak resident memory of loading a saved checkpoint: dense twin vs inference model (fresh process each)."""
    import tempfile

    from hf_chts import save_sparse
    from hf_chts.inference.bench_command import load_peak_bytes

    shape = QUICK_SHAPE if args.quick else dict(SHAPE, blocks=args.memory_blocks)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_chts_bench_inference_") as tmp:
        for density in args.densities:
            masked = build_masked_model(shape, density)
            dense_bytes = sparsified_weight_bytes(masked)
            folders = {"dense": Path(tmp) / f"dense_{density}", "compact": Path(tmp) / f"compact_{density}"}
            save_sparse(masked, folders["dense"])
            save_sparse(masked, folders["compact"], compact=True)
            del masked
            loads = [("dense twin (load_sparse)", folders["dense"], False),
                     ("csr from dense-format file", folders["dense"], True),
                     ("csr from compact file", folders["compact"], True)]
            base = None
            for label, folder, inference in loads:
                peak = load_peak_bytes(folder, inference=inference, kernel="csr")
                base = peak if base is None else base
                rows.append({"density": density, "blocks": shape["blocks"], "load": label,
                             "peak_load_mb": None if peak is None else peak / 2**20,
                             "x_dense_twin": None if peak is None or not base else peak / base,
                             "sparsified_dense_mb": dense_bytes / 2**20})
                if not args.no_progress:
                    print(f"memory density {density:.2f} {label}: {rows[-1]['peak_load_mb']} MB", flush=True)
    return rows


def format_table(rows: list[dict], decode_batches) -> str:
    columns = [("threads", "thr"), ("density", "density"), ("variant", "kernel"), ("prefill_tok_s", "prefill tok/s"),
               ("prefill_speedup", "x dense")]
    for batch in decode_batches:
        columns += [(f"decode_b{batch}_tok_s", f"decode b{batch} tok/s"), (f"decode_b{batch}_speedup", "x dense")]
    columns += [("weight_mb", "weight MB"), ("weight_ratio", "x dense"), ("peak_extra_mb", "peak +MB"),
                ("kernels", "layers"), ("max_logit_diff", "max |dlogit|")]
    shown = [{k: (format(v, ".3g") if isinstance(v, float) and k != "density" else v) for k, v in row.items()}
             for row in rows]
    for row, original in zip(shown, rows):
        row["density"] = format(original["density"], ".2f")
        row["max_logit_diff"] = format(original["max_logit_diff"], ".1e")
    return common.table(shown, columns)


def format_memory_table(rows: list[dict]) -> str:
    shown = [{k: (format(v, ".4g") if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
    return common.table(shown, [("density", "density"), ("blocks", "blocks"), ("load", "load"),
                                ("peak_load_mb", "peak RSS rise MB"), ("x_dense_twin", "x dense twin"),
                                ("sparsified_dense_mb", "sparsified weights dense MB")],
                        title="Peak resident memory while loading (fresh process each; csr kernel)")


def plot(rows: list[dict], decode_batches, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf_chts[plot]'); no plot written")
        return None
    panels = [("prefill_speedup", "prefill (batch 1)")] + [(f"decode_b{b}_speedup", f"decode (batch {b})")
                                                            for b in decode_batches]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    for axis, (key, title) in zip(axes, panels):
        for variant, style in (("csr", "-o"), ("auto", "--s")):
            for threads in sorted({row["threads"] for row in rows}):
                points = sorted((row["density"], row[key]) for row in rows
                                if row["variant"] == variant and row["threads"] == threads)
                axis.plot([100 * d for d, _ in points], [s for _, s in points], style,
                          label=f"{variant}, {threads} thread{'s' if threads > 1 else ''}")
        axis.axhline(1.0, color="grey", linewidth=1)
        axis.set_xscale("log")
        densities = sorted({100 * row["density"] for row in rows})
        axis.set_xticks(densities, [f"{d:g}" for d in densities])
        axis.minorticks_off()
        axis.set_xlabel("density (%)")
        axis.set_title(title)
    axes[0].set_ylabel("tokens/s vs dense twin")
    axes[-1].legend(fontsize=8)
    fig.suptitle("hf_chts sparse inference, LLaMA-130M-shaped blocks (CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.1, 0.05])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--blocks", type=int, default=SHAPE["blocks"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per model (best round reported)")
    parser.add_argument("--parts", nargs="+", choices=("speed", "memory"), default=["speed", "memory"])
    parser.add_argument("--memory-blocks", type=int, default=12,
                        help="decoder blocks of the model whose load peak is measured (12 = all of LLaMA-130M)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.densities, args.threads, args.rounds = [0.1], [1], 1
        args.prompt_tokens, args.new_tokens = 16, 4
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    rows, memory_rows, figure, texts = [], [], None, []
    stem = "inference_quick" if args.quick else "inference"
    machine = common.machine_info()
    try:
        if "speed" in args.parts:
            rows = run(args)
            text = format_table(rows, args.decode_batches)
            texts.append(text)
            figure = plot(rows, args.decode_batches, args.out / f"{stem}.png")
            common.write_json(args.out / f"{stem}.json", {"machine": machine, "args": vars(args), "rows": rows})
            (args.out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    finally:
        torch.set_num_threads(threads_before)
    if "memory" in args.parts:
        memory_rows = run_memory(args)
        text = format_memory_table(memory_rows)
        texts.append(text)
        common.write_json(args.out / f"{stem}_memory.json",
                          {"machine": machine, "args": vars(args), "rows": memory_rows})
        (args.out / f"{stem}_memory.txt").write_text(text + "\n", encoding="utf-8")
    print("\n\n".join(texts))
    return {"rows": rows, "memory": memory_rows, "table": "\n\n".join(texts), "plot": figure}

if __name__ == "__main__":
    main()
