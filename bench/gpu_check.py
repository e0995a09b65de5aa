"""GPU readiness check of hf_chts: one command, one table, non-zero exit on any failure.

    python bench/gpu_check.py                                 # cuda, LLaMA-60M recipe shape, 200 steps (<= 8 min)
    python bench/gpu_check.py --device cpu --tiny --steps 12  # the same checks on a tiny shape (what the test runs)

Checks (each is one row of the table; a check that raises is a FAIL row, the others still run):

- engine on the device: a model moved to the device, then sparsified (CHTs, 30 %); its masks live on
  the device; one training step and one topology update; afterwards every layer holds exactly
  round(0.3 * numel) links, masked weights and AdamW moments are exactly 0;
- ``hf_chts.SparseAdamW`` on the device (fp32, SET 30 %, 3 steps each followed by a topology update):
  optimizer-state bytes vs ``torch.optim.AdamW``, and weights equal to AdamW + the engine's masking;
- CH2-L3n / CH3-L3n scores computed on the device (whole and in row chunks) equal the CPU result on
  the same mask (the largest layer's mask after that update);
- a bf16 (autocast) run of ``--steps`` steps of the shape of recipes/llama-60m-chtss.yaml (model preset,
  batch, block size, optimizer, CHTss settings from the recipe; ``--update-interval`` instead of the
  recipe's 100 so that 200 steps hold several updates) on a learnable synthetic token stream:
  loss finite and decreasing; after each update every layer holds round(d_t * numel) links with
  d_t the engine's density schedule; the run ends at the target density; masked weights are exactly
  0 (NaN counts as non-zero) after every step; masks stay on the device;
- peak device memory (``torch.cuda.max_memory_allocated``; n/a on CPU) and median step time of the
  sparse run vs a dense run of the same model, data and optimizer (``--dense-steps`` steps);
  FAIL above ``--max-memory-ratio`` / ``--max-step-ratio``.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

try:
    from bench import _common as common
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common  # type: ignore

RECIPE = common.BENCH_DIR.parent / "recipes" / "llama-60m-chtss.yaml"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=128,
            batch=4, seq=32)
ENGINE_CHECK_DENSITY = 0.3


@dataclass
class Check:
    """One row of the table: ``status`` is PASS, FAIL or n/a (not measurable on this device)."""

    name: str
    status: str
    value: str = ""
    detail: str = ""


def passed(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ------------------------------------------------------------------ set-up
def load_setup(args) -> dict:
    """Model shape, batch, optimizer and sparsify settings of the recipe (``--tiny``: a tiny model)."""
    import yaml

    from hf_chts.recipe.presets import MODEL_PRESETS

    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    try:
        model = dict(MODEL_PRESETS[recipe["model"]["preset"]])
        model["vocab_size"] = recipe["model"].get("vocab_size") or model["vocab_size"]
        training, sparsify_section = recipe["training"], dict(recipe["sparsify"])
        batch, seq = training["per_device_train_batch_size"], recipe["data"]["block_size"]
        optim = dict(lr=float(training["learning_rate"]), betas=(training["adam_beta1"], training["adam_beta2"]),
                     weight_decay=float(training["weight_decay"]), max_grad_norm=float(training["max_grad_norm"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{RECIPE}: missing or malformed field {error}; gpu_check reads model.preset, "
                         "training.* and data.block_size from this recipe") from error
    if args.tiny:
        model = {k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "vocab_size")}
        batch, seq = TINY["batch"], TINY["seq"]
    sparsify_section["update_interval"] = args.update_interval
    return dict(model=model, batch=args.batch or batch, seq=args.seq or seq, optim=optim, sparsify=sparsify_section)


def build_model(model_settings: dict, seq: int, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    settings = {"num_key_value_heads": model_settings["num_attention_heads"], "max_position_embeddings": max(seq, 256),
                **model_settings, "tie_word_embeddings": False}
    config = transformers.LlamaConfig(**settings)
    return transformers.LlamaForCausalLM(config)


def synthetic_batch(generator, batch: int, seq: int, vocab: int, device):
    """Arithmetic progressions mod ``vocab`` (random start and stride): learnable, no data set needed."""
    import torch

    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 8, (batch, 1), generator=generator)
    return ((start + stride * torch.arange(seq)) % vocab).to(device)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device) -> None:
    """Free the previous section's device memory (models and engines hold reference cycles)."""
    import torch

    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------ invariants
def storage_masks(engine) -> dict:
    """Each sparsified layer's mask in its weight's layout (LLaMA: nn.Linear, out x in)."""
    masks = {}
    for name, layer in engine.layers.items():
        mask = layer.mask
        masks[name] = mask if mask.shape == layer.weight.shape else mask.t()
    return masks


def count_masked_nonzero(engine) -> int:
    """Weights at masked positions that are not exactly 0 (NaN and inf count), over all layers."""
    import torch

    total = None
    for name, mask in storage_masks(engine).items():
        count = torch.count_nonzero(engine.layers[name].weight.detach().masked_select(~mask))
        total = count if total is None else total + count
    return int(total) if total is not None else 0


def count_masked_moments(engine, optimizer) -> int:
    """Non-zero optimizer-state entries (e.g. AdamW's moments) at masked positions."""
    import torch

    total = 0
    for name, mask in storage_masks(engine).items():
        for value in optimizer.state.get(engine.layers[name].weight, {}).values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                total += int(torch.count_nonzero(value.masked_select(~mask)))
    return total


def link_count_deviation(engine, density: float) -> float:
    """Largest ``|live links - density * numel|`` over the layers (<= 0.5: each layer holds round(d * numel))."""
    return max(abs(int(layer.mask.sum()) - density * layer.mask.numel()) for layer in engine.layers.values())


def expected_density(engine, step: int) -> float:
    """Density the engine's schedule prescribes after the update at ``step``."""
    return engine.schedule.density_at(step)


def masks_on(engine, device) -> bool:
    return all(layer.mask.device.type == device.type and layer.weight.device.type == device.type
               for layer in engine.layers.values())


# ------------------------------------------------------------------ checks
def check_engine(setup: dict, device, dtype) -> list[Check]:
    """Engine on the device: masks, one topology update, CH scores device vs CPU."""
    import torch

    from hf_chts import SparseTrainingEngine, SparsifyConfig, sparsify
    from hf_chts.topology.ch_scores import ch_l3n_scores

    model = build_model(setup["model"], setup["seq"]).to(device)
    sparsify(model, SparsifyConfig(method="chts", target_density=ENGINE_CHECK_DENSITY, update_interval=1, seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = SparseTrainingEngine(model, total_steps=4, optimizer=optimizer)
    rows = [Check("engine: masks on device", passed(masks_on(engine, device)),
                  f"{len(engine.layers)} layers", f"mask device {next(iter(engine.layers.values())).mask.device}")]
    before = {name: layer.mask.clone() for name, layer in engine.layers.items()}
    tokens = synthetic_batch(torch.Generator().manual_seed(1), setup["batch"], setup["seq"],
                             setup["model"]["vocab_size"], device)
    with torch.autocast(device.type, dtype=dtype):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats = engine.step()
    sync(device)
    changed = sum(int((before[name] != layer.mask).any()) for name, layer in engine.layers.items())
    deviation = link_count_deviation(engine, ENGINE_CHECK_DENSITY)
    nonzero, moments = count_masked_nonzero(engine), count_masked_moments(engine, optimizer)
    ok = (stats is not None and stats.removed > 0 and stats.regrown > 0 and changed > 0 and deviation <= 0.5
          and nonzero == 0 and moments == 0 and masks_on(engine, device))
    rows.append(Check(
        "engine: one topology update", passed(ok),
        "no update" if stats is None else f"-{stats.removed} +{stats.regrown} links, {stats.seconds:.2f} s",
        f"{changed}/{len(engine.layers)} masks changed; max |links - round(0.3 n)| {deviation:.1f}; "
        f"masked weights != 0: {nonzero}; masked moments != 0: {moments}"))

    name, layer = max(engine.layers.items(), key=lambda item: item[1].mask.numel())
    mask = layer.mask
    for variant in ("ch2", "ch3"):
        reference = ch_l3n_scores(mask.cpu(), variant)
        scale = max(1.0, float(reference.abs().max()))
        whole = ch_l3n_scores(mask, variant)
        chunked = ch_l3n_scores(mask, variant, chunk_rows=max(1, mask.shape[0] // 4))
        error = max(float((scores.cpu() - reference).abs().max()) for scores in (whole, chunked))
        on_device = whole.device.type == device.type and chunked.device.type == device.type
        ok = on_device and error <= 1e-5 * scale
        rows.append(Check(f"{variant.upper()}-L3n scores: {device.type} == cpu", passed(ok), f"max |diff| {error:.2e}",
                          f"{name} {tuple(mask.shape)}, whole and 4 row chunks, scores up to {scale:.3g}"))
    engine.close()
    return rows


def check_sparse_adamw(setup: dict, device) -> list[Check]:
    """hf_chts.SparseAdamW on the device: state bytes vs AdamW, weights equal to masked AdamW (fp32, 3 updates)."""
    import torch

    from hf_chts import SparseAdamW, SparseTrainingEngine, SparsifyConfig, sparsify

    runs = {}
    for name, optimizer_cls in (("adamw", torch.optim.AdamW), ("sparse", SparseAdamW)):
        model = build_model(setup["model"], setup["seq"]).to(device)
        sparsify(model, SparsifyConfig(method="set", target_density=ENGINE_CHECK_DENSITY, update_interval=1, seed=0))
        optimizer = optimizer_cls(model.parameters(), lr=1e-3, weight_decay=0.1)  # torch's default kernel here
        engine = SparseTrainingEngine(model, total_steps=4, optimizer=optimizer)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            tokens = synthetic_batch(generator, setup["batch"], setup["seq"], setup["model"]["vocab_size"], device)
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            engine.step()
        sync(device)
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
        runs[name] = (model, state, len(engine.history))
        engine.close()
    (reference, adamw_state, updates), (model, sparse_state, _) = runs["adamw"], runs["sparse"]
    pairs = list(zip(reference.parameters(), model.parameters()))
    exact = all(torch.equal(a, b) for a, b in pairs)
    relative = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in pairs)
    ok = (exact or relative <= 1e-6) and updates >= 3 and sparse_state < adamw_state
    return [Check("SparseAdamW: state bytes, == masked AdamW", passed(ok),
                  f"{sparse_state / adamw_state:.3f}x AdamW state",
                  f"{'bit-exact' if exact else f'max rel diff {relative:.1e}'} vs AdamW + masking after {updates} "
                  f"updates (fp32, SET {ENGINE_CHECK_DENSITY:.0%}); {sparse_state / 2**20:.1f} vs "
                  f"{adamw_state / 2**20:.1f} MiB")]


def train_run(setup: dict, device, dtype, steps: int, sparse: bool) -> dict:
    """``steps`` training steps; for a sparse run also checks masks/densities after every step (untimed)."""
    import torch
    import transformers

    from hf_chts import SparseTrainingEngine, SparsifyConfig, sparsify

    model = build_model(setup["model"], setup["seq"])
    config = SparsifyConfig.from_dict({**setup["sparsify"], "seed": 0}) if sparse else None
    if sparse:
        sparsify(model, config)  # on the CPU, then moved, as the recipe's Trainer does
    model.to(device).train()
    optim = setup["optim"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=optim["betas"],
                                  weight_decay=optim["weight_decay"])
    scheduler = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps, min_lr_rate=0.1)
    engine = SparseTrainingEngine(model, total_steps=steps, optimizer=optimizer) if sparse else None
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = dict(losses=[], step_s=[], update_s=[], masked_nonzero=0, max_deviation=0.0, updates=[])
    for _ in range(steps):
        tokens = synthetic_batch(generator, setup["batch"], setup["seq"], setup["model"]["vocab_size"], device)
        sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats = engine.step() if engine is not None else None
        sync(device)
        (result["step_s"] if stats is None else result["update_s"]).append(time.perf_counter() - started)
        result["losses"].append(float(loss.detach()))
        if engine is None:
            continue
        result["masked_nonzero"] += count_masked_nonzero(engine)
        if stats is not None:
            target = expected_density(engine, engine.completed_steps)
            result["updates"].append((engine.completed_steps, target, engine.density()))
            result["max_deviation"] = max(result["max_deviation"], link_count_deviation(engine, target))
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if engine is not None:
        result.update(expected_updates=len(engine.schedule.update_steps()), masks_on_device=masks_on(engine, device),
                      final_deviation=link_count_deviation(engine, config.target_density),
                      final_density=engine.density(), target=config.target_density, layers=len(engine.layers),
                      device=str(next(iter(engine.layers.values())).mask.device))
        engine.close()
    return result


def median_step_s(run: dict) -> float:
    times = run["step_s"]
    if not times:
        raise ValueError("every step of the run was a topology update; use a larger --update-interval")
    return statistics.median(times[min(3, len(times) - 1):])  # the first steps allocate and warm up


def sparse_rows(run: dict, steps: int) -> list[Check]:
    losses = run["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    updates = run["updates"]
    decreasing = all(later <= earlier for (_, earlier, _), (_, later, _) in zip(updates, updates[1:]))
    densities = " ".join(f"{d:.3f}" for _, _, d in updates[:8]) + (" ..." if len(updates) > 8 else "")
    return [
        Check("bf16 CHTss run: loss finite", passed(all(map(math.isfinite, losses))),
              f"{losses[0]:.3f} -> {losses[-1]:.3f}", f"{steps} steps"),
        Check("bf16 CHTss run: loss decreases", passed(statistics.mean(tail) < losses[0]),
              f"last {len(tail)} mean {statistics.mean(tail):.3f}", "synthetic arithmetic-progression tokens"),
        Check("CHTss: density follows schedule",
              passed(len(updates) == run["expected_updates"] > 0 and run["max_deviation"] <= 0.5 and decreasing),
              f"{len(updates)}/{run['expected_updates']} updates", f"max |links - d_t n| {run['max_deviation']:.1f}; "
              f"density {densities}"),
        Check("CHTss: final density = target", passed(run["final_deviation"] <= 0.5),
              f"{run['final_density']:.4f} (target {run['target']})",
              f"max |links - target n| {run['final_deviation']:.1f}"),
        Check("CHTss: masked weights exactly 0", passed(run["masked_nonzero"] == 0),
              f"{run['masked_nonzero']} non-zero", f"after each of {steps} steps, {run['layers']} layers"),
        Check("CHTss: masks on device after run", passed(run["masks_on_device"]), run["device"]),
    ]


def comparison_rows(sparse: dict, dense: dict, args) -> list[Check]:
    sparse_s, dense_s = median_step_s(sparse), median_step_s(dense)
    step_ratio = sparse_s / dense_s
    rows = []
    if "peak_bytes" in sparse and "peak_bytes" in dense:
        ratio = sparse["peak_bytes"] / dense["peak_bytes"]
        rows.append(Check("peak memory sparse / dense", passed(ratio <= args.max_memory_ratio), f"{ratio:.3f}x",
                          f"{sparse['peak_bytes'] / 2**20:.0f} / {dense['peak_bytes'] / 2**20:.0f} MiB "
                          f"(max {args.max_memory_ratio}x)"))
    else:
        rows.append(Check("peak memory sparse / dense", "n/a", "n/a", "measured on cuda only"))
    update_s = statistics.mean(sparse["update_s"]) if sparse["update_s"] else float("nan")
    rows.append(Check("step time sparse / dense", passed(step_ratio <= args.max_step_ratio), f"{step_ratio:.3f}x",
                      f"median {sparse_s * 1e3:.1f} / {dense_s * 1e3:.1f} ms without update "
                      f"(max {args.max_step_ratio}x); "
                      f"update steps {update_s:.2f} s each"))
    return rows


# -------------------------------------------------------------------- main
def run_checks(args) -> list[Check]:
    """Every check of the table, in order; a section that raises becomes a FAIL row."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return [Check("device", "FAIL", args.device, "torch.cuda.is_available() is False; use --device cpu to test")]
    dtype = torch.bfloat16
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        rows = [Check("device: bf16 supported", passed(bf16), torch.cuda.get_device_name(device),
                      f"torch {torch.__version__}, cuda {torch.version.cuda}")]
    else:
        rows = [Check("device", "PASS", str(device), f"torch {torch.__version__}")]

    def attempt(name: str, section):
        """``section()``, or None and a FAIL row when it raises (a typo on the device must still leave a table)."""
        try:
            return section()
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            message = str(error).splitlines()[0][:120] if str(error) else ""
            rows.append(Check(name, "FAIL", type(error).__name__, message))
            return None
        finally:
            release(device)

    setup = attempt("recipe", lambda: load_setup(args))
    if setup is None:
        return rows
    rows += attempt("engine", lambda: check_engine(setup, device, dtype)) or []
    rows += attempt("SparseAdamW", lambda: check_sparse_adamw(setup, device)) or []
    dense = attempt("dense run", lambda: train_run(setup, device, dtype, args.dense_steps, sparse=False))
    sparse = attempt("CHTss run", lambda: train_run(setup, device, dtype, args.steps, sparse=True))
    if sparse is not None:
        rows += attempt("CHTss rows", lambda: sparse_rows(sparse, args.steps)) or []
    if sparse is not None and dense is not None:
        rows += attempt("sparse vs dense", lambda: comparison_rows(sparse, dense, args)) or []
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu runs the same checks)")
    parser.add_argument("--steps", type=int, default=200, help="steps of the CHTss run (default 200)")
    parser.add_argument("--dense-steps", type=int, default=50, help="steps of the dense run (time and memory only)")
    parser.add_argument("--update-interval", type=int, default=20, help="Δ of the CHTss run (recipe: 100)")
    parser.add_argument("--tiny", action="store_true", help="a tiny LLaMA (32 hidden, 2 layers, batch 4 x 32)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the recipe's 64)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the recipe's 256)")
    parser.add_argument("--max-memory-ratio", type=float, default=1.10, help="FAIL above this sparse/dense peak")
    parser.add_argument("--max-step-ratio", type=float, default=1.25, help="FAIL above this sparse/dense step time")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    for name in ("steps", "dense_steps", "update_interval", "batch", "seq"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    """Run the checks, print the table; 0 when every check passed, 1 otherwise."""
    args = parse_args(argv)
    started = time.perf_counter()
    rows = run_checks(args)
    failed = [row.name for row in rows if row.status == "FAIL"]
    print(common.table([vars(row) for row in rows],
                       [("name", "check"), ("status", "status"), ("value", "value"), ("detail", "detail")], left=4,
                       title=f"hf_chts GPU check: --device {args.device}{' --tiny' if args.tiny else ''} "
                             f"--steps {args.steps}"))
    print(f"{len(rows) - len(failed)}/{len(rows)} rows PASS or n/a, {len(failed)} FAIL; "
          f"wall time {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
