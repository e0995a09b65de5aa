"""The recipe's model: ``LlamaConfig``, parameter counts, the randomly initialised model, torch settings."""

from __future__ import annotations

import torch

from .presets import MODEL_PRESETS, model_settings
from .schema import ModelSection, Recipe


def model_config(recipe: Recipe, vocab_size: int | None = None, tokenizer=None):
    """A ``LlamaConfig`` for the recipe's model; vocab defaults to the tokenizer's size."""
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
    return LlamaConfig(**settings, **special)


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


def configure_torch(recipe: Recipe) -> None:
    """Per-process torch settings of the recipe (``run.torch_threads``)."""
    if recipe.run.torch_threads:
        torch.set_num_threads(recipe.run.torch_threads)


def build_model(recipe: Recipe, tokenizer):
    """A randomly initialised ``LlamaForCausalLM`` (seeded by ``run.seed``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.set_seed(recipe.run.seed)
    return AutoModelForCausalLM.from_config(model_config(recipe, tokenizer=tokenizer), trust_remote_code=False)
