"""Method comparison: test perplexity of a small LLaMA trained sparse from scratch by every method,
with each method's learning rate chosen on a validation split (bench/README.md §1 has the results).

    python bench/quality.py                              # the full protocol (63 runs: ≈ 2 h on one busy core)
    python bench/quality.py --report-only                # tables + plots from the runs already done
    python bench/quality.py --quick --corpus FILE --out /tmp/q   # smoke run on a small dictd-style file

Protocol (every knob is the same for every method unless the method name says otherwise):
  1. Corpus: the GCIDE dictionary (``apt-get install dict-gcide``, see bench/_corpus.py), split into
     train / validation / test documents; a byte-level BPE tokenizer is trained on the train split.
  2. Selection: for every (method, density), one run per learning rate of ``--lrs`` with the
     selection seed; the LR with the lowest *validation* loss is chosen.
  3. Test: every seed of ``--seeds`` at the chosen LR; reported is the *test* perplexity. A run of the
     selection seed at the chosen LR is reused (its test split was never looked at for the choice).
  Per seed, every method starts from the same dense initialisation (``torch.manual_seed(seed)``) and
  sees the same batches in the same order; all use AdamW (β 0.9/0.95), gradient clipping, 10 %
  warm-up then cosine to 10 % of the LR, the same Δ (≥ ``--updates`` topology updates while
  t ≤ 0.75 T), ζ and update window. Each finished run is appended to ``<out>/quality_runs.jsonl``;
  a restarted grid skips the runs found there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

try:
    from bench import _common as common
    from bench import _corpus as corpus
    from bench import _quality_report as report
except ImportError:  # run as a script: python bench/quality.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore
    import _corpus as corpus  # type: ignore
    import _quality_report as report  # type: ignore

# method label -> (SparsifyConfig preset, initial density or None for the preset's, extra config fields).
# "@x" = start density x; "-released" = the authors' released recipe (parity=True, docs/parity.md).
METHODS = {
    "dense": ("dense", None, {}),
    "set": ("set", None, {}),
    "rigl": ("rigl", None, {}),
    "chts": ("chts", None, {}),
    "chtss@1.0": ("chtss", 1.0, {}),  # this package's default: decay from a dense start
    "chtss@0.5": ("chtss", 0.5, {}),  # the CHTss paper's start
    "gmp": ("gmp", 1.0, {}),
    "gmp@0.5": ("gmp", 0.5, {}),  # the start-density knob for GMP too
    "cht": ("cht", None, {}),  # not in the default grid: path-based CH3-L3 is slow
    "chts-released": ("chts", None, {"parity": True}),
    # the released CHTss run: start 0.5, decay until 0.8 T while updates stop at 0.75 T (--pruning_T_end 8000)
    "chtss-released@0.5": ("chtss", 0.5, {"parity": True, "decay_end_fraction": 0.8}),
}
DEFAULT_METHODS = ["dense", "set", "rigl", "chts", "chtss@1.0", "chtss@0.5", "gmp", "gmp@0.5"]

# The second protocol: the paper's LLaMA-60M run (10 000 steps, Δ 100 → 75 updates while t ≤ 7 500, 1 000 warm-up
# steps, a 10-step LR re-warm-up in the released recipe, ~50 tokens per non-embedding parameter) scaled down in
# proportion, not cut short: every step count is a fraction of the run.
PAPER_METHODS = ["dense", "set", "rigl", "chts", "chtss@1.0", "chtss@0.5", "chtss-released@0.5", "chts-released"]
PAPER_PROTOCOL = dict(hidden=24, ffn=64, layers=4, heads=4, seq=128, batch=8, vocab=512, updates=75,
                      tokens_per_param=20.0, lrs=[3e-3, 6e-3, 1.2e-2], densities=[0.3], zeta=0.1,
                      curve_points=20)
RELEASED_REWARMUP_PER_UPDATE = 10 / 100  # released recipe: 10 re-warm-up steps per Δ = 100


# ------------------------------------------------------------------ data
def build_data(args, cache_dir: Path) -> dict:
    """Token blocks of the train/val/test splits (tokenizer and token ids cached in ``cache_dir``)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    splits = corpus.load_splits(args.corpus)
    tag = f"{corpus.fingerprint(splits['train'] + splits['val'] + splits['test'])}_v{args.vocab}"
    tokenizer_path, ids_path = cache_dir / f"bpe_{tag}.json", cache_dir / f"ids_{tag}.pt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path.exists():
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:  # trained on (every 4th document of) the training split only
        trainer = ByteLevelBPETokenizer()
        trainer.train_from_iterator(splits["train"][::4], vocab_size=args.vocab, min_frequency=2, show_progress=False)
        trainer.save(str(tokenizer_path))
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    if ids_path.exists():
        ids = torch.load(ids_path)
    else:
        newline = tokenizer.encode("\n").ids
        ids = {}
        for name, documents in splits.items():
            stream = []
            for encoding in tokenizer.encode_batch(documents):
                stream.extend(encoding.ids + newline)
            ids[name] = torch.tensor(stream, dtype=torch.long)
        torch.save(ids, ids_path)
    seq = args.seq

    def blocks(stream, limit=None):
        result = stream[: len(stream) // seq * seq].view(-1, seq)
        if limit and len(result) > limit:  # evenly spaced blocks cover the whole (alphabetical) split
            result = result[torch.linspace(0, len(result) - 1, limit).long()]
        return result

    return dict(train=blocks(ids["train"]), val=blocks(ids["val"], args.eval_blocks),
                test=blocks(ids["test"], args.eval_blocks), curve=blocks(ids["val"], args.curve_blocks),
                vocab=tokenizer.get_vocab_size(), tokens={name: len(stream) for name, stream in ids.items()})


# ----------------------------------------------------------------- model
def build_model(args, vocab: int, seed: int):
    """The same dense initialisation for every method of one seed."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=args.init_std,
    )
    return transformers.LlamaForCausalLM(config)


def update_interval(args) -> int:
    """Δ giving at least ``--updates`` topology updates while t ≤ 0.75·T (the update window)."""
    return max(1, int(0.75 * args.steps) // args.updates)


def sparsify_config(args, method: str, density: float, seed: int):
    from hf_chts import SparsifyConfig

    preset, initial, fields = METHODS[method]
    extra = dict(fields)
    if extra.get("parity"):  # the re-warm-up is a fraction of Δ, as every other step count
        extra["lr_rewarmup_steps"] = max(1, round(RELEASED_REWARMUP_PER_UPDATE * update_interval(args)))
    if initial is not None:
        extra["initial_density"] = initial
        if preset == "gmp" and initial < 1.0:
            extra["init"] = "er"  # gmp's preset init 'dense' needs density 1; a sparse start is random (ER)
    return SparsifyConfig(method=preset, target_density=density, update_interval=update_interval(args), seed=seed,
                          removal_fraction=args.zeta, **extra)


def evaluate(model, blocks, batch: int) -> float:
    """Mean next-token loss over ``blocks``."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            x = blocks[start:start + batch]
            total += float(model(input_ids=x, labels=x).loss) * len(x)
    model.train()
    return total / len(blocks)


def run_one(args, data, method: str, density: float, seed: int, lr: float, progress: bool = True) -> dict:
    """Train one (method, density, seed, lr); returns losses, curves and per-update statistics."""
    import torch
    from tqdm import tqdm

    from hf_chts import SparseTrainingEngine, sparsify, sparsity_report

    model = build_model(args, data["vocab"], seed)
    model.train()
    engine = config = None
    if method != "dense":
        config = sparsify_config(args, method, density, seed)
        sparsify(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, int(0.1 * args.steps))

    def lr_multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)
    if config is not None:
        engine = SparseTrainingEngine(model, total_steps=args.steps, optimizer=optimizer, lr_scheduler=scheduler)
        report = sparsity_report(model)
        total_links, live_links = report.total_links, report.live_links  # masks change only at updates
    # the data order depends on the seed only: a permutation of the training blocks (no repeats)
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(10_000 + seed))
    needed = args.steps * args.batch
    if needed > len(order):
        if args.protocol == "paper":  # the paper's regime: no token is seen twice
            raise SystemExit(f"{needed} training blocks needed, the corpus has {len(order)}: lower --tokens-per-param")
        order = order.repeat(needed // len(order) + 1)
    curve_every = max(1, args.steps // args.curve_points)
    losses, curve, updates = [], [], []
    started = time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"{method}@{density:g} s{seed} lr{lr:g}", leave=False,
                     disable=not progress, mininterval=10):
        x = data["train"][order[step * args.batch:(step + 1) * args.batch]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if engine is not None:
            stats = engine.step()
            if stats is not None:  # links cut by this update (scheduled pruning + removal) / live links before it
                updates.append(dict(step=stats.step, density=stats.density, removed=stats.removed,
                                    removed_fraction=stats.removed / max(1, live_links), lr=lr_now,
                                    regrown_in_place=stats.overlap,  # share of regrown links that were just cut
                                    reset=stats.reset, reset_fraction=stats.reset / max(1, live_links),
                                    train_loss=sum(losses[-curve_every:]) / len(losses[-curve_every:])))
                live_links = sparsity_report(model).live_links
        if (step + 1) % curve_every == 0 or step + 1 == args.steps:
            curve.append(dict(step=step + 1, train_loss=sum(losses[-curve_every:]) / len(losses[-curve_every:]),
                              val_loss=evaluate(model, data["curve"], args.batch)))
    train_seconds = time.perf_counter() - started
    val_loss, test_loss = evaluate(model, data["val"], args.batch), evaluate(model, data["test"], args.batch)
    row = dict(method=method, density=1.0 if config is None else density, seed=seed, lr=lr, val_loss=val_loss,
               test_loss=test_loss, val_ppl=math.exp(val_loss), test_ppl=math.exp(test_loss),
               train_loss=sum(losses[-50:]) / len(losses[-50:]), train_seconds=train_seconds, steps=args.steps,
               curve=curve, update_log=updates)
    if config is None:
        row.update(final_density=1.0, anp=1.0, updates=0, update_seconds=0.0, total_links=None)
    else:
        final = sparsity_report(model)
        row.update(final_density=final.density, anp=final.anp, updates=len(engine.history),
                   update_seconds=sum(s.seconds for s in engine.history), total_links=total_links,
                   initial_density=config.initial_density)
        engine.close()
    return row


# --------------------------------------------------------------- driver
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=corpus.GCIDE_PATH,
                        help="dictd text (plain or .dz/.gz); default: the dict-gcide package's file")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.3, 0.1])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2],
                        help="learning-rate grid (1e-3 was dropped for time: dense at 1e-3 was 15 ppl worse than at 3e-3)")
    parser.add_argument("--select-seed", type=int, default=0, help="seed of the LR-selection runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds reported on the test split")
    parser.add_argument("--select-density", type=float, default=None,
                        help="choose each method's LR at this target density only and reuse it at the others "
                             "(default: choose at every density)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=344)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--updates", type=int, default=40, help="minimum number of topology updates (sets Δ)")
    parser.add_argument("--zeta", type=float, default=0.1, help="removal fraction ζ")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the initial weights (LlamaConfig.initializer_range)")
    parser.add_argument("--eval-blocks", type=int, default=128, help="blocks of the val/test splits evaluated")
    parser.add_argument("--curve-blocks", type=int, default=16, help="val blocks of each learning-curve point")
    parser.add_argument("--curve-points", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "quality")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the runs already done")
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="an earlier result folder (its quality.json) whose test perplexities are shown beside")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 methods, 1 density, 2 LRs")
    parser.add_argument("--protocol", choices=["short", "paper"], default="short",
                        help="short: the fixed-budget grid above (300 steps); paper: the paper's LLaMA-60M run "
                             "scaled down in proportion (PAPER_PROTOCOL: ≥ 20 tokens per sparsified parameter, "
                             "no token seen twice, 75 updates, LR grid extended until the choice is inside it)")
    parser.add_argument("--tokens-per-param", type=float, default=None,
                        help="paper protocol: training tokens per sparsified parameter (sets --steps)")
    parser.add_argument("--max-grid-extensions", type=int, default=3,
                        help="paper protocol: LRs added beyond an edge of the grid when the choice lands on it")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.protocol == "paper":
        given = {action.dest for action in parser._actions if any(flag in (argv if argv is not None else sys.argv[1:])
                                                                  for flag in action.option_strings)}
        for key, value in PAPER_PROTOCOL.items():
            if key not in given:
                setattr(args, key, value)
        if args.tokens_per_param is None:
            args.tokens_per_param = PAPER_PROTOCOL["tokens_per_param"]
        args.methods = args.methods or list(PAPER_METHODS)
        if "out" not in given:
            args.out = common.RESULTS_DIR / "quality_paper"
        if "steps" not in given:
            args.steps = math.ceil(args.tokens_per_param * sparsified_params(args) / (args.batch * args.seq))
    if args.quick:
        for key, value in dict(hidden=32, ffn=64, layers=2, heads=2, seq=32, batch=4, steps=60, vocab=300,
                               eval_blocks=8, curve_blocks=4, curve_points=3, updates=10).items():
            setattr(args, key, value)
        args.methods = args.methods or ["dense", "chtss@1.0"]
        args.densities, args.lrs, args.seeds = args.densities[:1], args.lrs[:2], [0, 1]
    args.methods = args.methods or list(DEFAULT_METHODS)
    if args.select_density is not None and args.select_density != args.densities[0]:
        parser.error(f"--select-density {args.select_density} must be the first of --densities {args.densities}")
    return args


def sparsified_params(args) -> int:
    """Weights of the sparsified layers (q/k/v/o and gate/up/down of every block), counted dense."""
    return args.layers * (4 * args.hidden * args.hidden + 3 * args.hidden * args.ffn)


def budget_key(args) -> str:
    """Everything that makes two runs comparable; part of every run's resume key."""
    return (f"h{args.hidden}f{args.ffn}l{args.layers}a{args.heads}s{args.seq}b{args.batch}v{args.vocab}"
            f"|T{args.steps}d{update_interval(args)}z{args.zeta}c{args.clip}|{Path(args.corpus).name}"
            f"|e{args.eval_blocks}" + (f"|init{args.init_std:g}" if args.init_std != 0.02 else "")
            + ("|paper" if args.protocol == "paper" else ""))


def run_key(args, method: str, density: float, seed: int, lr: float) -> str:
    return f"{budget_key(args)}|{method}|{1.0 if method == 'dense' else density}|{seed}|lr{lr:g}"


def configurations(args) -> list[list[tuple[str, float]]]:
    """(method, density) pairs grouped by target density (dense once, in the first group)."""
    groups = [[(m, d) for m in args.methods if m != "dense"] for d in args.densities]
    if "dense" in args.methods:
        groups[0].insert(0, ("dense", 1.0))
    return groups


def choose_lr(rows: list[dict]) -> float:
    """The learning rate of the run with the lowest validation loss (the test split is never looked at)."""
    return min(rows, key=lambda row: row["val_loss"])["lr"]


def select_on_grid(run_at, lrs: list[float], extensions: int) -> tuple[list[float], list[dict]]:
    """Run every LR of the grid; while the best validation loss sits on an edge of the grid, add the next LR
    beyond that edge (same ratio as its neighbour), at most ``extensions`` times. Returns the grid and its
    runs (``run_at`` returns None for a run that was not done; the grid then stays as it is)."""
    grid = sorted(lrs)
    rows = [r for lr in grid if (r := run_at(lr)) is not None]
    for _ in range(extensions):
        if len(rows) < len(grid) or choose_lr(rows) not in (grid[0], grid[-1]):
            break
        lr = grid[0] ** 2 / grid[1] if choose_lr(rows) == grid[0] else grid[-1] ** 2 / grid[-2]
        grid = sorted(grid + [float(f"{lr:.3g}")])
        rows = [r for lr in grid if (r := run_at(lr)) is not None]
    return grid, rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "quality_runs.jsonl"
    done: dict[str, dict] = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record["row"]
    data = build_data(args, args.out / "cache")
    budget = (f"LLaMA hidden {args.hidden} / ffn {args.ffn} / {args.layers} layers / {args.heads} heads, vocab "
              f"{data['vocab']}, seq {args.seq}, batch {args.batch}, {args.steps} steps = "
              f"{args.steps * args.batch * args.seq:,} tokens per run "
              f"({args.steps * args.batch * args.seq / sparsified_params(args):.1f} per sparsified parameter, "
              f"{sparsified_params(args):,} of them); corpus {Path(args.corpus).name}: "
              f"{data['tokens']['train']:,} train / {data['tokens']['val']:,} val / {data['tokens']['test']:,} test "
              f"tokens (val/test evaluated on {len(data['val'])} / {len(data['test'])} blocks); Δ={update_interval(args)}"
              f" (updates while t ≤ {int(0.75 * args.steps)}), ζ={args.zeta}; LR grid {args.lrs}, selection seed "
              f"{args.select_seed}, test seeds {args.seeds}")
    print(budget, flush=True)

    def run(method, density, seed, lr) -> dict:
        key = run_key(args, method, density, seed, lr)
        if key not in done:
            if args.report_only:
                return None
            row = run_one(args, data, method, density, seed, lr, progress=not args.no_progress)
            with open(runs_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "row": row}) + "\n")
            done[key] = row
            print(f"  {method:<10} d={row['density']:.2f} seed {seed} lr {lr:<7g} val ppl {row['val_ppl']:8.3f}  "
                  f"test ppl {row['test_ppl']:8.3f}  train loss {row['train_loss']:.3f}  {row['train_seconds']:.0f} s "
                  f"({row['updates']} updates)", flush=True)
        return done[key]

    # one target density after the other, so an interrupted grid leaves the first densities complete
    selection, chosen, tested = [], {}, []
    for group in configurations(args):
        for method, density in group:  # phase 1: the LR grid with the selection seed
            if args.select_density is not None and density not in (1.0, args.select_density):
                if (method, args.select_density) in chosen:  # reuse the LR chosen at --select-density
                    chosen[(method, density)] = chosen[(method, args.select_density)]
                continue
            extensions = args.max_grid_extensions if args.protocol == "paper" else 0
            grid, rows = select_on_grid(lambda lr: run(method, density, args.select_seed, lr), args.lrs, extensions)
            prefix = run_key(args, method, density, args.select_seed, 0.0).rsplit("|", 1)[0] + "|"
            off_grid = [row for key, row in done.items() if key.startswith(prefix) and row["lr"] not in grid]
            selection.extend(rows + off_grid)  # runs at LRs outside the grid are shown, never chosen
            if len(rows) == len(grid):
                chosen[(method, density)] = choose_lr(rows)
        for seed in args.seeds:  # phase 2: every test seed at the chosen LR
            for method, density in group:
                if (method, density) in chosen and (row := run(method, density, seed, chosen[(method, density)])):
                    tested.append(row)
    result = report.write_report(args.out, selection, chosen, tested, budget, common.machine_info(),
                                 compare_with=args.compare_with)
    print()
    print(result["text"])
    return dict(result, budget=budget, selection=selection, tested=tested, chosen=chosen)


if __name__ == "__main__":
    main()
