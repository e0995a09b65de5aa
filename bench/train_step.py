"""Training-step time of bench/speed.py: dense vs hf_chts vs peer libraries, measured side by side in one run.

Every contender trains the same LLaMA (same seed, same batch) with the same optimizer; the sparse ones
mask the same linear layers (hf_chts's targets) at the same density and run no topology update inside
the timed steps. Steps are interleaved round-robin (the starting contender rotates every round) so a
change of the machine's load hits all alike; each step is timed in wall time and in process CPU time
(the CPU time of a step does not count the time the process waits for a core on a shared machine).

Contenders (peers are optional rows, measured when importable):
- ``dense``: the model as built.
- ``hf_chts``: ``sparsify`` (CHTs preset) + ``SparseTrainingEngine`` attached to the optimizer; the
  forward is the plain dense GEMM, gradients are masked as they are accumulated.
- ``sparsimony SET``: sparsimony 0.1.0 (torch.ao parametrizations: every forward multiplies the weight
  by its mask). It declares numpy 1.* and Python <= 3.12 but runs here:
  ``pip install --no-deps sparsimony==0.1.0``.
- ``torch.ao WeightNormSparsifier``: torch's own ``FakeSparsity`` parametrization, masks computed once
  by ``sparsifier.step()`` before the timed steps (1x1 blocks, i.e. unstructured).

Optimizers: ``adamw`` is ``torch.optim.AdamW`` with its defaults (the for-loop implementation on CPU);
``adamw-fused`` is ``AdamW(fused=True)`` (what ``transformers.Trainer`` uses by default with torch >= 2.8).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

try:
    from bench import _common as common
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore

OPTIMIZERS = {"adamw": {}, "adamw-fused": {"fused": True}}
LEARNING_RATE = 1e-3


class Contender:
    """One model + optimizer (+ sparsity machinery) whose ``step()`` is one training step."""

    def __init__(self, name: str, model, optimizer, targets: list[str], after_step=None, close=None):
        self.name, self.model, self.optimizer, self.targets = name, model, optimizer, targets
        self._after_step, self._close = after_step, close

    def step(self, input_ids) -> tuple[float, float, float]:
        """One training step; returns the process CPU seconds of forward, backward and the rest."""
        started = time.process_time()
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        forward = time.process_time()
        loss.backward()
        backward = time.process_time()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._after_step is not None:
            self._after_step()
        return forward - started, backward - forward, time.process_time() - backward

    def effective_density(self) -> float | None:
        """Fraction of non-zero entries of the targeted weights as the forward sees them."""
        import torch

        if not self.targets:
            return None
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            weights = [modules[name].weight for name in self.targets]  # parametrized: mask * original
            return sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def make_optimizer(params, optimizer: str):
    import torch

    return torch.optim.AdamW(params, lr=LEARNING_RATE, **OPTIMIZERS[optimizer])


def dense_contender(build_model, optimizer: str) -> Contender:
    model = build_model()
    return Contender("dense", model, make_optimizer(model.parameters(), optimizer), [])


def hf_chts_contender(build_model, optimizer: str, density: float) -> Contender:
    from hf_chts import SparsifyConfig, sparsify
    from hf_chts.engine import SparseTrainingEngine

    model = build_model()
    sparsify(model, SparsifyConfig(method="chts", target_density=density, update_interval=10**6, seed=0))
    opt = make_optimizer(model.parameters(), optimizer)
    engine = SparseTrainingEngine(model, total_steps=10**7, optimizer=opt)
    return Contender("hf_chts", model, opt, sorted(engine.layers), after_step=engine.step, close=engine.close)


def sparsimony_contender(build_model, optimizer: str, density: float, targets: list[str]) -> Contender:
    from sparsimony.distributions.base import UniformDistribution
    from sparsimony.dst.set import SET
    from sparsimony.schedulers.base import ConstantScheduler

    model = build_model()
    opt = make_optimizer(model.parameters(), optimizer)
    scheduler = ConstantScheduler(pruning_ratio=0.1, delta_t=10**6, t_end=10**7)  # no update while timed
    sparsifier = SET(scheduler, UniformDistribution(), opt, sparsity=1.0 - density)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in targets])
    return Contender("sparsimony SET", model, opt, targets, after_step=sparsifier.step)


def torch_ao_contender(build_model, optimizer: str, density: float, targets: list[str]) -> Contender:
    from torch.ao.pruning import WeightNormSparsifier

    model = build_model()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0 - density, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in targets])
    sparsifier.step()  # the masks; not recomputed during the timed steps
    return Contender("torch.ao WeightNormSparsifier", model, make_optimizer(model.parameters(), optimizer), targets)


PEERS = {"sparsimony": sparsimony_contender, "torch.ao": torch_ao_contender}


def contenders(build_model, optimizer: str, density: float, peers: bool = True) -> tuple[list[Contender], dict]:
    """Dense, hf_chts and (when importable) the peers; also {peer: reason} for peers left out."""
    built = [dense_contender(build_model, optimizer), hf_chts_contender(build_model, optimizer, density)]
    skipped = {}
    for name, make in PEERS.items() if peers else ():
        try:
            built.append(make(build_model, optimizer, density, built[1].targets))
        except ImportError as error:
            skipped[name] = f"not installed ({error})"
    for contender in built:
        contender.model.train()
    return built, skipped


def time_interleaved(contenders: list[Contender], input_ids, repeats: int) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall"|"cpu"|"forward"|"backward"|"optimizer": [s...]}} over ``repeats`` rounds after a warm-up."""
    for contender in contenders:  # warm-up: allocates the optimizer state
        contender.step(input_ids)
    keys = ("wall", "cpu", "forward", "backward", "optimizer")
    times = {c.name: {key: [] for key in keys} for c in contenders}
    for round_index in range(repeats):
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            wall = time.perf_counter()
            phases = contender.step(input_ids)
            own = times[contender.name]
            own["wall"].append(time.perf_counter() - wall)
            own["cpu"].append(sum(phases))
            for key, seconds in zip(keys[2:], phases):
                own[key].append(seconds)
    return times


def step_rows(shape_name: str, shape: dict, build_model, args) -> tuple[list[dict], dict]:
    """One row per (optimizer, contender) of one model shape, ratios to the dense row of the same run."""
    import torch

    input_ids = torch.randint(0, 1024, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))
    rows, skipped = [], {}
    for optimizer in args.optimizers:
        built, skipped = contenders(build_model, optimizer, args.density, peers=not args.no_peers)
        times = time_interleaved(built, input_ids, args.repeats)
        dense = times["dense"]
        for contender in built:
            own = times[contender.name]
            rows.append(dict(
                shape=shape_name, tokens=shape["batch"] * shape["seq"], optimizer=optimizer, method=contender.name,
                density=contender.effective_density(),
                wall_ms=statistics.median(own["wall"]) * 1e3, cpu_ms=statistics.median(own["cpu"]) * 1e3,
                cpu_min_ms=min(own["cpu"]) * 1e3, forward_ms=statistics.median(own["forward"]) * 1e3,
                backward_ms=statistics.median(own["backward"]) * 1e3,
                optimizer_ms=statistics.median(own["optimizer"]) * 1e3,
                ratio_wall=statistics.median(own["wall"]) / statistics.median(dense["wall"]),
                ratio_cpu=statistics.median(own["cpu"]) / statistics.median(dense["cpu"]),
                ratio_cpu_pairs=statistics.median(a / b for a, b in zip(own["cpu"], dense["cpu"])),
                ratio_cpu_min=min(own["cpu"]) / min(dense["cpu"]),
                repeats=args.repeats,
            ))
            contender.close()
    return rows, skipped


def step_table(rows: list[dict], density: float, skipped: dict | None = None) -> str:
    if not all("optimizer" in row for row in rows):  # results of an older speed.py in the same --out folder
        return "Training step: the stored rows have an older format; rerun with --parts step"
    cells = [dict(r, density="-" if r["density"] is None else f"{r['density']:.3f}",
                  wall_ms=f"{r['wall_ms']:.1f}", cpu_ms=f"{r['cpu_ms']:.1f}",
                  phases=f"{r['forward_ms']:.0f}/{r['backward_ms']:.0f}/{r['optimizer_ms']:.0f}", ratio_wall=f"{r['ratio_wall']:.3f}",
                  ratio_cpu=f"{r['ratio_cpu']:.3f}", ratio_cpu_pairs=f"{r['ratio_cpu_pairs']:.3f}",
                  ratio_cpu_min=f"{r['ratio_cpu_min']:.3f}") for r in rows]
    return common.table(cells, [("shape", "shape"), ("optimizer", "optimizer"), ("method", "method"),
                         ("tokens", "tokens/step"), ("density", "density"), ("wall_ms", "wall ms"),
                         ("cpu_ms", "cpu ms"), ("phases", "fwd/bwd/opt cpu ms"), ("ratio_wall", "x dense wall"), ("ratio_cpu", "x dense cpu"),
                         ("ratio_cpu_pairs", "x dense cpu (pairs)"), ("ratio_cpu_min", "x dense cpu (min/min)"),
                         ("repeats", "repeats")],
                 f"Training step (fwd+bwd+optimizer step), target density {density}; medians of interleaved repeats; "
                 "x dense = ratio to the dense row of the same shape and optimizer", left=3,
                 ) + "".join(f"\n(peer left out: {peer}: {why})" for peer, why in (skipped or {}).items())


def part_step(args, shapes: dict, build_model) -> tuple[list[dict], dict]:
    """Rows of every shape (``args.shapes`` filters by name); also {peer: reason} for peers left out."""
    import functools

    from tqdm import tqdm

    rows, skipped = [], {}
    if args.shapes:
        shapes = {name: shape for name, shape in shapes.items() if name in args.shapes}
    for name, shape in tqdm(shapes.items(), desc="step time", disable=args.no_progress):
        shape_rows, skipped = step_rows(name, shape, functools.partial(build_model, shape), args)
        rows.extend(shape_rows)
    return rows, skipped


# --------------------------------------------------------------- masking kernels
def _masking_kernels():
    """{name: (prepare(keep) -> operand, apply_(tensor, operand), extra bytes per weight held)}."""
    import torch

    from hf_chts.layers import bit_view, zero_masked_

    return {
        "tensor.mul_(bool mask) (hf_chts before)": (lambda keep: keep, lambda t, m: t.mul_(m), 0),
        "zero_masked_: int view * bool mask (hf_chts)": (lambda keep: keep, zero_masked_, 0),
        "int view & int keep bits": (lambda keep: keep.to(torch.int32).neg_(), lambda t, m: bit_view(t).bitwise_and_(m), 4),
        "tensor.mul_(float keep)": (lambda keep: keep.float(), lambda t, m: t.mul_(m), 4),
        "masked_fill_(inverted mask, 0)": (lambda keep: ~keep, lambda t, m: t.masked_fill_(m, 0), 1),
        "torch.where(mask, t, 0, out=t)": (lambda keep: keep, lambda t, m: torch.where(m, t, torch.zeros((), dtype=t.dtype), out=t), 0),
    }


def _is_exact(prepare, apply_, generator) -> bool:
    """NaN/inf/-0.0 at masked positions must become +0.0 and live entries keep their bits."""
    import torch

    from hf_chts.layers import bit_view

    tensor = torch.randn(64, 48, generator=generator)
    keep = torch.rand(64, 48, generator=generator) < 0.3
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    tensor[~keep] = specials[torch.arange(int((~keep).sum())) % 4]
    expected = torch.where(keep, bit_view(tensor), 0)
    apply_(tensor, prepare(keep))
    return torch.equal(bit_view(tensor), expected)


def masking_rows(shape: dict, args) -> list[dict]:
    """Each kernel masking the gradients of ``shape``'s sparsified weights: exact?, bytes, CPU ms."""
    import torch

    hidden, ffn = (32, 64) if args.quick else (shape["hidden"], shape["ffn"])
    shapes = ([(hidden, hidden)] * 4 + [(ffn, hidden)] * 2 + [(hidden, ffn)]) * shape["layers"]
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=generator) for s in shapes]
    keeps = [torch.rand(s, generator=generator) < args.density for s in shapes]
    kernels = _masking_kernels()
    operands = {name: [prepare(keep) for keep in keeps] for name, (prepare, _, _) in kernels.items()}
    times = {name: [] for name in kernels}
    for _ in range(max(args.repeats, 3) * 3):  # interleaved rounds
        for name, (_, apply_, _) in kernels.items():
            started = time.process_time()
            for grad, operand in zip(grads, operands[name]):
                apply_(grad, operand)
            times[name].append(time.process_time() - started)
    return [dict(kernel=name, exact=_is_exact(prepare, apply_, generator), extra_bytes_per_weight=extra,
                 weights=sum(g.numel() for g in grads), cpu_ms=statistics.median(times[name]) * 1e3,
                 cpu_min_ms=min(times[name]) * 1e3, rounds=len(times[name]))
            for name, (prepare, apply_, extra) in kernels.items()]


def masking_table(rows: list[dict]) -> str:
    cells = [dict(r, exact="yes" if r["exact"] else "NO (NaN/inf stay)", cpu_ms=f"{r['cpu_ms']:.1f}",
                  cpu_min_ms=f"{r['cpu_min_ms']:.1f}") for r in rows]
    return common.table(cells, [("kernel", "kernel"), ("exact", "masked = +0.0 exactly"),
                                ("extra_bytes_per_weight", "extra bytes/weight"), ("cpu_ms", "cpu ms (median)"),
                                ("cpu_min_ms", "cpu ms (min)"), ("rounds", "rounds")],
                        f"Masking the gradients of {rows[0]['weights']:,} weights (one call per tensor), density of the masks "
                        "as --density; process CPU time", left=2)


def sqrt_of_zeros_row(shape: dict, args) -> dict:
    """CPU ms of ``torch.sqrt`` over AdamW-like second moments with no zeros vs with masked zeros.

    ``torch.optim.AdamW``'s default (for-loop) and foreach steps take ``exp_avg_sq.sqrt()``; masked
    moments are exactly 0, and on this machine torch's CPU sqrt is much slower on zeros.
    """
    import torch

    hidden, ffn = (32, 64) if args.quick else (shape["hidden"], shape["ffn"])
    numel = (4 * hidden * hidden + 3 * hidden * ffn) * shape["layers"]
    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(numel, generator=generator) * 1e-6 + 1e-12
    masked = dense * (torch.rand(numel, generator=generator) < args.density)
    out = torch.empty(numel)
    times = {"dense": [], "masked": []}
    for _ in range(max(args.repeats, 3) * 3):
        for name, values in (("dense", dense), ("masked", masked)):
            started = time.process_time()
            torch.sqrt(values, out=out)
            times[name].append(time.process_time() - started)
    return dict(numel=numel, zeros=1.0 - args.density, dense_ms=statistics.median(times["dense"]) * 1e3,
                masked_ms=statistics.median(times["masked"]) * 1e3)


def sqrt_of_zeros_text(row: dict) -> str:
    return (f"torch.sqrt of {row['numel']:,} second moments (process CPU time, median): {row['dense_ms']:.1f} ms with no "
            f"zeros, {row['masked_ms']:.1f} ms with {row['zeros']:.0%} exact zeros (masked links) - the extra cost of "
            "the for-loop/foreach AdamW step of a sparse model; AdamW(fused=True) does not call torch.sqrt")
