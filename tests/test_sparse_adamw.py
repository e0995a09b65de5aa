"""``hf_chts.SparseAdamW`` (docs/sparse-optimizer.md): moments for live links only, equal to AdamW + masking.

The reference is ``torch.optim.AdamW`` driven by the same engine (which masks gradients and zeroes the
moments of links that start at 0). Both runs see the same data; since the topology update depends on
the weights, equal weights after every step also mean equal masks.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_chts import SparseAdamW, SparsifyConfig, sparsify
from hf_chts.engine import SparseTrainingEngine
from hf_chts.layers import sparse_layers
from hf_chts.sparse_adamw import FSDP2_REFUSED, live_index

MOMENTS = ("exp_avg", "exp_avg_sq")


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=16, bos_token_id=0, eos_token_id=1)
    return transformers.AutoModelForCausalLM.from_config(config)


def tiny_gpt2(seed: int):  # Conv1D: weights stored in x out
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=8, n_head=2, n_layer=1, n_positions=16, vocab_size=16,
                                     bos_token_id=0, eos_token_id=1)
    return transformers.AutoModelForCausalLM.from_config(config)


def unpacked(optimizer: SparseAdamW, layer, key: str) -> torch.Tensor:
    """A packed moment of a sparsified weight laid out like the weight (0 at masked positions)."""
    packed = optimizer.state[layer.weight][key]
    dense = torch.zeros_like(layer.weight)
    dense.view(-1)[live_index(layer.storage_mask())] = packed
    return dense


def train(config: SparsifyConfig, make_optimizer, *, steps: int = 24, seed: int = 0, model_fn=tiny_llama,
          clip: float | None = None, scheduler: bool = False, on_step=None):
    model = model_fn(seed)
    model.train()
    sparsify(model, config)
    optimizer = make_optimizer(model.parameters())
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0) if scheduler else None
    engine = SparseTrainingEngine(model, total_steps=steps, optimizer=optimizer, lr_scheduler=lr_scheduler)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 16, (4, 8), generator=generator)
        model(ids, labels=ids).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad()
        engine.step()
        if on_step is not None:
            on_step(model, optimizer, engine)
    return model, optimizer, engine


def same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    """Bit-equal, or (``exact=False``) within 1e-6 of the tensor's largest magnitude."""
    if exact:
        return torch.equal(got, want)
    return bool((got - want).abs().max() <= 1e-6 * want.abs().max())


def lockstep(config: SparsifyConfig, kernel: dict, exact: bool = True, **kwargs):
    """Run AdamW and SparseAdamW on the same data; after every step compare weights, masks and moments."""
    hyper = dict(lr=1e-2, weight_decay=0.1, **kernel)
    reference = []
    train(config, lambda params: torch.optim.AdamW(params, **hyper),
          on_step=lambda model, optimizer, engine: reference.append(
              ({n: p.detach().clone() for n, p in model.named_parameters()},
               {n: {k: optimizer.state[layer.weight][k].clone() for k in MOMENTS}
                for n, layer in sparse_layers(model).items()},
               {n: layer.mask.clone() for n, layer in sparse_layers(model).items()})), **kwargs)
    step = iter(range(10**6))

    def compare(model, optimizer, engine):
        weights, moments, masks = reference[next(step)]
        for name, param in model.named_parameters():
            assert same(param, weights[name], exact), f"{name} at step {engine.completed_steps}"
        for name, layer in sparse_layers(model).items():
            live = int(layer.mask.sum())
            assert torch.equal(layer.mask, masks[name]), f"{name} mask at step {engine.completed_steps}"
            for key in MOMENTS:
                assert optimizer.state[layer.weight][key].shape == (live,), "moments are packed, one per live link"
                assert same(unpacked(optimizer, layer, key), moments[name][key], exact), f"{name} {key}"

    model, optimizer, engine = train(config, lambda params: SparseAdamW(params, **hyper), on_step=compare, **kwargs)
    assert len(reference) == engine.completed_steps
    return model, optimizer, engine


KERNELS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_chtss_from_density_one_matches_masked_adamw(kernel):
    """Bit-exact for the for-loop and foreach kernels. torch's fused CPU kernel computes the last
    ``numel % vector width`` entries of a tensor in a scalar loop that rounds differently (FMA), and
    packing moves links into or out of that tail: within 1e-6 relative there (docs/sparse-optimizer.md)."""
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=0)
    _, _, engine = lockstep(config, KERNELS[kernel], exact=kernel != "fused")
    assert len(engine.history) >= 3 and engine.history[0].density > 0.3  # from 1.0, decaying
    assert engine.density() < 0.5


def test_set_matches_masked_adamw_bit_for_bit():
    config = SparsifyConfig(method="set", target_density=0.5, update_interval=3, seed=0)
    _, _, engine = lockstep(config, KERNELS["for-loop"])
    assert sum(stats.regrown > 0 for stats in engine.history) >= 3


def test_conv1d_set_matches_masked_adamw_bit_for_bit():
    config = SparsifyConfig(method="set", target_density=0.5, update_interval=3, seed=0)
    _, _, engine = lockstep(config, KERNELS["for-loop"], model_fn=tiny_gpt2)
    assert len(engine.history) >= 3
    assert any(layer.transposed for layer in engine.layers.values())


def test_parity_rewarmup_skip_step_and_clipping_match_masked_adamw():
    config = SparsifyConfig(method="chtss", target_density=0.3, initial_density=0.5, update_interval=3,
                            parity=True, seed=0)
    assert config.skip_optimizer_step_on_update and config.lr_rewarmup_steps > 0
    lockstep(config, KERNELS["for-loop"], clip=0.05, scheduler=True)


def test_kept_links_keep_their_moments_and_grown_links_start_at_zero():
    config = SparsifyConfig(method="set", target_density=0.5, update_interval=4, removal_fraction=0.3, seed=0)
    updates = []

    def snapshot(model, optimizer):
        return {n: (layer.storage_mask().clone(), unpacked(optimizer, layer, "exp_avg"),
                    unpacked(optimizer, layer, "exp_avg_sq")) for n, layer in sparse_layers(model).items()}

    def wrap_update(model, optimizer, engine):  # record the state right before and right after each update
        if hasattr(engine, "recorded"):
            return
        original = engine.update_topology

        def recorded():
            before = snapshot(model, optimizer)
            stats = original()
            updates.append((before, snapshot(model, optimizer)))
            return stats

        engine.update_topology = engine.recorded = recorded

    train(config, lambda params: SparseAdamW(params, lr=1e-2), steps=12, on_step=wrap_update)
    assert len(updates) == 2
    kept_nonzero = grown = 0
    for before, after in updates:
        for name, (old_mask, old_avg, old_sq) in before.items():
            new_mask, new_avg, new_sq = after[name]
            kept, new = old_mask & new_mask, new_mask & ~old_mask
            # SET has no decay pruning: a link live before and after keeps both moments exactly
            assert torch.equal(new_avg[kept], old_avg[kept]) and torch.equal(new_sq[kept], old_sq[kept]), name
            assert not new_avg[new].any() and not new_sq[new].any(), name
            assert not new_avg[~new_mask].any() and not new_sq[~new_mask].any(), name
            kept_nonzero += int((new_avg[kept] != 0).sum())
            grown += int(new.sum())
    assert kept_nonzero > 0 and grown > 0


def test_repack_keeps_order_zeroes_new_and_drops_cut_links():
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    optimizer = SparseAdamW([weight])
    old = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    new = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    keep = torch.tensor([[0, 1, 0], [1, 0, 0]], dtype=torch.bool)  # (1, 2) live in both but not kept: reset
    optimizer.state[weight] = {"step": torch.tensor(5.0), "exp_avg": torch.tensor([1.0, 2.0, 3.0, 4.0]),
                               "exp_avg_sq": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    optimizer.repack(weight, old, new, keep)
    # new live links in row-major order: (0,1) kept, (0,2) grown, (1,0) kept, (1,1) grown, (1,2) reset
    assert optimizer.state[weight]["exp_avg"].tolist() == [2.0, 0.0, 3.0, 0.0, 0.0]
    assert optimizer.state[weight]["exp_avg_sq"].tolist() == [6.0, 0.0, 7.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="outside the old or the new mask"):
        optimizer.repack(weight, new, new, old)


def test_state_is_proportional_to_density_and_dense_params_get_adamw_state():
    config = SparsifyConfig(method="set", target_density=0.3, update_interval=4, seed=0)
    model, optimizer, engine = train(config, lambda params: SparseAdamW(params, lr=1e-2), steps=6)
    reference_model, reference, _ = train(config, lambda params: torch.optim.AdamW(params, lr=1e-2), steps=6)
    sparse_ids = {id(layer.weight) for layer in engine.layers.values()}
    for param in model.parameters():
        if id(param) not in sparse_ids:
            assert optimizer.state[param]["exp_avg"].shape == param.shape
    live = sum(int(layer.mask.sum()) for layer in engine.layers.values())
    numel = sum(layer.mask.numel() for layer in engine.layers.values())
    saved = 2 * 4 * (numel - live)  # two fp32 moments per masked link
    assert reference.state_dict() and optimizer.state_bytes() == sum(
        v.numel() * v.element_size() for s in reference.state.values() for v in s.values()) - saved


def test_a_mask_changed_without_repack_is_a_clear_error():
    model = tiny_llama(0)
    sparsify(model, SparsifyConfig(method="set", target_density=0.5))
    optimizer = SparseAdamW(model.parameters())
    ids = torch.randint(0, 16, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    layer = next(iter(sparse_layers(model).values()))
    layer.set_mask(torch.ones_like(layer.mask))  # outside the engine: no re-pack
    model(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="live links. The mask changed without a re-pack"):
        optimizer.step()


def test_fsdp2_sharded_parameters_are_refused_at_construction(monkeypatch):
    class DTensor(torch.nn.Parameter):  # what FSDP2's fully_shard turns parameters into (checked by type name)
        pass

    with pytest.raises(ValueError, match="FSDP2") as error:
        SparseAdamW([DTensor(torch.zeros(2, 2))])
    assert str(error.value) == FSDP2_REFUSED and "\n" not in FSDP2_REFUSED


# ------------------------------------------------------------------ save and resume
def trainer_run(output_dir, model, *, resume_from=None, **overrides):
    from transformers import Trainer

    from hf_chts import CHTssTrainerCallback, sparse_adamw_cls_and_kwargs
    from trainer_utils import PatternDataset, training_args

    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=0)
    args = training_args(output_dir, max_steps=12, save_strategy="steps", save_steps=6, learning_rate=1e-2,
                         weight_decay=0.1, max_grad_norm=0.5, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=PatternDataset(vocab=16),
                      optimizer_cls_and_kwargs=sparse_adamw_cls_and_kwargs(args),
                      callbacks=[CHTssTrainerCallback(config)])
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


@pytest.mark.slow  # two Trainer runs
def test_trainer_resume_through_optimizer_pt_is_bit_identical(tmp_path):
    straight_model = tiny_llama(1)
    straight = trainer_run(tmp_path / "straight", straight_model)
    assert isinstance(straight.optimizer.optimizer, SparseAdamW)
    saved = torch.load(tmp_path / "straight" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    live = sum(int(layer.mask.sum()) for layer in sparse_layers(straight_model).values())
    numel = sum(layer.mask.numel() for layer in sparse_layers(straight_model).values())
    assert live < 0.5 * numel
    assert sum(s["exp_avg"].numel() for s in saved["state"].values()) < sum(p.numel() for p in straight_model.parameters())

    resumed_model = tiny_llama(2)  # another init: everything must come from checkpoint-6
    trainer_run(tmp_path / "straight", resumed_model, resume_from=str(tmp_path / "straight" / "checkpoint-6"))
    for (name, param), resumed in zip(straight_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(param, resumed), name


def test_accelerate_save_state_resume_is_bit_identical(tmp_path):
    from accelerate import Accelerator

    config = SparsifyConfig(method="set", target_density=0.4, update_interval=3, seed=0)
    batches = [torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(12)]

    def run(start: int, stop: int, load: str | None = None, save_at: int | None = None, seed: int = 0):
        model = tiny_llama(seed)
        model.train()
        sparsify(model, config)
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, SparseAdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
        engine = SparseTrainingEngine(model, total_steps=12, optimizer=optimizer)
        accelerator.register_for_checkpointing(engine)
        if load is not None:
            accelerator.load_state(load)
        for step in range(start, stop):
            model(batches[step], labels=batches[step]).loss.backward()
            accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
            engine.step()
            if save_at == step + 1:
                accelerator.save_state(str(tmp_path / "state"))
        return accelerator.unwrap_model(model)

    straight = run(0, 12, save_at=5)
    resumed = run(5, 12, load=str(tmp_path / "state"), seed=3)
    for (name, param), other in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(param, other), name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_processes_match_masked_adamw(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    from test_multiprocess import ACCELERATE, free_port

    script = Path(__file__).parent / "scripts" / "ddp_sparse_adamw_run.py"
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), str(tmp_path)]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"weights-rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["world_size"] == 2
    for name, weight in ranks[0]["adamw"].items():
        assert torch.equal(ranks[0]["sparse_adamw"][name], weight), name
        assert torch.equal(ranks[1]["sparse_adamw"][name], weight), name


# ------------------------------------------------------------------------ recipe
def test_recipe_training_optim_selects_sparse_adamw(tmp_path):
    from hf_chts import recipe as R
    from test_recipe import small_recipe, write_corpus

    write_corpus(tmp_path / "corpus")
    raw = small_recipe(tmp_path, training={"max_steps": 4, "optim": "hf_chts_sparse_adamw", "weight_decay": 0.1,
                                           "learning_rate": 2e-3})
    recipe = R.recipe_from_dict(raw)
    assert recipe.training["optim"] == "hf_chts_sparse_adamw"
    args = R.training_arguments(recipe)
    model = tiny_llama(0)
    sparsify(model, SparsifyConfig(method="set", target_density=0.5))
    trainer = R.build_trainer(recipe, model, None, R.LMData(train=None, validation=None, validation_texts=[], stats={}),
                              callback=transformers.TrainerCallback(), args=args)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is SparseAdamW and optimizer.defaults["lr"] == 2e-3
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.1, 0.0}

    other = small_recipe(tmp_path, training={"max_steps": 4, "optim": "adamw_torhc"})
    with pytest.raises(ValueError, match="training.optim"):
        R.recipe_from_dict(other)
    fsdp = small_recipe(tmp_path, training={"max_steps": 4, "optim": "hf_chts_sparse_adamw", "fsdp": "full_shard"})
    with pytest.raises(ValueError, match="does not support FSDP2"):
        R.recipe_from_dict(fsdp)


def test_adamw_shaped_state_of_a_weight_sparsified_later_is_packed_at_its_next_step():
    model = tiny_llama(0)
    optimizer = SparseAdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 16, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # nothing sparse yet: AdamW state everywhere
    optimizer.zero_grad()
    sparsify(model, SparsifyConfig(method="set", target_density=0.5))
    layer = next(iter(sparse_layers(model).values()))
    dense_avg = optimizer.state[layer.weight]["exp_avg"].clone()
    assert dense_avg.shape == layer.weight.shape
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    packed = optimizer.state[layer.weight]["exp_avg"]
    assert packed.shape == (int(layer.mask.sum()),)
    mask = layer.storage_mask()
    assert torch.equal(packed, dense_avg[mask].lerp(layer.weight.grad[mask], 1 - 0.9))  # AdamW's first moment
