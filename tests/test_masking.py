"""Masked means exactly 0, NaN and inf included (issue 10 item 4), and masking never changes live values.

NaN, +inf, -inf and -0.0 are planted at masked positions of weights, gradients and Adam moments; after
the engine's masking they must read as +0.0 bit for bit, while every live entry keeps its exact bits.
"""

import pytest
import torch

from hf_chts import SparsifyConfig, sparsify
from hf_chts.engine import SparseTrainingEngine
from hf_chts.layers import bit_view, sparse_layers, zero_masked_

SPECIALS = (float("nan"), float("inf"), float("-inf"), -0.0)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (compares NaN payloads and the sign of zero exactly)."""
    return bit_view(tensor.detach().contiguous())


def plant(tensor: torch.Tensor, where: torch.Tensor) -> None:
    """Write NaN, inf, -inf and -0.0 in turn at the positions ``where`` of a contiguous tensor (in place)."""
    index = where.reshape(-1).nonzero().squeeze(1)
    values = torch.tensor(SPECIALS, dtype=tensor.dtype)[torch.arange(index.numel()) % len(SPECIALS)]
    tensor.detach().view(-1)[index] = values


def reference_zero_masked(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Obviously correct: a copy with +0.0 written at every masked position, one element at a time."""
    out = tensor.detach().clone().view(-1)
    for position, kept in enumerate(keep.reshape(-1).tolist()):
        if not kept:
            out[position] = 0.0
    return out.view_as(tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_zero_masked_is_exact_for_specials_and_keeps_live_bits(dtype):
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(7, 9, generator=generator).to(dtype)
    keep = torch.rand(7, 9, generator=generator) < 0.4
    plant(tensor, ~keep)
    plant(tensor, keep & (torch.rand(7, 9, generator=generator) < 0.3))  # specials at live positions stay
    expected = reference_zero_masked(tensor, keep)
    result = zero_masked_(tensor, keep)
    assert result is tensor
    assert torch.equal(bits(tensor), bits(expected))
    assert torch.all(bits(tensor)[~keep] == 0)  # +0.0, not -0.0 and not NaN


def test_zero_masked_on_a_transposed_view_and_integer_tensors():
    generator = torch.Generator().manual_seed(1)
    storage = torch.randn(6, 4, generator=generator)
    keep = torch.rand(4, 6, generator=generator) < 0.5
    view = storage.t()  # Conv1D-style storage: masks come as views of other layouts
    plant(storage, ~keep.t())
    expected = reference_zero_masked(view.contiguous(), keep)
    zero_masked_(view, keep)
    assert torch.equal(bits(view.contiguous()), bits(expected))
    counts = torch.arange(24).view(4, 6)
    zero_masked_(counts, keep)
    assert torch.equal(counts, torch.where(keep, torch.arange(24).view(4, 6), 0))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_layer_masking_zeroes_specials_in_weights_and_gradients(make_tiny_model, model_type):
    model = make_tiny_model(model_type)
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    for layer in sparse_layers(model).values():
        keep = layer.storage_mask()
        with torch.no_grad():
            plant(layer.weight, ~keep)
        layer.weight.grad = torch.randn_like(layer.weight)
        plant(layer.weight.grad, ~keep)
        live_weight, live_grad = layer.weight.detach()[keep].clone(), layer.weight.grad[keep].clone()
        layer.apply_mask_()
        layer.mask_grad_()
        assert torch.all(bits(layer.weight)[~keep] == 0) and torch.all(bits(layer.weight.grad)[~keep] == 0)
        assert torch.equal(layer.weight.detach()[keep], live_weight)
        assert torch.equal(layer.weight.grad[keep], live_grad)


def _sparse_run(make_tiny_model, optimizer_factory, update_interval=100, method="chts"):
    model = make_tiny_model("llama")
    model.train()
    sparsify(model, SparsifyConfig(method=method, target_density=0.3, update_interval=update_interval, seed=0))
    optimizer = optimizer_factory(model.parameters())
    engine = SparseTrainingEngine(model, total_steps=4 * update_interval, optimizer=optimizer)
    return model, optimizer, engine


def _poison_masked_gradients(engine):
    """Tensor hooks run before accumulation: ``.grad`` arrives with specials at every masked position."""
    handles = []
    for layer in engine.layers.values():
        def poison(grad, layer=layer):
            grad = grad.clone()
            plant(grad, ~layer.storage_mask())
            return grad
        handles.append(layer.weight.register_hook(poison))
    return handles


def _assert_exact_zero_where_masked(engine, optimizer):
    for name, layer in engine.layers.items():
        keep = layer.storage_mask()
        assert torch.all(bits(layer.weight)[~keep] == 0), name
        assert torch.isfinite(layer.weight).all(), name
        for key, value in optimizer.state.get(layer.weight, {}).items():
            if torch.is_tensor(value) and value.shape == keep.shape:
                assert torch.all(bits(value)[~keep] == 0), (name, key)


@pytest.mark.parametrize("gradient_hooks", [True, False], ids=["accumulate-hook", "optimizer-pre-hook"])
def test_nan_and_inf_gradients_at_masked_positions_never_reach_weights_or_moments(make_tiny_model, gradient_hooks):
    model, optimizer, engine = _sparse_run(
        make_tiny_model, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    handles = _poison_masked_gradients(engine)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for layer in engine.layers.values():
            layer.mask_gradients = gradient_hooks  # False: only the engine's optimizer pre-hook masks
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        _assert_exact_zero_where_masked(engine, optimizer)
        optimizer.zero_grad()
        engine.step()
    for handle in handles:
        handle.remove()
    assert all(torch.any(layer.weight[layer.storage_mask()] != 0) for layer in engine.layers.values())


class PoisoningOptimizer(torch.optim.Optimizer):
    """Not zero-preserving: its step writes NaN/inf into masked weights, so the engine's post-step re-mask acts."""

    def __init__(self, params, targets):
        super().__init__(params, {"lr": 1e-2})
        self.targets = targets

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"])
        for layer in self.targets:
            plant(layer.weight, ~layer.storage_mask())


def test_specials_written_by_the_optimizer_step_are_re_masked(make_tiny_model):
    model = make_tiny_model("llama")
    model.train()
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3, update_interval=100))
    optimizer = PoisoningOptimizer(model.parameters(), list(sparse_layers(model).values()))
    engine = SparseTrainingEngine(model, total_steps=400, optimizer=optimizer)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    _assert_exact_zero_where_masked(engine, optimizer)
    engine.close()  # control: without the engine's post-step hook the specials stay
    optimizer.step()
    layer = next(iter(engine.layers.values()))
    assert torch.isnan(layer.weight[~layer.storage_mask()]).any()


def test_topology_update_zeroes_specials_in_cut_and_regrown_moments(make_tiny_model):
    model, optimizer, engine = _sparse_run(make_tiny_model, lambda p: torch.optim.Adam(p, lr=1e-2),
                                           update_interval=2, method="set")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    engine.step()  # step 1: no update; the moments exist now
    before = {name: layer.storage_mask().clone() for name, layer in engine.layers.items()}
    for layer in engine.layers.values():  # specials in the moments of every masked position
        for key in ("exp_avg", "exp_avg_sq"):
            plant(optimizer.state[layer.weight][key], ~layer.storage_mask())
    model(ids, labels=ids).loss.backward()
    for layer in engine.layers.values():
        layer.weight.grad.zero_()  # the step itself keeps moments as they are where the gradient is 0 ...
    optimizer.step()
    for layer in engine.layers.values():  # ... so the specials are still there when the update runs
        assert torch.isnan(optimizer.state[layer.weight]["exp_avg"][~layer.storage_mask()]).any()
    optimizer.zero_grad()
    assert engine.step() is not None  # step 2: topology update
    _assert_exact_zero_where_masked(engine, optimizer)
    regrown = 0
    for name, layer in engine.layers.items():
        grown = layer.storage_mask() & ~before[name]
        regrown += int(grown.sum())
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(bits(optimizer.state[layer.weight][key])[grown] == 0), (name, key)
        assert torch.all(bits(layer.weight)[grown] == 0)
    assert regrown > 0


def test_saving_masks_nan_and_inf_in_the_model_and_in_a_given_state_dict(make_tiny_model, tmp_path):
    from safetensors.torch import load_file

    from hf_chts.checkpointing.saving import masked_state_dict
    from hf_chts.recipe.finish import save_gathered_state_dict

    model = make_tiny_model("gpt2")  # Conv1D: the storage layout differs from the logical mask
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    layers = sparse_layers(model)
    given = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for name, layer in layers.items():
        plant(layer.weight, ~layer.storage_mask())
        plant(given[name + ".weight"], ~layer.storage_mask())
    save_gathered_state_dict(model, dict(given), tmp_path, None)  # the FSDP2 end-of-run save (full state dict)
    written = load_file(tmp_path / "model.safetensors")
    masked = masked_state_dict(model, given)
    for name, layer in layers.items():
        keep = layer.storage_mask()
        assert torch.all(bits(layer.weight)[~keep] == 0) and torch.all(bits(masked[name + ".weight"])[~keep] == 0)
        assert torch.equal(masked[name + ".weight"][keep], layer.weight.detach()[keep])
        assert torch.equal(bits(written[name + ".weight"]), bits(masked[name + ".weight"]))


def test_a_checkpoint_with_nan_at_masked_positions_loads_with_exact_zeros(make_tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_chts import load_sparse, save_sparse

    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    save_sparse(model, tmp_path)
    weights_file = tmp_path / "model.safetensors"
    stored = load_file(weights_file)
    for name, layer in sparse_layers(model).items():
        plant(stored[name + ".weight"], ~layer.storage_mask())
    save_file(stored, weights_file, metadata={"format": "pt"})
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    try:
        loaded = load_sparse(tmp_path)
    except ValueError as error:  # refusing such a folder is also safe; it must name the file
        assert "model.safetensors" in str(error)
        return
    for name, layer in sparse_layers(loaded).items():
        assert torch.all(bits(layer.weight)[~layer.storage_mask()] == 0), name
        assert torch.equal(layer.weight, sparse_layers(model)[name].weight), name
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
