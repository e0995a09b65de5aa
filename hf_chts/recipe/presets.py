"""Model presets (the LLaMA family of the recipes) and a recipe model's resolved architecture."""

from __future__ import annotations

from typing import Any

# --------------------------------------------------------------------------- model presets
# docs/algorithms.md §8 (the GaLore / CHTs LLaMA family; LLaMA vocabulary 32000, untied embeddings).
# "llama-tiny" is a CPU toy whose vocabulary comes from the tokenizer.
MODEL_PRESETS: dict[str, dict[str, int | None]] = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=None),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, vocab_size=32000),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32, vocab_size=32000),
}
# Counting convention (see recipes/README.md): every parameter of LlamaForCausalLM with
# untied input and output embeddings (the LLaMA default), i.e. embeddings included.
# llama-60m -> 58.1M, llama-130m -> 134.1M, llama-1b -> 1.339B (the paper's "1B" follows
# GaLore's naming of this 1.34B configuration; no common convention puts it within 10% of 1B).


def model_settings(model: Any) -> dict[str, Any]:
    """The preset's architecture with the recipe's explicit overrides applied.

    ``model`` is a recipe's ``ModelSection`` (any object with its fields).
    """
    settings = dict(MODEL_PRESETS[model.preset])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "num_key_value_heads", "max_position_embeddings"):
        value = getattr(model, key)
        if value is not None:
            settings[key] = value
    settings.setdefault("num_key_value_heads", None)
    if settings["num_key_value_heads"] is None:
        settings["num_key_value_heads"] = settings["num_attention_heads"]
    settings["tie_word_embeddings"] = bool(model.tie_word_embeddings)  # unset: false (the LLaMA default)
    return settings
