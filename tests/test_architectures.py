"""build_topology on tiny random HF models (offline), checked functionally.

The index maps of the couplings are verified against what the models really
compute: zeroing the rows a NeuronRef names must zero exactly the matching
(head, dim) of the query/key/value the attention kernel receives (after RoPE,
which also checks the rotary partners), and the o/down column maps must read
the attention output / MLP hidden neuron they claim to.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch
import transformers
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.pytorch_utils import Conv1D

from hf_chts.architectures import (
    COL_ROLES,
    ROW_ROLES,
    AttentionCoupling,
    MLPCoupling,
    ModelTopology,
    NeuronRef,
    build_topology,
    head_geometry,
    get_architecture,
    rope_partner,
)

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
SEQ = 6

LLAMA_ROLES = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
EXPECTED_ROLES = {
    "llama": LLAMA_ROLES,
    "qwen2": LLAMA_ROLES,
    "mistral": LLAMA_ROLES,
    "gemma": LLAMA_ROLES,
    "phi3": {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"},
    "gpt2": {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "fc_in", "mlp.c_proj": "fc_out"},
    "gpt_neox": {
        "attention.query_key_value": "qkv",
        "attention.dense": "o",
        "mlp.dense_h_to_4h": "fc_in",
        "mlp.dense_4h_to_h": "fc_out",
    },
}
BLOCK_PREFIX = {"gpt2": r"transformer\.h\.(\d+)\.", "gpt_neox": r"gpt_neox\.layers\.(\d+)\."}
EXPECTED_KV_HEADS = {"gpt2": HEADS, "gpt_neox": HEADS}
EXPECTED_ROTARY_DIM = {"gpt2": 0, "gpt_neox": HEAD_DIM // 4, "phi3": HEAD_DIM // 2}


def make_config(model_type: str) -> PretrainedConfig:
    tokens = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        **tokens,
    )
    if model_type == "llama":
        return transformers.LlamaConfig(**llama_like)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if model_type == "mistral":
        return transformers.MistralConfig(**llama_like)
    if model_type == "gemma":
        return transformers.GemmaConfig(head_dim=HEAD_DIM, **llama_like)
    if model_type == "phi3":
        return transformers.Phi3Config(partial_rotary_factor=0.5, **llama_like)
    if model_type == "gpt2":
        return transformers.GPT2Config(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_positions=32, **tokens)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            rotary_pct=0.25,
            **tokens,
        )
    raise ValueError(model_type)


# --------------------------------------------------------------------------
# Capturing what the attention kernel receives
# --------------------------------------------------------------------------
CAPTURED: list[dict[str, torch.Tensor]] = []


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, recording q/k/v as (B, heads, T, d) and the output as (B, T, H, d)."""
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    CAPTURED.append({"q": query.detach(), "k": key.detach(), "v": value.detach(), "out": output.detach()})
    return output, weights


AttentionInterface.register("hf_chts_capture", _capturing_attention)

_MODELS: dict[str, nn.Module] = {}


def tiny_model(model_type: str) -> nn.Module:
    if model_type not in _MODELS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(model_type), attn_implementation="hf_chts_capture")
        _MODELS[model_type] = model.eval()
    return _MODELS[model_type]


def select_block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D inside a decoder block (never embeddings or lm_head)."""
    block = re.compile(r"\.(?:layers|h)\.\d+\.")
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and block.search(name)
    }


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The out x in view of a weight (Conv1D stores in x out)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@contextmanager
def zeroed_rows(module: nn.Module, rows: torch.Tensor):
    """Temporarily zero logical output rows (weight and bias) of a linear-like module."""
    rows = rows.flatten()
    weight = logical_weight(module)
    saved_weight = weight.detach()[rows].clone()
    saved_bias = module.bias.detach()[rows].clone() if module.bias is not None else None
    with torch.no_grad():
        weight[rows] = 0
        if module.bias is not None:
            module.bias[rows] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            weight[rows] = saved_weight
            if saved_bias is not None:
                module.bias[rows] = saved_bias


def run(model: nn.Module) -> dict[str, torch.Tensor]:
    """Forward a short sequence; return the captures of the first block."""
    CAPTURED.clear()
    with torch.no_grad():
        model(torch.arange(2, 2 + SEQ).view(1, SEQ))
    assert len(CAPTURED) == LAYERS
    return CAPTURED[0]


def all_zero_dims(states: torch.Tensor, from_position: int = 0) -> set[tuple[int, int]]:
    """(head, dim) pairs that are exactly zero at every position >= from_position."""
    zero = (states[0, :, from_position:, :] == 0).all(dim=1)  # (heads, d)
    return {(int(h), int(i)) for h, i in zero.nonzero()}


def block0(topology: ModelTopology) -> tuple[AttentionCoupling, MLPCoupling]:
    attention = [c for c in topology.attention if topology.layers[c.q.layer].block == 0]
    mlp = [c for c in topology.mlp if topology.layers[c.output.layer].block == 0]
    assert len(attention) == 1 and len(mlp) == 1
    return attention[0], mlp[0]


ALL_TYPES = sorted(EXPECTED_ROLES)


# --------------------------------------------------------------------------
# Roles and couplings
# --------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_roles_blocks_and_coupling_counts(model_type: str) -> None:
    model = tiny_model(model_type)
    selected = select_block_linears(model)
    assert len(selected) == LAYERS * len(EXPECTED_ROLES[model_type])
    topology = build_topology(model, selected)
    assert topology.known_architecture and topology.model_type == model_type
    assert set(topology.layers) == set(selected)
    prefix = re.compile(BLOCK_PREFIX.get(model_type, r"model\.layers\.(\d+)\."))
    for name, info in topology.layers.items():
        match = prefix.match(name)
        assert match, name
        assert info.role == EXPECTED_ROLES[model_type][name[match.end() :]], name
        assert info.block == int(match.group(1))
    assert len(topology.attention) == LAYERS and len(topology.mlp) == LAYERS
    for block, (attention, mlp) in enumerate(zip(topology.attention, topology.mlp)):
        for ref in (attention.q, attention.k, attention.v, attention.o, *mlp.inputs, mlp.output):
            assert topology.layers[ref.layer].block == block
            expected_axis = "col" if topology.layers[ref.layer].role in COL_ROLES else "row"
            assert ref.axis == expected_axis
            assert topology.layers[ref.layer].role in ROW_ROLES | COL_ROLES


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_geometry_and_rope_partner(model_type: str) -> None:
    model = tiny_model(model_type)
    geometry = head_geometry(model.config, get_architecture(model_type))
    assert geometry.num_heads == HEADS and geometry.head_dim == HEAD_DIM
    assert geometry.num_kv_heads == EXPECTED_KV_HEADS.get(model_type, KV_HEADS)
    assert geometry.rotary_dim == EXPECTED_ROTARY_DIM.get(model_type, HEAD_DIM)
    attention, _ = block0(build_topology(model, select_block_linears(model)))
    assert attention.q.index.shape == (HEADS, HEAD_DIM)
    assert attention.k.index.shape == attention.v.index.shape == (geometry.num_kv_heads, HEAD_DIM)
    assert attention.o.index.shape == (HEADS, HEAD_DIM)
    partner = attention.rope_partner
    assert torch.equal(partner[partner], torch.arange(HEAD_DIM)), "RoPE pairing is an involution"
    half = geometry.rotary_dim // 2
    expected = torch.cat([torch.arange(half, 2 * half), torch.arange(half), torch.arange(2 * half, HEAD_DIM)])
    assert torch.equal(partner, expected)


def test_partial_rotary_partners_by_hand() -> None:
    neox = tiny_model("gpt_neox")
    phi3 = tiny_model("phi3")
    neox_partner = block0(build_topology(neox, select_block_linears(neox)))[0].rope_partner
    phi3_partner = block0(build_topology(phi3, select_block_linears(phi3)))[0].rope_partner
    assert neox_partner.tolist() == [2, 3, 0, 1] + list(range(4, 16))  # rotary_ndims = 16 * 0.25
    assert phi3_partner.tolist() == [4, 5, 6, 7, 0, 1, 2, 3] + list(range(8, 16))  # 16 * 0.5
    assert rope_partner(6, 0).tolist() == list(range(6))


def test_fused_layer_sizes() -> None:
    phi3 = tiny_model("phi3")
    topology = build_topology(phi3, select_block_linears(phi3))
    qkv = topology.layers["model.layers.0.self_attn.qkv_proj"]
    sizes = {block.role: block.rows.numel() for block in qkv.blocks}
    assert sizes == {"q": HEADS * HEAD_DIM, "k": KV_HEADS * HEAD_DIM, "v": KV_HEADS * HEAD_DIM}
    assert torch.equal(torch.cat([b.rows for b in qkv.blocks]), torch.arange(phi3.config.hidden_size + 2 * KV_HEADS * HEAD_DIM))
    gate_up = topology.layers["model.layers.0.mlp.gate_up_proj"]
    assert [(b.role, b.rows.numel()) for b in gate_up.blocks] == [("gate", FFN), ("up", FFN)]

    gpt2 = tiny_model("gpt2")
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and tuple(logical_weight(c_attn).shape) == (3 * HIDDEN, HIDDEN)
    topology = build_topology(gpt2, select_block_linears(gpt2))
    blocks = topology.layers["transformer.h.0.attn.c_attn"].blocks
    assert [(b.role, b.rows.min().item(), b.rows.max().item()) for b in blocks] == [
        ("q", 0, HIDDEN - 1),
        ("k", HIDDEN, 2 * HIDDEN - 1),
        ("v", 2 * HIDDEN, 3 * HIDDEN - 1),
    ]
    attention, mlp = block0(topology)
    assert mlp.inputs[0].index.numel() == 4 * HIDDEN == logical_weight(gpt2.transformer.h[0].mlp.c_fc).shape[0]

    neox = tiny_model("gpt_neox")
    attention, _ = block0(build_topology(neox, select_block_linears(neox)))
    stride = 3 * HEAD_DIM  # interleaved per head: [q k v] of head 0, then head 1, ...
    assert attention.q.index[1, 0].item() == stride and attention.k.index[0, 0].item() == HEAD_DIM
    assert attention.v.index[2, 3].item() == 2 * stride + 2 * HEAD_DIM + 3


# --------------------------------------------------------------------------
# Functional checks of the index maps
# --------------------------------------------------------------------------
def _heads_to_check(count: int) -> list[int]:
    return sorted({0, count - 1})


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_qkv_rows_and_rope_partners_match_what_attention_receives(model_type: str) -> None:
    model = tiny_model(model_type)
    selected = select_block_linears(model)
    attention, _ = block0(build_topology(model, selected))
    partner = attention.rope_partner
    baseline = run(model)
    for role in ("q", "k", "v"):
        assert all_zero_dims(baseline[role]) == set()
    for role, ref in (("q", attention.q), ("k", attention.k), ("v", attention.v)):
        module = selected[ref.layer]
        for head in _heads_to_check(ref.index.shape[0]):
            with zeroed_rows(module, ref.index[head]):  # a whole head
                assert {h for h, _ in all_zero_dims(run(model)[role])} == {head}
            for dim in range(HEAD_DIM):
                pair = sorted({dim, int(partner[dim])}) if role != "v" else [dim]
                with zeroed_rows(module, ref.index[head, pair]):
                    assert all_zero_dims(run(model)[role]) == {(head, d) for d in pair}, (role, head, dim)
                if len(pair) == 2:  # rotated dim: zeroing one row of the pair leaves both live after RoPE
                    with zeroed_rows(module, ref.index[head, dim]):
                        assert all_zero_dims(run(model)[role], from_position=1) == set(), (role, head, dim)
    assert all_zero_dims(run(model)["q"]) == set(), "weights restored"


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_o_columns_read_the_attention_output(model_type: str) -> None:
    model = tiny_model(model_type)
    selected = select_block_linears(model)
    attention, _ = block0(build_topology(model, selected))
    seen: list[torch.Tensor] = []
    hook = selected[attention.o.layer].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        out = run(model)["out"]  # (B, T, H, d)
    finally:
        hook.remove()
    o_input = seen[0]  # (B, T, H*d)
    assert out.abs().sum() > 0
    assert torch.equal(o_input[..., attention.o.index], out)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_mlp_rows_feed_the_output_column_of_the_same_neuron(model_type: str) -> None:
    model = tiny_model(model_type)
    selected = select_block_linears(model)
    _, mlp = block0(build_topology(model, selected))
    ffn = mlp.output.index.numel()
    seen: list[torch.Tensor] = []
    hook = selected[mlp.output.layer].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))

    def zero_columns_of_output() -> set[int]:
        seen.clear()
        run(model)
        hidden = seen[0][0]  # (T, F): the first block's output layer input
        return {int(c) for c in (hidden == 0).all(dim=0).nonzero()}

    try:
        assert zero_columns_of_output() == set()
        for ref in mlp.inputs:
            assert ref.index.shape == (ffn,)
            for neuron in (0, 1, ffn // 2, ffn - 1):
                with zeroed_rows(selected[ref.layer], ref.index[neuron : neuron + 1]):
                    assert zero_columns_of_output() == {int(mlp.output.index[neuron])}, (ref.layer, neuron)
    finally:
        hook.remove()


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_up_rows_enter_the_mlp_linearly(model_type: str) -> None:
    """Tell gate from up: hidden = act(gate) * up, so doubling the up rows
    doubles the down input exactly, doubling the gate rows does not."""
    model = tiny_model(model_type)
    selected = select_block_linears(model)
    topology = build_topology(model, selected)
    _, mlp = block0(topology)
    rows_of = {
        block.role: (name, block.rows)
        for name in {ref.layer for ref in mlp.inputs}
        for block in topology.layers[name].blocks
        if block.role in ("gate", "up")
    }
    assert set(rows_of) == {"gate", "up"}
    seen: list[torch.Tensor] = []
    hook = selected[mlp.output.layer].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        run(model)
        baseline = seen[0]
        for role, doubles in (("up", True), ("gate", False)):
            name, rows = rows_of[role]
            weight = logical_weight(selected[name])
            seen.clear()
            with torch.no_grad():
                weight[rows] *= 2
            try:
                run(model)
            finally:
                with torch.no_grad():
                    weight[rows] /= 2
            assert torch.allclose(seen[0], 2 * baseline, rtol=1e-5, atol=1e-7) == doubles, role
    finally:
        hook.remove()


# --------------------------------------------------------------------------
# Partial selection and unknown architectures
# --------------------------------------------------------------------------
def test_couplings_need_every_coupled_layer_selected() -> None:
    model = tiny_model("llama")
    selected = {n: m for n, m in select_block_linears(model).items() if not n.endswith("k_proj")}
    topology = build_topology(model, selected)
    assert topology.attention == [] and len(topology.mlp) == LAYERS
    assert topology.layers["model.layers.1.self_attn.q_proj"].role == "q"


class MysteryConfig(PretrainedConfig):
    model_type = "mystery"


class MysteryModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = MysteryConfig()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)) for _ in range(2))


def test_unknown_model_type_has_no_couplings() -> None:
    model = MysteryModel()
    selected = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    topology = build_topology(model, selected)
    assert topology.known_architecture is False
    assert topology.model_type == "mystery"
    assert topology.attention == [] and topology.mlp == []
    assert {info.role for info in topology.layers.values()} == {"linear"}
    assert [info.blocks[0].rows.numel() for info in topology.layers.values()] == [12, 8, 12, 8]


def test_module_outside_the_block_pattern_is_uncoupled() -> None:
    model = tiny_model("llama")
    selected = dict(select_block_linears(model))
    selected["lm_head"] = model.lm_head
    topology = build_topology(model, selected)
    assert topology.layers["lm_head"].role == "linear" and topology.layers["lm_head"].block is None
    assert len(topology.attention) == LAYERS
    assert all(ref.layer != "lm_head" for c in topology.mlp for ref in (*c.inputs, c.output))
    assert isinstance(topology.attention[0].q, NeuronRef)
