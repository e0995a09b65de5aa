"""Table 3 of the CHTs/CHTss papers in miniature: validation perplexity of a small LLaMA
trained sparse from scratch with every method, same data, model and token budget.

    python bench/quality.py                       # default grid (CPU, see bench/README.md for the budget)
    python bench/quality.py --quick --out /tmp/q  # smoke run (1 seed, 2 methods, 1 density, few steps)
    python bench/quality.py --preset llama-60m    # the paper's smallest model (512/1376/8/8, seq 256): GPU sized

Data: ``pydoc_data.topics.topics`` (ships with CPython; optionally more text via
``--text-files``), byte-level BPE trained with ``tokenizers`` (cached next to the
results), packed into blocks of ``seq`` tokens; the last 10% of the token stream is
the validation split. Each finished run is appended to ``<out>/quality_runs.jsonl``
so an interrupted grid resumes where it stopped (``--fresh`` ignores old runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

try:
    from bench import _common as common
except ImportError:  # run as a script: python bench/quality.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore

ALL_METHODS = ["dense", "set", "rigl", "cht", "chts", "chtss", "gmp"]
DECAY_METHODS = ("chtss", "gmp")  # start denser than the target; --initial-density applies to these only

PRESETS = {
    # default CPU size: ~1.1 M decoder-linear weights; measured in bench/README.md
    "tiny": dict(hidden=128, ffn=344, layers=4, heads=4, seq=128, batch=8, steps=300, vocab=1024),
    # the paper's LLaMA-60M (needs a GPU; vocab is still our small BPE unless --vocab is raised)
    "llama-60m": dict(hidden=512, ffn=1376, layers=8, heads=8, seq=256, batch=64, steps=10000, vocab=1024),
}


# ------------------------------------------------------------------ data
def load_text(text_files: list[str]) -> str:
    from pydoc_data.topics import topics

    parts = [topics[key] for key in sorted(topics)]
    for path in text_files or []:
        parts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def get_tokenizer(text: str, vocab: int, cache_dir: Path):
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    digest = hashlib.sha1(text.encode("utf-8", errors="replace")).hexdigest()[:10]
    path = cache_dir / f"bpe_{vocab}_{digest}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = ByteLevelBPETokenizer()
    chunks = text.split("\n\n")
    tokenizer.train_from_iterator(chunks, vocab_size=vocab, min_frequency=2, show_progress=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return Tokenizer.from_file(str(path))


def build_data(args, cache_dir: Path):
    import torch

    text = load_text(args.text_files)
    tokenizer = get_tokenizer(text, args.vocab, cache_dir)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    split = int(len(ids) * 0.9)
    train, val = ids[:split], ids[split:]
    seq = args.seq
    train_blocks = train[: len(train) // seq * seq].view(-1, seq)
    val_blocks = val[: len(val) // seq * seq].view(-1, seq)
    if args.val_blocks:
        val_blocks = val_blocks[: args.val_blocks]
    return dict(train=train_blocks, val=val_blocks, vocab=tokenizer.get_vocab_size(), chars=len(text),
                tokens=len(ids))


# ----------------------------------------------------------------- model
def build_model(args, vocab: int, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=args.initializer_range,
    )
    model = transformers.LlamaForCausalLM(config)
    return model


def update_interval(args) -> int:
    if args.delta:
        return args.delta
    # >= 12 updates inside the update window (0.75 * steps)
    return max(1, int(0.75 * args.steps) // 12)


def sparsify_config(args, method: str, density: float, seed: int):
    from hf_chts import SparsifyConfig

    extra = {}
    if method == "cht" and args.cht_regrowth != "ch3_l3":
        extra["regrowth"] = args.cht_regrowth
    initial = initial_density(args, method)
    if initial is not None:
        extra["initial_density"] = initial
        if method == "gmp" and initial < 1.0:
            extra["init"] = "er"  # gmp's preset init 'dense' needs density 1; a sparse start is random (ER)
    return SparsifyConfig(method=method, target_density=density, update_interval=update_interval(args), seed=seed,
                          removal_fraction=args.zeta, **extra)




def initial_density(args, method: str):
    """--initial-density for the decaying methods (chtss/gmp); None = the preset's (1.0)."""
    if method in DECAY_METHODS and args.initial_density is not None:
        return float(args.initial_density)
    return None


def evaluate(model, blocks, batch: int) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            x = blocks[start:start + batch].to(next(model.parameters()).device)
            losses.append(float(model(input_ids=x, labels=x).loss) * len(x))
    model.train()
    return sum(losses) / len(blocks)


def run_one(args, data, method: str, density: float, seed: int, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from hf_chts import sparsify, sparsity_report
    from hf_chts.engine import SparseTrainingEngine

    model = build_model(args, data["vocab"], seed).to(args.device)
    model.train()
    dense = method == "dense"
    engine = None
    config = None
    if not dense:
        config = sparsify_config(args, method, density, seed)
        sparsify(model, config)
    lr = args.lr_dense if dense else args.lr_sparse
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    warmup = max(1, int(args.warmup_fraction * args.steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    if not dense:
        engine = SparseTrainingEngine(model, total_steps=args.steps, optimizer=optimizer)
    generator = torch.Generator().manual_seed(10_000 + seed)
    train = data["train"]
    losses = []
    started = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{method}@{density:g} s{seed}", leave=False, disable=not progress,
               mininterval=5)
    for _ in bar:
        index = torch.randint(0, len(train), (args.batch,), generator=generator)
        x = train[index].to(args.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            engine.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    train_seconds = time.perf_counter() - started
    val_loss = evaluate(model, data["val"], args.batch)
    row = dict(method=method, density=1.0 if dense else density, seed=seed, lr=lr, val_loss=val_loss,
               val_ppl=math.exp(val_loss), train_loss=sum(losses[-20:]) / min(20, len(losses)),
               train_seconds=train_seconds, steps=args.steps)
    if dense:
        row.update(final_density=1.0, anp=1.0, updates=0, update_seconds=0.0, regrowth="-")
    else:
        report = sparsity_report(model)
        row.update(final_density=report.density, anp=report.anp, updates=len(engine.history),
                   update_seconds=sum(s.seconds for s in engine.history), regrowth=config.regrowth,
                   initial_density=config.initial_density)
        engine.close()
    return row


# --------------------------------------------------------------- driver
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS)
    parser.add_argument("--densities", nargs="+", type=float, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--ffn", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--delta", type=int, default=None, help="update interval Δ (default: 0.75*steps//12)")
    parser.add_argument("--zeta", type=float, default=0.1, help="removal fraction ζ")
    parser.add_argument("--lr-sparse", type=float, default=3e-3)
    parser.add_argument("--lr-dense", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--initializer-range", type=float, default=0.02, help="LlamaConfig.initializer_range")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 disables)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--val-blocks", type=int, default=64, help="cap on validation blocks (0 = all; default 64 = 8192 tokens)")
    parser.add_argument("--initial-density", type=float, default=None,
                        help="start density of chtss/gmp (default: the preset's 1.0 = dense; the CHTss paper uses 0.5); "
                             "other methods ignore it. gmp below 1.0 starts from a random (ER) mask")
    parser.add_argument("--cht-regrowth", default="ch3_l3", choices=["ch3_l3", "ch3_l3n"],
                        help="CHT's regrowth: path-based ch3_l3 (paper) or node-based ch3_l3n (faster)")
    parser.add_argument("--text-files", nargs="*", default=[])
    parser.add_argument("--device", default="cpu", help="torch device (e.g. cuda for --preset llama-60m; only CPU was tested here)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core CPU more threads made steps 4x slower; 0 = torch default)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in <out>/quality_runs.jsonl")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 methods, 1 density, very few steps")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: summarise the runs already in <out>/quality_runs.jsonl (and --merge)")
    parser.add_argument("--merge", nargs="*", type=Path, default=[],
                        help="other result directories whose quality_runs.jsonl rows join the summary")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.quick:
        preset.update(hidden=32, ffn=64, layers=2, heads=2, seq=32, batch=4, steps=24, vocab=300)
        args.methods = args.methods or ["dense", "chtss"]
        args.densities = args.densities or [0.3]
        args.seeds = args.seeds or [0]
        args.val_blocks = args.val_blocks or 16
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = args.methods or list(ALL_METHODS)
    args.densities = args.densities or [0.3, 0.1]
    args.seeds = args.seeds or [0, 1, 2]
    return args


def run_key(args, method, density, seed) -> str:
    shape = f"h{args.hidden}f{args.ffn}l{args.layers}a{args.heads}s{args.seq}b{args.batch}v{args.vocab}"
    extra = f"T{args.steps}d{update_interval(args)}z{args.zeta}lr{args.lr_sparse}/{args.lr_dense}wd{args.weight_decay}"
    if args.clip != 1.0:
        extra += f"clip{args.clip}"
    if args.initializer_range != 0.02:
        extra += f"init{args.initializer_range}"
    regrowth = args.cht_regrowth if method == "cht" else ""
    initial = initial_density(args, method)
    if initial is not None and not math.isclose(initial, 1.0):  # 1.0 is the preset: same key as older runs
        regrowth += f"@{initial:g}"
    return f"{shape}|{extra}|{method}{regrowth}|{1.0 if method == 'dense' else density}|{seed}"


def _row_from_record(record: dict) -> dict:
    row = dict(record["row"])
    if "lr" not in row:  # older records: the learning rates are in the key ("lr<sparse>/<dense>")
        part = next(p for p in record["key"].split("|") if "lr" in p)
        sparse_lr, dense_lr = part.split("lr", 1)[1].split("wd")[0].split("/")
        row["lr"] = float(dense_lr if row["method"] == "dense" else sparse_lr)
    if "initial_density" not in row:  # older records: every method ran at its preset's start density
        row["initial_density"] = 1.0 if row["method"] in DECAY_METHODS + ("dense",) else row["density"]
    return row


def summarize(rows: list[dict], reference_dense_lr: float = 1e-3) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        initial = row.get("initial_density", 1.0) if row["method"] in DECAY_METHODS else None
        groups.setdefault((row["method"], row["density"], row.get("regrowth", "-"), row.get("lr"), initial), []).append(row)
    dense_ppl = None
    dense_keys = [k for k in groups if k[0] == "dense"]
    if dense_keys:
        reference = [k for k in dense_keys if k[3] is not None and math.isclose(k[3], reference_dense_lr)] or dense_keys
        dense_ppl = common.mean_std([r["val_ppl"] for k in reference[:1] for r in groups[k]])[0]
    summary = []
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    for (method, density, regrowth, lr, initial), group in sorted(
            groups.items(), key=lambda kv: (-kv[0][1], order[kv[0][0]], kv[0][3] or 0, -(kv[0][4] or 0))):
        ppl_mean, ppl_std = common.mean_std([r["val_ppl"] for r in group])
        summary.append(dict(
            method=method, density=density, regrowth=regrowth, lr=lr, initial_density=initial, seeds=len(group), ppl_mean=ppl_mean, ppl_std=ppl_std,
            ratio_to_dense=ppl_mean / dense_ppl if dense_ppl else float("nan"),
            anp=common.mean_std([r["anp"] for r in group])[0],
            final_density=common.mean_std([r["final_density"] for r in group])[0],
            updates=group[0]["updates"],
            train_s=common.mean_std([r["train_seconds"] for r in group])[0],
            update_s=common.mean_std([r["update_seconds"] for r in group])[0],
        ))
    return summary


def format_summary(summary: list[dict], title: str) -> str:
    rows = []
    # "chtss@0.5": the start density is shown when it is not the preset's 1.0, or when a method appears with several
    starts = {}
    for s in summary:
        starts.setdefault(s["method"], set()).add(s.get("initial_density"))
    for s in summary:
        initial = s.get("initial_density")
        show = initial is not None and (not math.isclose(initial, 1.0) or len(starts[s["method"]]) > 1)
        rows.append(dict(
            method=s["method"] + (f"@{initial:.1f}" if show else "")
            + (" (ch3_l3n)" if s["method"] == "cht" and s["regrowth"] == "ch3_l3n" else "")
            + (f" lr {s['lr']:g}" if s["method"] == "dense" and s.get("lr") else ""),
            density=f"{s['density']:.2f}", seeds=str(s["seeds"]),
            ppl=f"{s['ppl_mean']:.3f} ± {s['ppl_std']:.3f}", ratio=f"{s['ratio_to_dense']:.3f}",
            anp=f"{s['anp']:.4f}", final_density=f"{s['final_density']:.4f}", updates=str(s["updates"]),
            train_s=f"{s['train_s']:.1f}", update_s=f"{s['update_s']:.2f}",
        ))
    columns = [("method", "method"), ("density", "density"), ("seeds", "seeds"), ("ppl", "val ppl (mean ± std)"),
               ("ratio", "ratio to dense"), ("anp", "ANP"), ("final_density", "final density"),
               ("updates", "updates"), ("train_s", "train s/run"), ("update_s", "topo-update s/run")]
    return common.table(rows, columns, title)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache"
    runs_path = out / ("quality_quick_runs.jsonl" if args.quick else "quality_runs.jsonl")
    done: dict[str, dict] = {}
    if runs_path.exists() and not args.fresh:
        for line in runs_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                record["row"] = _row_from_record(record)
                done[record["key"]] = record
    data = build_data(args, cache_dir)
    delta = update_interval(args)
    tokens_per_run = args.steps * args.batch * args.seq
    budget = (f"model hidden {args.hidden} / ffn {args.ffn} / {args.layers} layers / {args.heads} heads, vocab "
              f"{data['vocab']}, seq {args.seq}, batch {args.batch}, {args.steps} steps = {tokens_per_run:,} tokens "
              f"per run; corpus {data['chars']:,} chars = {data['tokens']:,} tokens ({len(data['train'])} train / "
              f"{len(data['val'])} val blocks); Δ={delta} (updates while t ≤ {int(0.75 * args.steps)}), ζ={args.zeta}, "
              f"AdamW lr {args.lr_sparse:g} sparse / {args.lr_dense:g} dense, warm-up {args.warmup_fraction:.0%}, "
              f"cosine to 10%; CHT regrowth {args.cht_regrowth}")
    print(budget, flush=True)
    plan = []
    for density in args.densities:  # the first density over all seeds first: partial grids stay useful
        for seed in args.seeds:
            for method in args.methods:
                if method == "dense" and density != args.densities[0]:
                    continue  # dense once per seed
                plan.append((method, density, seed))
    rows = []
    from tqdm import tqdm

    if args.report_only:
        plan = []
        rows = [record["row"] for record in done.values()]
    for directory in args.merge:
        path = directory / runs_path.name if directory.is_dir() else directory
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["key"] not in done:
                    rows.append(_row_from_record(record))
    for method, density, seed in tqdm(plan, desc="quality grid", disable=args.no_progress):
        key = run_key(args, method, density, seed)
        if key in done:
            rows.append(done[key]["row"])
            continue
        row = run_one(args, data, method, density, seed, progress=not args.no_progress)
        rows.append(row)
        with open(runs_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "row": row}) + "\n")
        print(f"  {method:<6} density {row['density']:.2f} seed {seed}: val ppl {row['val_ppl']:.3f}  "
              f"ANP {row['anp']:.3f}  density {row['final_density']:.4f}  {row['train_seconds']:.1f} s "
              f"({row['update_seconds']:.2f} s in {row['updates']} updates)", flush=True)
    summary = summarize(rows, args.lr_dense)
    text = format_summary(summary, f"Validation perplexity (lower is better); ratio = ppl / ppl of dense at lr {args.lr_dense:g}")
    print()
    print(text)
    stem = "quality_quick" if args.quick else "quality"
    common.write_csv(out / f"{stem}.csv", summary)
    common.write_json(out / f"{stem}.json", dict(budget=budget, args={k: str(v) for k, v in vars(args).items()},
                                                 machine=common.machine_info(), summary=summary, runs=rows))
    return dict(summary=summary, runs=rows, table=text, budget=budget)


if __name__ == "__main__":
    main()
