"""Shared fixtures: tiny models built from configs, fully offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random causal LM of the given architecture (no download)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, bos_token_id=0, eos_token_id=1)
    if model_type == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common)
    elif model_type == "qwen2":
        config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common)
    elif model_type == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=64, **common)
    elif model_type == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, rotary_pct=0.25, **common)
    elif model_type == "phi3":
        config = transformers.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                                         pad_token_id=0, **common)
    else:
        raise ValueError(model_type)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


@pytest.fixture
def make_tiny_model():
    return tiny_model


def reseal_checkpoint(folder):
    """Make a hand-edited checkpoint folder self-consistent again, as a careful hostile tool would: the save id of
    sparsify_config.json goes into the safetensors metadata of the hf_chts files and the manifest is recomputed.
    Tests use it to reach the checks behind the save-id/manifest check."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    record = json.loads((folder / "sparsify_config.json").read_text())
    if "manifest" not in record:  # a format-1 folder: nothing binds its files together
        return
    from hf_chts.checkpointing.manifest import build_manifest

    for name in ("sparsity.safetensors", "sparse_weights.safetensors"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception:  # noqa: BLE001 - garbage stays garbage
            continue
        save_file(tensors, str(path), metadata={**metadata, "save_id": record["save_id"]})
    record["manifest"] = build_manifest(folder, sorted(record["manifest"]))
    (folder / "sparsify_config.json").write_text(json.dumps(record))


@pytest.fixture
def reseal():
    return reseal_checkpoint
