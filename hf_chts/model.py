"""``sparsify()``: patch a model's linear layers into masked modules (``sparsity_report()``,
re-exported here, lives in :mod:`hf_chts.report`).

Layer selection follows PEFT's conventions: ``target_modules`` is a regex
(full match on the module name) when it is a string, or a list of exact
names / name suffixes; ``exclude_modules`` likewise. Without
``target_modules`` the architecture registry picks every linear of the
decoder blocks; embeddings and ``lm_head`` are never selected by default.
"""

from __future__ import annotations

import logging
import os
import re
import zlib

import torch
from torch import nn

from .architectures import COL_ROLES, ModelTopology, build_topology, get_architecture
from .checkpointing.saving import install_save_hook
from .config import SparsifyConfig
from .layers import convert_to_sparse, is_dtensor, is_linear_like, logical_shape_of, sparse_layers
from .report import LayerReport, SparsityReport, sparsity_report  # noqa: F401 - public names of this module too
from .state import (  # noqa: F401 - find_state, unwrap_model, is_sparsified: also importable from here
    SparseModelState, attach_state, find_state, is_sparsified, unwrap_model,
)

logger = logging.getLogger(__name__)

_BLOCK_CONTAINER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.\d+\.")


# ---------------------------------------------------------------- selection
def _matches(name: str, pattern: str | list[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _excluded_by_default(model: nn.Module) -> set[int]:
    """Ids of embedding / output-embedding modules (never sparsified by default)."""
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (NotImplementedError, AttributeError):
            module = None
        if module is not None:
            ids.add(id(module))
    return ids


def select_modules(model: nn.Module, config: SparsifyConfig) -> dict[str, nn.Module]:
    """Names -> modules that ``config`` selects for sparsification.

    Raises ``ValueError`` when a ``target_modules`` / ``exclude_modules`` entry
    matches nothing, naming the entry and a few available module names.
    """
    linears = {name: module for name, module in model.named_modules() if is_linear_like(module)}
    embeddings = _excluded_by_default(model)
    spec = get_architecture(getattr(getattr(model, "config", None), "model_type", None))

    def check_pattern(field_name: str, pattern: str | list[str]) -> None:
        entries = [pattern] if isinstance(pattern, str) else pattern
        for entry in entries:
            probe = entry if isinstance(pattern, str) else [entry]
            if not any(_matches(name, probe) for name in linears):
                sample = ", ".join(list(linears)[:6])
                raise ValueError(
                    f"SparsifyConfig.{field_name} entry {entry!r} matches no linear module of this "
                    f"{type(model).__name__}; available names look like: {sample} ..."
                )

    if config.target_modules is not None:
        check_pattern("target_modules", config.target_modules)
        selected = {n: m for n, m in linears.items() if _matches(n, config.target_modules)}
    elif spec is not None:
        roles = list(spec.roles)
        selected = {n: m for n, m in linears.items() if id(m) not in embeddings and _matches(n, roles)}
    else:
        selected = {
            n: m for n, m in linears.items() if id(m) not in embeddings and _BLOCK_CONTAINER.search(n) is not None
        }
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        logger.warning(
            "hf_chts: model_type %r is not in the architecture registry; sparsifying every linear of the decoder "
            "blocks (%d modules) with no percolation coupling. Register it with "
            "hf_chts.architectures.register_architecture for coupled percolation.",
            model_type,
            len(selected),
        )
    if config.exclude_modules is not None:
        check_pattern("exclude_modules", config.exclude_modules)
        selected = {n: m for n, m in selected.items() if not _matches(n, config.exclude_modules)}
    if not selected:
        raise ValueError(
            f"no linear layer of this {type(model).__name__} was selected for sparsification; "
            "set SparsifyConfig.target_modules to module names, suffixes or a regex"
        )
    check_untied(model, selected)
    return selected


def _sharing_keys(tensor: torch.Tensor) -> list[tuple]:
    """The same object, or a plain tensor with the same memory and shape (views of one flat buffer differ)."""
    keys = [("id", id(tensor))]
    if type(tensor) in (nn.Parameter, torch.Tensor) and tensor.device.type != "meta" and tensor.numel():
        keys.append(("memory", tensor.device.type, tensor.data_ptr(), tuple(tensor.shape)))
    return keys


def check_untied(model: nn.Module, selected: dict[str, nn.Module]) -> None:
    """Refuse selected modules whose weight is shared with another parameter (e.g. ``lm_head`` tied to the embedding).

    Masking a shared weight would silently zero the other module's weights too
    (with ``tie_word_embeddings``: most of the input embedding).
    """
    owners: dict[tuple, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        for key in _sharing_keys(parameter):
            owners.setdefault(key, set()).add(name)
    for name, module in selected.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        others = sorted({other for key in _sharing_keys(weight) for other in owners.get(key, ())} - {f"{name}.weight"})
        if others:
            tied = getattr(getattr(model, "config", None), "tie_word_embeddings", None)
            raise ValueError(
                f"SparsifyConfig.target_modules selects {name!r}, whose weight is shared with {', '.join(others)}"
                f"{' (tie_word_embeddings=True)' if tied else ''}: masking it would zero those weights too. Leave "
                f"{name!r} out of target_modules (or exclude_modules it), or untie the weights before sparsify()"
            )


def modules_named(model: nn.Module, names) -> dict[str, nn.Module]:
    """The linear modules of ``model`` with exactly these ``names`` (no pattern is run: names come from a
    checkpoint); ``ValueError`` naming the first name that is not a linear module of ``model``."""
    modules = dict(model.named_modules())
    selected = {}
    for name in sorted(names):
        module = modules.get(name)
        if module is None or not is_linear_like(module):
            kind = "no module" if module is None else f"a {type(module).__name__}, not a linear module"
            raise ValueError(f"{name!r} is {kind} of this {type(model).__name__}")
        selected[name] = module
    check_untied(model, selected)  # a checkpoint's mask on a tied weight would zero the embedding too
    return selected


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from the run seed and the layer name (order independent, same on every rank)."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return generator


# ----------------------------------------------------- already-sparse models
#: Fraction of exactly-zero weights in the layers to sparsify above which a model is taken for a sparse one
#: (trained or randomly initialised dense weights are almost never exactly 0).
ZERO_FRACTION_OF_A_SPARSE_MODEL = 0.2


def _checkpoint_config_beside(name_or_path: str) -> str | None:
    """``sparsify_config.json`` of the folder (or cached Hub repo) ``name_or_path`` was loaded from, if any;
    local lookups only (nothing is downloaded)."""
    file_name = SparsifyConfig.config_file_name
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, file_name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, file_name)
    except Exception:  # noqa: BLE001 - not a repo id: nothing to find
        return None
    return cached if isinstance(cached, str) else None


def sparse_origin(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """Why ``model`` looks like an hf_chts sparse checkpoint loaded without its masks (``None`` when it does
    not): a ``sparsify_config.json`` beside ``config._name_or_path``, or many exact zeros in ``modules``."""
    name_or_path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    found = _checkpoint_config_beside(name_or_path)
    if found is not None:
        return f"it was loaded from {name_or_path!r}, which holds {found}"
    zeros = total = 0
    for module in modules.values():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta" and not is_dtensor(weight):
            zeros += int(weight.numel() - torch.count_nonzero(weight.detach()))
            total += weight.numel()
    if total and zeros / total >= ZERO_FRACTION_OF_A_SPARSE_MODEL:
        return f"{zeros / total:.0%} of the weights of the layers to sparsify are exactly 0"
    return None


def warn_if_already_sparse(model: nn.Module, modules: dict[str, nn.Module], config: SparsifyConfig) -> None:
    """Warn, with the fix, when a fresh ``sparsify()`` would throw away the sparsity of a model that comes from
    an hf_chts checkpoint loaded with plain ``from_pretrained`` (its masks and schedule are not in it)."""
    origin = sparse_origin(model, modules)
    if origin is None:
        return
    source = str(getattr(model.config, "_name_or_path", "") or "<checkpoint folder>")
    logger.warning(
        "hf_chts: this model looks sparse already (%s), but it has no hf_chts masks: sparsify() builds a new "
        "topology (method %r starts at density %s) and the checkpoint's masks and schedule position are lost. "
        "To keep them, load it with hf_chts.load_sparse(%r) instead of from_pretrained; to continue its schedule, "
        "resume the Trainer from its checkpoint-N folder (trainer.train(resume_from_checkpoint=...)), or build "
        "SparseTrainingEngine on the load_sparse model and call engine.load_state_dict(hf_chts.read_engine_state("
        "path)). If a new sparse run from these weights is intended, ignore this warning.", origin, config.method, config.initial_density, source)


# ----------------------------------------------------------------- sparsify
def _capture_layer_inputs(model: nn.Module, modules: dict[str, nn.Module], batch) -> dict[str, torch.Tensor]:
    """Inputs ``[tokens, in_features]`` of each module on one calibration batch (for CSTI)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(_module, args, _name=name):
            captured[_name] = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def initial_masks(
    model: nn.Module, config: SparsifyConfig, topology: ModelTopology, modules: dict[str, nn.Module], calibration_batch=None
) -> dict[str, torch.Tensor]:
    """Initial topology of every selected layer (docs/algorithms.md §2), exact link counts per row block."""
    from .topology.budgets import allocate_links, count_links
    from .topology.init import build_mask

    masks: dict[str, torch.Tensor] = {}
    density = config.initial_density
    inputs = {}
    if config.init == "csti" and density < 1.0:
        if calibration_batch is None:
            raise ValueError(
                "SparsifyConfig.init='csti' needs a calibration batch: call sparsify(model, config, calibration_batch=...)"
            )
        inputs = _capture_layer_inputs(model, modules, calibration_batch)
    for name, module in modules.items():
        info = topology.layers[name]
        rows, cols = logical_shape_of(module)
        if density >= 1.0 or config.init == "dense":
            masks[name] = torch.ones(rows, cols, dtype=torch.bool)
            continue
        generator = layer_generator(config.seed, name)
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        budgets = allocate_links(count_links(density, rows * cols), [len(b.rows) * cols for b in info.blocks])
        for block, budget in zip(info.blocks, budgets):
            if budget == 0:  # a tiny block may get no link at all: its rows stay empty
                continue
            method = config.init
            calibration = None
            if method == "csti":
                if info.role in COL_ROLES or name not in inputs:
                    method = "bsw"  # CSTI only for layers reading the residual stream directly
                else:
                    calibration = inputs[name]
            block_mask = build_mask(
                method, len(block.rows), cols, budget / (len(block.rows) * cols), generator=generator,
                beta=config.init_beta, r=config.init_r, degree_mode=config.init_degree_mode,
                bsf_equal_partition=config.bsf_equal_partition, calibration_inputs=calibration,
                brf_centres=config.brf_centres,
            )
            mask[block.rows] = block_mask
        masks[name] = mask
    if config.init == "bsf" and config.bsf_resort and density < 1.0:
        _resort_mlp_chains(masks, topology)
    return masks


def _resort_mlp_chains(masks: dict[str, torch.Tensor], topology: ModelTopology) -> None:
    """Apply BSF neuron resorting to every MLP chain (gate/up or fc_in rows -> down/fc_out columns)."""
    from .topology.bsf import resort_by_degree

    for chain in topology.mlp:
        if not all(ref.layer in masks for ref in [*chain.inputs, chain.output]):
            continue
        in_degree = sum(masks[ref.layer][ref.index].sum(1) for ref in chain.inputs)
        consumer = masks[chain.output.layer]
        consumer[:, chain.output.index] = resort_by_degree(in_degree, consumer[:, chain.output.index])


def sparsify(model: nn.Module, config: SparsifyConfig | None = None, *, calibration_batch=None,
             masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Patch the targeted linear layers of ``model`` in place into masked modules.

    Args:
        model: a ``transformers.PreTrainedModel`` (or any ``nn.Module`` with linears).
        config: the :class:`SparsifyConfig` (default: CHTss to 30%).
        calibration_batch: model inputs (dict or tensor) for ``init='csti'``.
        masks: explicit masks by module name (used when loading a checkpoint):
            exactly these modules are sparsified (``target_modules`` is not
            evaluated) and the initial topology construction is skipped.

    Returns:
        The same ``model`` object; ``state_dict()`` keys are unchanged and the
        masks live in each layer's non-persistent ``mask`` buffer.
    """
    config = config if config is not None else SparsifyConfig()
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"sparsify() expects a SparsifyConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify() expects a torch.nn.Module, got {type(model).__name__}")
    if find_state(model) is not None:
        raise ValueError("this model is already sparsified (hf_chts_state is set); call sparsify() once per model")
    if config.is_dense:
        attach_state(model, SparseModelState(config, ModelTopology("dense", {}, [], [], True)))
        logger.info("hf_chts: method 'dense' keeps every layer dense; nothing patched")
        return model
    # explicit masks (a checkpoint) name their modules: the config's target_modules pattern is not run
    modules = select_modules(model, config) if masks is None else modules_named(model, masks)
    topology = build_topology(model, modules)
    if masks is None:
        warn_if_already_sparse(model, modules, config)
        masks = initial_masks(model, config, topology, modules, calibration_batch)
    for name, module in modules.items():
        layer = convert_to_sparse(module, name, masks[name])
        if config.reinit_weights and not bool(layer.mask.all()):
            from .weight_init import reinit_sparse_weight_

            # SWI relative to the model's own init: std_dense·sqrt(in_features / live fan-in) per row
            with torch.no_grad():
                weight = layer.logical_weight()
                dense_std = float(weight[layer.mask].float().std())
                gain = dense_std * weight.shape[1] ** 0.5
                reinit_sparse_weight_(weight, layer.mask, gain=max(gain, 1e-12),
                                      generator=layer_generator(config.seed, name + "/reinit"))
    attach_state(model, SparseModelState(config, topology))
    # masks are identical on every rank by construction (docs/distributed.md §1): DDP need not broadcast them
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + [f"{name}.mask" for name in modules]
    install_save_hook(model)  # save_pretrained / Trainer.save_model also write the masks
    return model
