"""Issue 3: does CH regrowth beat random (SET) and gradient (RigL) regrowth where topology matters?

    python bench/regrowth_task.py                     # 5 seeds, all regrowth rules (a few minutes on CPU)
    python bench/regrowth_task.py --quick --out /tmp  # smoke run

Task (synthetic, offline): a planted sparse teacher. Inputs have ``--features``
standard-normal features of which only ``--informative`` matter; the teacher has
``--teacher-hidden`` tanh units each reading ``--fan-in`` informative features, and a
dense readout to ``--classes`` logits; labels are the teacher's argmax (with
``--label-noise`` flipped at random). The student is a sparse MLP
``fc1: features -> hidden``, ``fc2: hidden -> classes`` sparsified with
``hf_chts.sparsify`` (``target_modules=["fc1", "fc2"]``) at ``--density``. A good
topology puts fc1's few links on the informative inputs, so besides accuracy the
table reports the fraction of fc1's links that read informative features
(chance level = informative / features).

Every variant shares the same initial topology (ER), removal (rigid magnitude, ζ),
schedule (constant density), optimiser and data; only the regrowth rule differs.
``static`` never updates the topology; ``dense`` is the unsparsified MLP.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

try:
    from bench import _common as common
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore

# name -> (regrowth, selection); None = special
VARIANTS = {
    "dense": None,
    "static": ("none", "soft"),
    "random (SET)": ("random", "soft"),
    "gradient (RigL)": ("gradient", "rigid"),
    "ch2_l3n soft (CHTs)": ("ch2_l3n", "soft"),
    "ch2_l3n rigid": ("ch2_l3n", "rigid"),
    "ch3_l3n soft": ("ch3_l3n", "soft"),
    "ch3_l3 path rigid (CHT)": ("ch3_l3", "rigid"),
}
QUICK_VARIANTS = ["random (SET)", "ch2_l3n soft (CHTs)"]


def make_task(args, seed: int):
    import torch

    generator = torch.Generator().manual_seed(1_000 + seed)
    informative = torch.randperm(args.features, generator=generator)[: args.informative]
    teacher_in = torch.zeros(args.teacher_hidden, args.features)
    for unit in range(args.teacher_hidden):
        picks = informative[torch.randperm(args.informative, generator=generator)[: args.fan_in]]
        teacher_in[unit, picks] = torch.randn(args.fan_in, generator=generator) * 1.5
    teacher_out = torch.randn(args.classes, args.teacher_hidden, generator=generator)

    def sample(n: int):
        x = torch.randn(n, args.features, generator=generator)
        logits = torch.tanh(x @ teacher_in.t()) @ teacher_out.t()
        y = logits.argmax(dim=1)
        flip = torch.rand(n, generator=generator) < args.label_noise
        y[flip] = torch.randint(0, args.classes, (int(flip.sum()),), generator=generator)
        return x, y

    train, test = sample(args.train_size), sample(args.test_size)
    is_informative = torch.zeros(args.features, dtype=torch.bool)
    is_informative[informative] = True
    return train, test, is_informative




def build_student(args, seed: int):
    import torch
    from torch import nn

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(args.features, args.hidden)
            self.fc2 = nn.Linear(args.hidden, args.classes)
            # minimal config: model_type unknown to the registry -> generic fallback
            self.config = types.SimpleNamespace(model_type="planted_mlp")

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(seed)
    return Student()


def run_one(args, variant: str, seed: int, task) -> dict:
    import torch
    import torch.nn.functional as F

    from hf_chts import SparsifyConfig, sparsify
    from hf_chts.engine import SparseTrainingEngine

    (x_train, y_train), (x_test, y_test), is_informative = task
    model = build_student(args, seed)
    engine = None
    spec = VARIANTS[variant]
    optimizer_factory = lambda: torch.optim.Adam(model.parameters(), lr=args.lr)  # noqa: E731
    if spec is not None:
        regrowth, selection = spec
        config = SparsifyConfig(
            method="set", target_density=args.density, init="er", removal="none" if regrowth == "none" else "rigid",
            removal_alpha=1.0, regrowth=regrowth, regrowth_selection=selection, percolation=False,
            update_interval=args.delta, removal_fraction=args.zeta, target_modules=["fc1", "fc2"], seed=seed,
        )
        sparsify(model, config)
    optimizer = optimizer_factory()
    if spec is not None:
        engine = SparseTrainingEngine(model, total_steps=args.steps, optimizer=optimizer)
    generator = torch.Generator().manual_seed(7 + seed)
    started = time.perf_counter()
    for _ in range(args.steps):
        index = torch.randint(0, len(x_train), (args.batch,), generator=generator)
        loss = F.cross_entropy(model(x_train[index]), y_train[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            engine.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        logits = model(x_test)
        test_loss = float(F.cross_entropy(logits, y_test))
        accuracy = float((logits.argmax(1) == y_test).float().mean())
        train_loss = float(F.cross_entropy(model(x_train), y_train))
    if engine is not None:
        mask1 = model.fc1.mask
        informative_fraction = float(mask1[:, is_informative].sum() / mask1.sum())
        density = engine.density()
        update_s = sum(s.seconds for s in engine.history)
        updates = len(engine.history)
        engine.close()
    else:
        informative_fraction, density, update_s, updates = args.informative / args.features, 1.0, 0.0, 0
    return dict(variant=variant, seed=seed, test_acc=accuracy, test_loss=test_loss, train_loss=train_loss,
                informative_link_fraction=informative_fraction, density=density, updates=updates,
                update_seconds=update_s, seconds=seconds)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--informative", type=int, default=16)
    parser.add_argument("--teacher-hidden", type=int, default=24)
    parser.add_argument("--fan-in", type=int, default=3)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--label-noise", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--test-size", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--delta", type=int, default=50, help="update interval Δ")
    parser.add_argument("--zeta", type=float, default=0.3, help="removal fraction ζ (0.3 for MLPs in the paper)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.variants = args.variants or QUICK_VARIANTS
        args.seeds = args.seeds[:1]
        args.steps, args.train_size, args.test_size, args.delta = 60, 512, 256, 10
        args.features, args.hidden = 64, 32
    args.variants = args.variants or list(VARIANTS)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    logging_level = __import__("logging")
    logging_level.getLogger("hf_chts").setLevel(logging_level.ERROR)  # the unknown-architecture warning, once per run
    runs = []
    plan = [(seed, variant) for seed in args.seeds for variant in args.variants]
    tasks = {}
    for seed, variant in tqdm(plan, desc="regrowth task", disable=args.no_progress):
        if seed not in tasks:
            tasks[seed] = make_task(args, seed)
        runs.append(run_one(args, variant, seed, tasks[seed]))
    summary = []
    for variant in args.variants:
        group = [r for r in runs if r["variant"] == variant]
        acc, acc_std = common.mean_std([r["test_acc"] for r in group])
        loss, loss_std = common.mean_std([r["test_loss"] for r in group])
        frac, frac_std = common.mean_std([r["informative_link_fraction"] for r in group])
        summary.append(dict(variant=variant, seeds=len(group), acc_mean=acc, acc_std=acc_std, loss_mean=loss,
                            loss_std=loss_std, informative_mean=frac, informative_std=frac_std,
                            density=group[0]["density"], updates=group[0]["updates"],
                            update_s=common.mean_std([r["update_seconds"] for r in group])[0],
                            seconds=common.mean_std([r["seconds"] for r in group])[0]))
    rows = [dict(variant=s["variant"], seeds=str(s["seeds"]), acc=f"{100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}",
                 loss=f"{s['loss_mean']:.4f} ± {s['loss_std']:.4f}",
                 frac=f"{s['informative_mean']:.3f} ± {s['informative_std']:.3f}", density=f"{s['density']:.4f}",
                 updates=str(s["updates"]), update_s=f"{s['update_s']:.2f}", seconds=f"{s['seconds']:.1f}")
            for s in summary]
    chance = args.informative / args.features
    title = (f"Planted sparse teacher: {args.features} features ({args.informative} informative, chance link fraction "
             f"{chance:.3f}), student {args.features}-{args.hidden}-{args.classes} at density {args.density}, "
             f"{args.steps} steps, Δ={args.delta}, ζ={args.zeta}, rigid magnitude removal, ER init")
    text = common.table(rows, [("variant", "regrowth"), ("seeds", "seeds"), ("acc", "test acc % (mean ± std)"),
                               ("loss", "test loss"), ("frac", "fc1 links on informative inputs"),
                               ("density", "density"), ("updates", "updates"), ("update_s", "update s/run"),
                               ("seconds", "train s/run")], title)
    print(text)
    stem = "regrowth_task_quick" if args.quick else "regrowth_task"
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / f"{stem}.csv", summary)
    common.write_json(args.out / f"{stem}.json", dict(args={k: str(v) for k, v in vars(args).items()},
                                                      machine=common.machine_info(), summary=summary, runs=runs))
    (args.out / f"{stem}.txt").write_text(text + "\n")
    return dict(summary=summary, runs=runs, table=text)


if __name__ == "__main__":
    main()
