"""Architecture registry: ``config.model_type`` -> layer roles and coupling groups.

The topology code always works on the logical ``out x in`` view of a weight.
This module tells, for each supported architecture,

* which linear modules of a decoder block have which *role*
  (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``, fused ``qkv``,
  fused ``gate_up``, plain MLP ``fc_in``/``fc_out``), and
* how the neurons of those layers are coupled for network percolation
  (docs/algorithms.md §4): q/k rows at the same position (with RoPE pairs and GQA
  groups), v rows feeding o columns, gate/up rows feeding down columns, and
* what makes a neuron live without links: a bias (its row still outputs
  the bias, :func:`constant_output_rows`) or a q/k norm that mixes every q
  (k) row of a head (``AttentionCoupling.qk_norm``); docs/percolation.md.

Couplings are plain data (module names + ``LongTensor`` index maps) so that
:func:`hf_chts.topology.percolation.percolate` stays a pure function of masks.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import is_dtensor, logical_shape_of

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Data model shared with the percolation code
# --------------------------------------------------------------------------
@dataclass
class NeuronRef:
    """Neurons of one layer on its non-residual side.

    ``index`` holds row indices (``axis="row"``) or column indices
    (``axis="col"``) into the logical ``out x in`` mask of module ``layer``.
    Attention refs have shape ``(heads, head_dim)``; MLP refs ``(ffn,)``.
    """

    layer: str
    axis: str  # "row" | "col"
    index: torch.Tensor


@dataclass
class AttentionCoupling:
    """q/k/v/o of one attention block (docs/algorithms.md §4).

    ``q``: rows ``(H, d)``; ``k``/``v``: rows ``(H_kv, d)``; ``o``: columns
    ``(H, d)``. ``rope_partner[i]`` is the dim RoPE mixes with dim ``i``
    (``i`` itself for non-rotary dims). q head ``h`` uses kv head
    ``h // (H // H_kv)``. ``qk_norm``: a norm over whole q / k heads (qwen3,
    olmo2, gemma3) rescales every row of a head by all of them, so no q or k
    row is dead weight because of its partner (docs/percolation.md).
    """

    q: NeuronRef
    k: NeuronRef
    v: NeuronRef
    o: NeuronRef
    rope_partner: torch.Tensor
    qk_norm: bool = False

    @property
    def num_heads(self) -> int:
        return self.q.index.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.index.shape[0]


@dataclass
class MLPCoupling:
    """Hidden neurons of one MLP: ``inputs`` (gate and up, or the single
    ``fc_in``) rows, ``output`` (down / ``fc_out``) columns, all ``(F,)``.
    A hidden neuron is alive only if every input row and the output column
    are alive (gate/up are coupled by the elementwise product)."""

    inputs: list[NeuronRef]
    output: NeuronRef


@dataclass
class RowBlock:
    """A role-carrying block of rows inside a (possibly fused) layer."""

    role: str
    rows: torch.Tensor  # LongTensor of row indices in the logical out x in view


@dataclass
class SparseLayerInfo:
    """What the engine needs to know about one sparsified module."""

    name: str
    role: str  # q, k, v, o, gate, up, down, qkv, gate_up, fc_in, fc_out, linear
    block: int | None  # decoder block index, None for the generic fallback
    blocks: list[RowBlock] = field(default_factory=list)  # role blocks (fused layers)


@dataclass
class ModelTopology:
    """All sparsified layers of a model and their couplings."""

    model_type: str
    layers: dict[str, SparseLayerInfo]
    attention: list[AttentionCoupling]
    mlp: list[MLPCoupling]
    known_architecture: bool


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchitectureSpec:
    """How to find the roles of one architecture.

    ``block_pattern`` is a regex matching the module name of a decoder block
    (group 1 = block index); ``roles`` maps a module path relative to the
    block to its role. ``qkv_layout`` is ``"blocks"`` ([q | k | v] rows) or
    ``"interleaved"`` ([h0: q k v, h1: q k v, ...], GPT-NeoX). ``qk_norm_modules``:
    module paths relative to the block of norms applied to q or k; a block that
    has any of them gets ``AttentionCoupling.qk_norm``.
    """

    model_type: str
    block_pattern: str
    roles: dict[str, str]
    qkv_layout: str = "blocks"
    rope: bool = True
    qk_norm_modules: tuple[str, ...] = ()


_LLAMA_ROLES = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}

ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add (or replace) an architecture in the registry."""
    ARCHITECTURES[spec.model_type] = spec
    return spec


# q/k norms: qwen3 and gemma3 normalise each head, olmo2 all heads at once (docs/percolation.md)
for _mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2"):
    register_architecture(ArchitectureSpec(_mt, r"^(?:.*\.)?layers\.(\d+)$", _LLAMA_ROLES,
                                           qk_norm_modules=("self_attn.q_norm", "self_attn.k_norm")))
register_architecture(
    ArchitectureSpec(
        "phi3",
        r"^(?:.*\.)?layers\.(\d+)$",
        {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"},
    )
)
register_architecture(
    ArchitectureSpec(
        "gpt2",
        r"^(?:.*\.)?h\.(\d+)$",
        {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "fc_in", "mlp.c_proj": "fc_out"},
        rope=False,
    )
)
register_architecture(
    ArchitectureSpec(
        "gpt_neox",
        r"^(?:.*\.)?layers\.(\d+)$",
        {
            "attention.query_key_value": "qkv",
            "attention.dense": "o",
            "mlp.dense_h_to_4h": "fc_in",
            "mlp.dense_4h_to_h": "fc_out",
        },
        qkv_layout="interleaved",
    )
)

#: roles whose *rows* are neurons (their columns are the residual stream)
ROW_ROLES = {"q", "k", "v", "qkv", "gate", "up", "gate_up", "fc_in"}
#: roles whose *columns* are neurons (their rows are the residual stream)
COL_ROLES = {"o", "down", "fc_out"}


@dataclass(frozen=True)
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # 0 = no rotary embedding (absolute positions)


def head_geometry(config, spec: ArchitectureSpec | None) -> HeadGeometry:
    """Read head counts and the rotary dims from a transformers config."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if spec is None or not spec.rope:
        rotary = 0
    else:
        rotary = int(head_dim * _partial_rotary_factor(config))
        rotary -= rotary % 2
    return HeadGeometry(heads, kv_heads, head_dim, rotary)


def _partial_rotary_factor(config) -> float:
    """Fraction of each head's dims that RoPE rotates.

    transformers 5.x models read it from ``config.rope_parameters`` (a flat
    dict, or one dict per attention type, e.g. gemma3); 4.x configs kept it as
    ``partial_rotary_factor`` (phi3) or ``rotary_pct`` (gpt_neox).
    """
    rope_params = getattr(config, "rope_parameters", None)
    if isinstance(rope_params, dict):
        if "partial_rotary_factor" in rope_params:
            return float(rope_params["partial_rotary_factor"])
        nested = {
            float(params.get("partial_rotary_factor", 1.0))
            for params in rope_params.values()
            if isinstance(params, dict)
        }
        if len(nested) == 1:
            return nested.pop()
        if len(nested) > 1:
            logger.warning("per-layer partial rotary factors %s differ; treating all dims as rotary", sorted(nested))
            return 1.0
    for name in ("partial_rotary_factor", "rotary_pct"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 1.0


def rope_partner(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Dim each head dim is mixed with by rotate_half RoPE (i <-> i + rotary/2).

    Dims beyond ``rotary_dim`` are not rotated and pair with themselves.
    """
    partner = torch.arange(head_dim)
    half = rotary_dim // 2
    if half:
        partner[:half] = torch.arange(half, 2 * half)
        partner[half : 2 * half] = torch.arange(half)
    return partner


def qkv_row_blocks(geometry: HeadGeometry, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices ``(H, d)``, ``(H_kv, d)``, ``(H_kv, d)`` of q, k, v in a fused qkv layer."""
    heads, kv_heads, dim = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    if layout == "blocks":
        q = torch.arange(heads * dim).view(heads, dim)
        k = heads * dim + torch.arange(kv_heads * dim).view(kv_heads, dim)
        v = (heads + kv_heads) * dim + torch.arange(kv_heads * dim).view(kv_heads, dim)
        return q, k, v
    if layout == "interleaved":
        if heads != kv_heads:
            raise ValueError("interleaved qkv layout requires num_key_value_heads == num_attention_heads")
        base = (torch.arange(heads) * 3 * dim).view(heads, 1)
        offsets = torch.arange(dim).view(1, dim)
        return base + offsets, base + dim + offsets, base + 2 * dim + offsets
    raise ValueError(f"unknown qkv layout {layout!r}; expected 'blocks' or 'interleaved'")


def constant_output_rows(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Rows that output a non-zero constant when they have no input link, per module name.

    A row of a layer with a bias outputs its bias even without links, so it is not
    dead (docs/percolation.md): every row whose bias is trainable (it moves off 0 at
    the next step) or non-zero. Modules without a bias are left out. Sharded (FSDP2)
    biases are gathered.
    """
    rows: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        bias = getattr(module, "bias", None)
        if bias is None:
            continue
        full = bias.full_tensor() if is_dtensor(bias) else bias
        rows[name] = (full.detach() != 0) | bias.requires_grad
    return rows


def get_architecture(model_type: str | None) -> ArchitectureSpec | None:
    return ARCHITECTURES.get(model_type or "")


def _split_fused(role: str, out_features: int, geometry: HeadGeometry, spec: ArchitectureSpec) -> list[RowBlock]:
    if role == "qkv":
        q, k, v = qkv_row_blocks(geometry, spec.qkv_layout)
        return [RowBlock("q", q.flatten()), RowBlock("k", k.flatten()), RowBlock("v", v.flatten())]
    if role == "gate_up":
        half = out_features // 2
        return [RowBlock("gate", torch.arange(half)), RowBlock("up", torch.arange(half, 2 * half))]
    return [RowBlock(role, torch.arange(out_features))]


def build_topology(model: nn.Module, selected: dict[str, nn.Module]) -> ModelTopology:
    """Describe the selected (to-be-sparsified) modules of ``model``.

    ``selected`` maps module names to linear-like modules (``nn.Linear`` or
    transformers ``Conv1D``). Couplings are only emitted for blocks whose
    coupled layers are *all* selected; anything else is left uncoupled.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = get_architecture(model_type)
    layers: dict[str, SparseLayerInfo] = {}
    if spec is None:
        for name, module in selected.items():
            out_features, _ = logical_shape_of(module)
            layers[name] = SparseLayerInfo(name, "linear", None, [RowBlock("linear", torch.arange(out_features))])
        return ModelTopology(model_type or "unknown", layers, [], [], known_architecture=False)

    geometry = head_geometry(config, spec)
    block_re = re.compile(spec.block_pattern)
    by_block: dict[tuple[str, int], dict[str, str]] = {}
    for name, module in selected.items():
        role, block_prefix, block_idx = "linear", None, None
        for rel, candidate_role in spec.roles.items():
            if name.endswith("." + rel):
                prefix = name[: -len(rel) - 1]
                match = block_re.match(prefix)
                if match:
                    role, block_prefix, block_idx = candidate_role, prefix, int(match.group(1))
                    break
        out_features, _ = logical_shape_of(module)
        blocks = _split_fused(role, out_features, geometry, spec)
        layers[name] = SparseLayerInfo(name, role, block_idx, blocks)
        if block_prefix is not None:
            by_block.setdefault((block_prefix, block_idx), {})[role] = name

    attention: list[AttentionCoupling] = []
    mlp: list[MLPCoupling] = []
    heads, kv_heads, dim = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    partner = rope_partner(dim, geometry.rotary_dim)
    o_cols = torch.arange(heads * dim).view(heads, dim)
    module_names = {name for name, _ in model.named_modules()}
    for (block_prefix, _), roles in sorted(by_block.items(), key=lambda item: item[0][1]):
        qk_norm = any(f"{block_prefix}.{path}" in module_names for path in spec.qk_norm_modules)
        if "qkv" in roles and "o" in roles:
            q, k, v = qkv_row_blocks(geometry, spec.qkv_layout)
            fused = roles["qkv"]
            attention.append(
                AttentionCoupling(
                    NeuronRef(fused, "row", q),
                    NeuronRef(fused, "row", k),
                    NeuronRef(fused, "row", v),
                    NeuronRef(roles["o"], "col", o_cols),
                    partner,
                    qk_norm,
                )
            )
        elif all(r in roles for r in ("q", "k", "v", "o")):
            attention.append(
                AttentionCoupling(
                    NeuronRef(roles["q"], "row", torch.arange(heads * dim).view(heads, dim)),
                    NeuronRef(roles["k"], "row", torch.arange(kv_heads * dim).view(kv_heads, dim)),
                    NeuronRef(roles["v"], "row", torch.arange(kv_heads * dim).view(kv_heads, dim)),
                    NeuronRef(roles["o"], "col", o_cols),
                    partner,
                    qk_norm,
                )
            )
        if "gate_up" in roles and "down" in roles:
            gate_up = layers[roles["gate_up"]].blocks
            mlp.append(
                MLPCoupling(
                    [NeuronRef(roles["gate_up"], "row", gate_up[0].rows), NeuronRef(roles["gate_up"], "row", gate_up[1].rows)],
                    NeuronRef(roles["down"], "col", torch.arange(gate_up[0].rows.numel())),
                )
            )
        elif all(r in roles for r in ("gate", "up", "down")):
            ffn = logical_shape_of(selected[roles["gate"]])[0]
            mlp.append(
                MLPCoupling(
                    [NeuronRef(roles["gate"], "row", torch.arange(ffn)), NeuronRef(roles["up"], "row", torch.arange(ffn))],
                    NeuronRef(roles["down"], "col", torch.arange(ffn)),
                )
            )
        elif "fc_in" in roles and "fc_out" in roles:
            ffn = logical_shape_of(selected[roles["fc_in"]])[0]
            mlp.append(
                MLPCoupling([NeuronRef(roles["fc_in"], "row", torch.arange(ffn))], NeuronRef(roles["fc_out"], "col", torch.arange(ffn)))
            )
    return ModelTopology(model_type, layers, attention, mlp, known_architecture=True)
