"""Percolation on real (tiny, random) models with biases and q/k norms (docs/percolation.md).

Percolation may only remove dead weight: masking the links it removes must not
change what the model computes. That is checked on the architectures whose
rows output a bias without links (qwen2, gpt2, gpt_neox) or whose q/k norm
mixes the rows of a head (qwen3, olmo2, gemma3), with random non-zero biases
and norm weights. A control shows that the plain rule (no bias rows, no
q/k-norm coupling) would change the output on exactly those architectures.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_chts import SparsifyConfig, sparsify
from hf_chts.architectures import build_topology, constant_output_rows
from hf_chts.engine import SparseTrainingEngine
from hf_chts.topology.percolation import percolate

COMMON = dict(vocab_size=32, bos_token_id=0, eos_token_id=1, pad_token_id=0)
LLAMA_LIKE = dict(hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, **COMMON)
BIASED = ("qwen2", "gpt2", "gpt_neox")
QK_NORM = ("qwen3", "olmo2", "gemma3_text")


def make_model(model_type: str, seed: int = 0) -> nn.Module:
    configs = {
        "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
        "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=4, **LLAMA_LIKE),
        "olmo2": lambda: transformers.Olmo2Config(**LLAMA_LIKE),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(head_dim=4, **LLAMA_LIKE),
        "gpt2": lambda: transformers.GPT2Config(n_embd=16, n_head=4, n_layer=1, n_positions=16, **COMMON),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                                                       num_attention_heads=4, rotary_pct=0.5, **COMMON),
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[model_type](), attn_implementation="eager").eval()
    with torch.no_grad():  # biases and norm weights away from their 0 / 1 initialisation
        for name, parameter in model.named_parameters():
            if ".bias" in name or "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and (".layers." in name or ".h." in name)}


def logical_shape(module: nn.Module) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


def sparse_masks(selected: dict[str, nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """Random masks at density 0.35 with half of the rows empty: many neurons lose one side."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in selected.items():
        mask = torch.rand(logical_shape(module), generator=generator) < 0.35
        mask[torch.randperm(mask.shape[0], generator=generator)[: mask.shape[0] // 2]] = False
        masks[name] = mask
    return masks


def logits_with(model: nn.Module, selected: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    saved = {name: module.weight.detach().clone() for name, module in selected.items()}
    with torch.no_grad():
        for name, module in selected.items():
            module.weight.mul_(masks[name].t() if isinstance(module, Conv1D) else masks[name])
        ids = torch.arange(12).view(1, 12) % 32
        logits = model(ids).logits
        for name, module in selected.items():
            module.weight.copy_(saved[name])
    return logits


@pytest.mark.parametrize("model_type", ["llama", *BIASED, *QK_NORM])
def test_percolation_removes_only_links_that_do_not_change_the_output(model_type):
    model = make_model(model_type)
    selected = block_linears(model)
    topology = build_topology(model, selected)
    assert len(topology.attention) == 1 and len(topology.mlp) == 1
    assert topology.attention[0].qk_norm == (model_type in QK_NORM)
    constant = constant_output_rows(selected)
    assert bool(constant) == (model_type in BIASED)
    removed = changed_by_plain_rule = 0
    for seed in range(6):
        masks = sparse_masks(selected, seed)
        before = logits_with(model, selected, masks)
        result = percolate(masks, topology, rope_aware=True, constant_rows=constant)
        removed += sum(result.removed.values())
        torch.testing.assert_close(logits_with(model, selected, result.masks), before, rtol=1e-5, atol=1e-6)
        plain_topology = dataclasses.replace(
            topology, attention=[dataclasses.replace(c, qk_norm=False) for c in topology.attention])
        plain = percolate(masks, plain_topology, rope_aware=True).masks
        changed_by_plain_rule += not torch.allclose(logits_with(model, selected, plain), before, rtol=1e-5, atol=1e-6)
    assert removed > 0
    assert bool(changed_by_plain_rule) == (model_type != "llama")


def test_constant_output_rows_follow_trainable_or_non_zero_biases():
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, 1.0, 0.0, -2.0]))
    assert constant_output_rows({"a": layer})["a"].tolist() == [True] * 4  # trainable: moves off 0 at once
    layer.bias.requires_grad_(False)
    assert constant_output_rows({"a": layer})["a"].tolist() == [False, True, False, True]
    assert constant_output_rows({"b": nn.Linear(3, 4, bias=False)}) == {}


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2"])
def test_engine_percolation_keeps_the_k_rows_read_by_a_biased_empty_q_row(model_type):
    model = make_model(model_type)
    selected = block_linears(model)
    topology = build_topology(model, selected)
    coupling = topology.attention[0]
    q_rows, k_rows = coupling.q.index[0], coupling.k.index[0]  # head 0 (GQA group 0 in qwen2)
    masks = {name: torch.rand(logical_shape(module), generator=torch.Generator().manual_seed(1)) < 0.5
             for name, module in selected.items()}
    heads_of_group = coupling.q.index[: coupling.num_heads // coupling.num_kv_heads].flatten()
    masks[coupling.q.layer][heads_of_group] = False  # no q link reads kv head 0; only q biases do
    sparsify(model, SparsifyConfig(method="chts", target_density=0.5, update_interval=2, removal_fraction=0.0),
             masks=masks)
    engine = SparseTrainingEngine(model, total_steps=20, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    k_layer = engine.layers[coupling.k.layer]
    k_before = k_layer.mask[k_rows].clone()
    assert bool(k_before.any()) and not bool(engine.layers[coupling.q.layer].mask[q_rows].any())
    engine.completed_steps = 2
    engine.update_topology()
    assert bool((k_layer.mask[k_rows] >= k_before).all())  # nothing removed from the k rows q's bias reads
