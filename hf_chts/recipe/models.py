"""The recipe's model: its transformers config (a LLaMA preset, or ``model.name_or_path`` of any family
hf_chts registers), parameter counts, the randomly initialised model, torch settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..architectures import ARCHITECTURES, get_architecture
from ..io_utils import looks_like_local_path
from ..suggest import did_you_mean
from .presets import MODEL_PRESETS, model_settings
from .schema import ModelSection, Recipe

#: the model fields a recipe may set explicitly; with name_or_path each must be a setting of the config
EXPLICIT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def pretrained_config(model: ModelSection, where: str = "recipe"):
    """The transformers config of ``model.name_or_path`` (a local folder with a ``config.json``, or a Hub model
    id: offline, only the local cache) with the explicit fields and ``config_overrides`` applied.

    Raises ``FileNotFoundError`` (no such folder, no ``config.json``, not on the Hub) or ``ValueError`` (a family
    hf_chts does not register, not a causal LM, a setting the config does not have), naming the field.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = str(model.name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{where}: model.name_or_path = {name!r} is a folder without a config.json; "
                                    "give a folder holding a transformers model config (config.json)")
    elif local.exists():
        raise FileNotFoundError(f"{where}: model.name_or_path = {name!r} is a file; give the folder holding the "
                                "config.json (or a Hub model id)")
    elif looks_like_local_path(name):
        raise FileNotFoundError(f"{where}: model.name_or_path = {name!r}: no such folder (relative paths resolve "
                                f"against the working directory {Path.cwd()}; a Hub model is named 'org/name')")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.is_dir() else name, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers raises OSError / ValueError / HTTP errors
        raise FileNotFoundError(f"{where}: model.name_or_path = {name!r}: no model config could be loaded "
                                f"({type(error).__name__}: {error}); a Hub model needs network access or the local "
                                "cache (HF_HUB_OFFLINE=1 reads only the cache)") from error
    model_type = getattr(config, "model_type", None)
    if get_architecture(model_type) is None:
        raise ValueError(f"{where}: model.name_or_path = {name!r} is a {model_type!r} model, a family hf_chts does not "
                         f"register; use one of {', '.join(sorted(ARCHITECTURES))} (or register it with "
                         "hf_chts.architectures.register_architecture and train from Python)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{where}: model.name_or_path = {name!r}: {model_type!r} has no causal language model class")
    explicit = {key: getattr(model, key) for key in EXPLICIT_FIELDS if getattr(model, key) is not None}
    apply_config_settings(config, explicit, "model", where)
    apply_config_settings(config, model.config_overrides or {}, "model.config_overrides", where)
    return config


def check_model_source(recipe: Recipe) -> None:
    """Before anything loads: ``model.name_or_path``'s config is found and accepts the overrides, and the
    architecture builds (on the meta device: no memory); a preset's ``config_overrides`` name real settings."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    where = recipe.source or "recipe"
    if recipe.model.name_or_path:
        config = pretrained_config(recipe.model, where)
        check_positions(config, recipe, where)
    else:
        settings = model_settings(recipe.model)
        settings["vocab_size"] = settings["vocab_size"] or 256  # the tokenizer's size is not known yet
        config = LlamaConfig(**settings)
        apply_config_settings(config, recipe.model.config_overrides or {}, "model.config_overrides", where)
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - any architecture error of transformers
        raise ValueError(f"{where}: section 'model': the {config.model_type} model cannot be built with these "
                         f"settings ({type(error).__name__}: {error}); fix the model fields or "
                         "model.config_overrides") from error


def apply_config_settings(config, values: dict[str, Any], label: str, where: str = "recipe") -> None:
    """Set ``values`` on a transformers ``config``; a name the config does not have (its own fields and their
    aliases, e.g. gpt2's ``n_embd`` = ``hidden_size``) is a ``ValueError`` naming ``label.<name>``."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in values.items():
        if key not in known and not hasattr(config, key):
            raise ValueError(f"{where}: {label}.{key}: the {config.model_type} config has no setting {key!r}"
                             f"{did_you_mean(key, sorted(known))}; set one of its own fields in "
                             "model.config_overrides")
        setattr(config, key, value)


def model_config(recipe: Recipe, vocab_size: int | None = None, tokenizer=None):
    """The transformers config of the recipe's model: a ``LlamaConfig`` from the preset, or the config of
    ``model.name_or_path``, with the overrides applied; a preset's vocabulary defaults to the tokenizer's size."""
    if recipe.model.name_or_path:
        return _named_model_config(recipe, tokenizer)
    from transformers import LlamaConfig

    settings = model_settings(recipe.model)
    tokenizer_size = len(tokenizer) if tokenizer is not None else None
    if settings["vocab_size"] is None:
        settings["vocab_size"] = vocab_size or tokenizer_size
    if settings["vocab_size"] is None:
        raise ValueError("model.vocab_size is unset and no tokenizer was given to take it from")
    if tokenizer_size is not None and settings["vocab_size"] < tokenizer_size:
        raise ValueError(f"model.vocab_size = {settings['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer_size} tokens; raise it or leave it unset (= the tokenizer's)")
    if settings.get("max_position_embeddings") is None:
        settings["max_position_embeddings"] = recipe.data.block_size
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**settings, **special)
    apply_config_settings(config, recipe.model.config_overrides or {}, "model.config_overrides",
                          recipe.source or "recipe")
    return config


def _named_model_config(recipe: Recipe, tokenizer):
    where = recipe.source or "recipe"
    config = pretrained_config(recipe.model, where)
    if tokenizer is not None:
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and vocab < len(tokenizer):
            raise ValueError(f"{where}: model.vocab_size = {vocab} (from {recipe.model.name_or_path!r}) is smaller "
                             f"than the tokenizer's {len(tokenizer)} tokens; set model.vocab_size: {len(tokenizer)}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, key, getattr(tokenizer, key))
    check_positions(config, recipe, where)
    return config


def check_positions(config, recipe: Recipe, where: str = "recipe") -> None:
    """A ``name_or_path`` model must take ``data.block_size`` tokens (its ``max_position_embeddings``)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < recipe.data.block_size:
        raise ValueError(f"{where}: model.max_position_embeddings = {positions} (from {recipe.model.name_or_path!r}) "
                         f"is below data.block_size = {recipe.data.block_size}; raise it or lower data.block_size")


def parameter_count(preset: str, vocab_size: int | None = None, **overrides) -> dict[str, int]:
    """Parameters of a preset, computed from the architecture (no model is built).

    Returns ``total`` (every parameter, untied input/output embeddings unless
    ``tie_word_embeddings``), ``embedding`` (input + output embedding matrices),
    ``non_embedding`` and ``sparsifiable`` (the decoder linears CHTs sparsifies).
    """
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(MODEL_PRESETS)}")
    s = model_settings(ModelSection(preset=preset, vocab_size=vocab_size, **overrides))
    vocab = s["vocab_size"]
    if vocab is None:
        raise ValueError(f"preset {preset!r} takes its vocabulary from the tokenizer: pass vocab_size")
    h, f, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    head_dim = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    attention = h * h * 2 + h * kv * 2  # q, o + k, v (no biases)
    mlp = 3 * h * f  # gate, up, down
    norms = 2 * h
    sparsifiable = layers * (attention + mlp)
    embedding = vocab * h * (1 if s["tie_word_embeddings"] else 2)
    non_embedding = sparsifiable + layers * norms + h  # + final norm
    return {"total": non_embedding + embedding, "embedding": embedding, "non_embedding": non_embedding,
            "sparsifiable": sparsifiable}


def process_state():
    """accelerate's ``PartialState`` of this process. Without CUDA it is asked for CPU processes: under
    ``accelerate launch`` on CPUs a bare ``PartialState()`` reports a single process on every rank, so each
    rank would act as the main one (claim the run folder, write files); with ``cpu=True`` each rank gets its
    index and a gloo process group."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def configure_torch(recipe: Recipe) -> None:
    """Per-process torch settings of the recipe (``run.torch_threads``)."""
    if recipe.run.torch_threads:
        torch.set_num_threads(recipe.run.torch_threads)


def build_model(recipe: Recipe, tokenizer):
    """The recipe's model, randomly initialised (seeded by ``run.seed``): pretraining from scratch."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.set_seed(recipe.run.seed)
    return AutoModelForCausalLM.from_config(model_config(recipe, tokenizer=tokenizer), trust_remote_code=False)
