"""Issue 2 acceptance: sparsify() on tiny models of several architectures, and the masking invariant."""

import copy
import logging

import pytest
import torch
from torch import nn

from hf_chts import SparsifyConfig, sparsify, sparsity_report
from hf_chts.layers import SparseLayerMixin, sparse_layers
from hf_chts.state import find_state

ARCHITECTURES = ["llama", "qwen2", "gpt2", "gpt_neox", "phi3"]


def masked_copy_logits(vanilla, sparse_model, input_ids):
    """Logits of the vanilla model whose weights were multiplied by the sparse model's masks."""
    reference = copy.deepcopy(vanilla)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in sparse_layers(sparse_model).items():
            weight = modules[name].weight
            weight.mul_(layer.mask.t() if layer.transposed else layer.mask)
    return reference(input_ids).logits


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("init", ["er", "bsw", "brf"])
def test_sparsify_exact_links_keys_and_logits(make_tiny_model, model_type, init):
    vanilla = make_tiny_model(model_type)
    model = copy.deepcopy(vanilla)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = SparsifyConfig(method="chts", target_density=0.3, init=init, seed=3)
    sparsify(model, config)
    assert list(model.state_dict().keys()) == list(vanilla.state_dict().keys())
    layers = sparse_layers(model)
    assert layers, "nothing was sparsified"
    sparse_weight_names = {f"{name}.weight" for name in layers}
    for name, layer in layers.items():
        assert isinstance(layer, nn.Module) and layer.mask.dtype == torch.bool
        assert abs(int(layer.mask.sum()) - round(0.3 * layer.mask.numel())) <= 1, name
        weight = layer.logical_weight()
        assert torch.all(weight[~layer.mask] == 0)
        assert torch.equal(weight[layer.mask], (untouched[f"{name}.weight"].t() if layer.transposed
                                                 else untouched[f"{name}.weight"])[layer.mask])
    for name, param in model.named_parameters():
        if name not in sparse_weight_names:
            assert torch.equal(param, untouched[name]), f"untargeted {name} changed"
    # embeddings and lm_head are never sparsified by default
    assert not isinstance(model.get_input_embeddings(), SparseLayerMixin)
    assert not isinstance(model.get_output_embeddings(), SparseLayerMixin)
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, masked_copy_logits(vanilla, model, input_ids))
    # the masks are not in the state dict
    assert not any(key.endswith(".mask") for key in model.state_dict())


def test_registry_targets_every_decoder_linear(make_tiny_model):
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts"))
    names = set(sparse_layers(model))
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == expected


def test_sparsify_is_deterministic_per_seed(make_tiny_model):
    masks = []
    for seed in (5, 5, 6):
        model = make_tiny_model("llama")
        sparsify(model, SparsifyConfig(method="set", target_density=0.2, seed=seed))
        masks.append({n: l.mask.clone() for n, l in sparse_layers(model).items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert not all(torch.equal(masks[0][n], masks[2][n]) for n in masks[0])


def test_target_and_exclude_modules(make_tiny_model):
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_modules=["q_proj", "down_proj"], exclude_modules=r".*layers\.1\..*"))
    assert set(sparse_layers(model)) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    regex_model = make_tiny_model("llama")
    sparsify(regex_model, SparsifyConfig(method="chts", target_modules=r".*mlp\.(gate|up)_proj"))
    assert len(sparse_layers(regex_model)) == 4


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_pattern_matching_nothing_is_an_error(make_tiny_model, field):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=f"{field}.*'nonexistent_proj'"):
        sparsify(model, SparsifyConfig(method="chts", **{field: ["nonexistent_proj"]}))
    assert find_state(model) is None and not sparse_layers(model)


def test_sparsify_twice_is_refused(make_tiny_model):
    model = make_tiny_model("gpt2")
    sparsify(model, SparsifyConfig(method="chts"))
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(model, SparsifyConfig(method="chts"))


class MysteryBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(16, 32)
        self.outer = nn.Linear(32, 16)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x)))


class MysteryModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "mystery"})()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([MysteryBlock(), MysteryBlock()])
        self.lm_head = nn.Linear(16, 10)

    def forward(self, ids):
        hidden = self.embed(ids)
        for block in self.layers:
            hidden = hidden + block(hidden)
        return self.lm_head(hidden)


def test_unknown_architecture_falls_back_with_one_warning(caplog):
    model = MysteryModel()
    with caplog.at_level(logging.WARNING, logger="hf_chts.model"):
        sparsify(model, SparsifyConfig(method="chts", target_density=0.5))
    warnings = [r for r in caplog.records if "not in the architecture registry" in r.getMessage()]
    assert len(warnings) == 1
    assert set(sparse_layers(model)) == {"layers.0.inner", "layers.0.outer", "layers.1.inner", "layers.1.outer"}
    state = find_state(model)
    assert not state.topology.known_architecture and not state.topology.attention and not state.topology.mlp
    report = sparsity_report(model)
    assert report.density == pytest.approx(0.5, abs=1e-3)


def _train_steps(model, optimizer, steps=5, engine=None):
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 10), generator=generator)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if engine is not None:
            engine.step()


def _assert_invariant(model, optimizer):
    checked = 0
    for layer in sparse_layers(model).values():
        storage_mask = layer.storage_mask()
        assert torch.all(layer.weight[~storage_mask] == 0)
        state = optimizer.state.get(layer.weight, {})
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert torch.all(state[key][~storage_mask] == 0), key
                checked += 1
        assert torch.any(layer.weight[storage_mask] != 0)
    return checked


@pytest.mark.parametrize("optimizer_name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_masking_invariant_with_optimizers(make_tiny_model, optimizer_name, model_type):
    model = make_tiny_model(model_type)
    model.train()
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    optimizer = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.01),
    }[optimizer_name](model.parameters())
    _train_steps(model, optimizer)
    assert _assert_invariant(model, optimizer) > 0


def test_invariant_needs_the_masking(make_tiny_model):
    """Control: without gradient masking, AdamW revives masked weights (so the test above can fail)."""
    model = make_tiny_model("llama")
    model.train()
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    for layer in sparse_layers(model).values():
        layer.mask_gradients = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_steps(model, optimizer, steps=2)
    with pytest.raises(AssertionError):
        _assert_invariant(model, optimizer)


def test_engine_optimizer_hooks_keep_invariant_even_without_grad_hooks(make_tiny_model):
    from hf_chts.engine import SparseTrainingEngine

    model = make_tiny_model("llama")
    model.train()
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3, update_interval=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = SparseTrainingEngine(model, total_steps=8, optimizer=optimizer)
    for layer in sparse_layers(model).values():
        layer.mask_gradients = False  # only the engine's optimizer pre/post hooks remain
    _train_steps(model, optimizer, steps=6, engine=engine)
    assert len(engine.history) == 3  # updates at steps 2, 4, 6 (update end = 0.75 * 8)
    _assert_invariant(model, optimizer)


def test_csti_init_uses_the_calibration_batch(make_tiny_model):
    model = make_tiny_model("llama")
    calibration = {"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))}
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3, init="csti"), calibration_batch=calibration)
    layers = sparse_layers(model)
    for name, layer in layers.items():
        assert abs(int(layer.mask.sum()) - round(0.3 * layer.mask.numel())) <= 1, name
    # residual-reading layers follow the input correlations: deterministic, no seed dependence
    again = make_tiny_model("llama")
    sparsify(again, SparsifyConfig(method="chts", target_density=0.3, init="csti", seed=9), calibration_batch=calibration)
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(layers[q].mask, sparse_layers(again)[q].mask)
    with pytest.raises(ValueError, match="calibration batch"):
        sparsify(make_tiny_model("llama"), SparsifyConfig(method="chts", target_density=0.3, init="csti"))


def test_sparse_weight_reinit_scales_for_the_live_fan_in(make_tiny_model):
    model = make_tiny_model("llama")
    dense_std = float(model.model.layers[0].mlp.down_proj.weight.std())
    sparsify(model, SparsifyConfig(method="chts", target_density=0.25, init="er", reinit_weights=True))
    layer = sparse_layers(model)["model.layers.0.mlp.down_proj"]
    live = layer.logical_weight()[layer.mask]
    assert torch.all(layer.logical_weight()[~layer.mask] == 0)
    # std grows by sqrt(in / fan-in) = sqrt(1 / density) = 2
    assert float(live.std()) == pytest.approx(2 * dense_std, rel=0.15)


def test_bsf_resort_in_sparsify_aligns_mlp_hubs(make_tiny_model):
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3, init="bsf", bsf_resort=True))
    layers = sparse_layers(model)
    for block in range(2):
        prefix = f"model.layers.{block}.mlp."
        in_degree = layers[prefix + "gate_proj"].mask.sum(1) + layers[prefix + "up_proj"].mask.sum(1)
        out_degree = layers[prefix + "down_proj"].mask.sum(0)
        order = torch.argsort(in_degree, descending=True, stable=True)
        assert torch.all(out_degree[order][:-1] >= out_degree[order][1:])
        assert abs(int(layers[prefix + "down_proj"].mask.sum()) - round(0.3 * 64 * 96)) <= 1


# ------------------------------------------------ a sparse checkpoint loaded without its masks (issue 19 §1)
def _already_sparse_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "looks sparse already" in r.getMessage()]


@pytest.mark.parametrize("entry", ["sparsify", "engine", pytest.param("callback", marks=pytest.mark.slow)])
def test_a_checkpoint_loaded_with_plain_from_pretrained_is_not_resparsified_silently(
        make_tiny_model, tmp_path, caplog, entry):
    import logging

    from transformers import AutoModelForCausalLM

    from hf_chts.checkpoint import save_sparse
    from hf_chts.engine import SparseTrainingEngine

    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    save_sparse(model, tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))  # the HF habit: no masks
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        if entry == "sparsify":
            sparsify(plain, SparsifyConfig())
        elif entry == "engine":
            SparseTrainingEngine(plain, SparsifyConfig(update_interval=4), total_steps=40)
        else:
            from trainer_utils import make_trainer

            trainer, _ = make_trainer(plain, tmp_path / "run", SparsifyConfig(update_interval=4), max_steps=8)
            trainer.train()
    (message,) = _already_sparse_warnings(caplog)
    assert f"hf_chts.load_sparse({str(tmp_path / 'ckpt')!r})" in message and "sparsify_config.json" in message
    assert "density 1.0" in message and "read_engine_state" in message


def test_the_models_own_zeros_are_detected_without_a_checkpoint_folder(make_tiny_model, caplog):
    import logging

    sparse = make_tiny_model("gpt2")
    sparsify(sparse, SparsifyConfig(method="chts", target_density=0.3))
    plain = make_tiny_model("gpt2")
    plain.load_state_dict(sparse.state_dict())  # sparse weights, no masks, no folder
    fresh = make_tiny_model("gpt2")
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        sparsify(fresh, SparsifyConfig())
        assert not _already_sparse_warnings(caplog)  # a dense model: no false alarm
        sparsify(plain, SparsifyConfig())
    (message,) = _already_sparse_warnings(caplog)
    assert "70% of the weights of the layers to sparsify are exactly 0" in message
