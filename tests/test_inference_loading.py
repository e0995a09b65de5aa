"""load_sparse(path, inference=True): inference models straight from dense-format and compact checkpoints."""

import copy
import json

import pytest
import torch

from hf_chts import load_sparse, save_sparse
from hf_chts.inference import SparseInferenceLinear, inference_info, to_sparse_inference
from hf_chts.checkpointing.manifest import build_manifest
from hf_chts.inference import loading
from hf_chts.layers import sparse_layers

from test_inference import PROMPTS, greedy, logits, sparse_tiny


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tmp_path_factory):
    """A sparse tiny model (biases non-zero) saved in both formats."""
    root = tmp_path_factory.mktemp(f"inference_{request.param}")
    model = sparse_tiny(request.param)
    save_sparse(model, root / "dense")
    save_sparse(model, root / "compact", compact=True)
    return {"model": model, "root": root, "type": request.param}


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_inference_model_from_checkpoint_matches_masked_model(saved, layout):
    reference = load_sparse(saved["root"] / layout)
    model = load_sparse(saved["root"] / layout, inference=True, kernel="csr")
    assert not sparse_layers(model) and all(p.device.type == "cpu" for p in model.parameters())
    converted = [m for m in model.modules() if isinstance(m, SparseInferenceLinear)]
    assert len(converted) == len(sparse_layers(reference)) and all(m.kernel == "csr" for m in converted)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-4
    assert (logits(model, ids) - logits(saved["model"], ids)).abs().max() <= 1e-4
    for prompt in PROMPTS[:2]:
        assert greedy(model, prompt) == greedy(reference, prompt)
    info = inference_info(model)
    in_memory = inference_info(to_sparse_inference(copy.deepcopy(reference), kernel="csr"))
    assert (info.live_links, info.total_links, info.anp, info.method) == (
        in_memory.live_links, in_memory.total_links, in_memory.anp, in_memory.method)


def test_dense_format_is_read_a_block_of_rows_at_a_time(saved, monkeypatch):
    import safetensors

    sparse_keys = {f"{name}.weight": layer.weight.shape for name, layer in sparse_layers(saved["model"]).items()}
    full_reads, slice_reads = [], []
    real_open = safetensors.safe_open

    class RecordingSlice:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            block = self.inner[index]
            slice_reads.append((self.key, block.numel()))
            return block

    class RecordingHandle:
        def __init__(self, path, *args, **kwargs):
            self.inner, self.weights_file = real_open(path, *args, **kwargs), path.endswith("model.safetensors")

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):  # metadata(), keys(), ...
            return getattr(self.inner, name)

        def get_tensor(self, key):
            if self.weights_file:  # (sparsity.safetensors stores the masks under the same keys)
                full_reads.append(key)
            return self.inner.get_tensor(key)

        def get_slice(self, key):
            return RecordingSlice(self.inner.get_slice(key), key)

    monkeypatch.setattr(safetensors, "safe_open", RecordingHandle)
    monkeypatch.setattr(loading, "READ_BLOCK_BYTES", 4 * 64 * 8)  # 8 rows of 64 inputs
    model = load_sparse(saved["root"] / "dense", inference=True, kernel="csr")
    assert not set(full_reads) & set(sparse_keys)  # no sparsified weight was read whole
    assert {key for key, _ in slice_reads} == set(sparse_keys)
    assert max(numel for _, numel in slice_reads) <= 8 * 64 * 3  # at most one block (fused qkv: 3x64 inputs per row)
    ids = torch.randint(0, 128, (1, 6))
    assert (logits(model, ids) - logits(saved["model"], ids)).abs().max() <= 1e-4


def test_auto_and_dtype_options(saved):
    folder = saved["root"] / "compact"
    model = load_sparse(folder, inference=True, kernel="auto", auto_tokens=(1,), dtype=torch.float64)
    modules = [m for m in model.modules() if isinstance(m, SparseInferenceLinear)]
    assert all("auto" in repr(m) for m in modules)
    assert all((m.csr_values if m.kernel == "csr" else m.weight).dtype == torch.float64 for m in modules)
    ids = torch.randint(0, 128, (1, 6))
    assert (logits(model, ids).float() - logits(saved["model"], ids)).abs().max() <= 1e-4
    half = load_sparse(folder, inference=True, kernel="auto", dtype="bfloat16")
    reference = load_sparse(folder, dtype=torch.bfloat16)
    assert torch.equal(logits(half, ids), logits(reference, ids))  # bfloat16 on CPU: every layer kept dense


def test_inference_loading_errors(saved, tmp_path):
    folder = saved["root"] / "dense"
    with pytest.raises(ValueError, match="device_map"):
        load_sparse(folder, inference=True, device_map="cpu")
    with pytest.raises(ValueError, match="kernel must be one of"):
        load_sparse(folder, inference=True, kernel="fast")
    binary = tmp_path / "bin"
    binary.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (binary / item.name).write_bytes(item.read_bytes())
    torch.save({}, binary / "pytorch_model.bin")
    record = json.loads((binary / "sparsify_config.json").read_text())  # a consistent save of a .bin folder
    names = sorted(set(record["manifest"]) - {"model.safetensors"} | {"pytorch_model.bin"})
    record["manifest"] = build_manifest(binary, names)
    (binary / "sparsify_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="safetensors only"):
        load_sparse(binary, inference=True)


def test_bench_inference_reports_both_models(saved, monkeypatch, capsys):
    from hf_chts.cli import main as cli_main
    from hf_chts.inference import bench_command

    loads = []
    monkeypatch.setattr(bench_command, "load_peak_bytes",
                        lambda folder, inference, kernel="auto": loads.append((inference, kernel)) or 1000 + inference)
    result = bench_command.run_bench_inference(saved["root"] / "compact", kernel="csr", prompt_tokens=8, new_tokens=2,
                                               decode_batches=(1, 2), rounds=1)
    sparse, dense = result["models"]["sparse"], result["models"]["dense"]
    assert sorted(loads) == [(False, "auto"), (True, "csr")]
    assert set(sparse["decode_tokens_per_s"]) == {"1", "2"} and sparse["prefill_tokens_per_s"] > 0
    live = sum(int(layer.mask.sum()) for layer in sparse_layers(saved["model"]).values())
    assert sparse["sparsified_weight_bytes"] < dense["sparsified_weight_bytes"]
    assert sparse["sparsified_weight_bytes"] >= live * 8  # fp32 values + int32 column indices (+ row pointers)
    assert result["max_logit_difference"] <= 1e-4 and result["density"] == pytest.approx(0.1, abs=0.01)
    assert all(counts["csr"] > 0 and counts["dense"] == 0 for counts in result["kernels_by_role"].values())
    assert cli_main(["bench-inference", str(saved["root"] / "compact"), "--kernel", "csr", "--rounds", "1",
                     "--prompt-tokens", "8", "--new-tokens", "2", "--decode-batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "decode tok/s (batch 1)" in text and "dense twin" in text and "largest |logit difference|" in text
    assert cli_main(["bench-inference", str(saved["root"] / "compact"), "--decode-batches", "0"]) == 2


@pytest.mark.parametrize("flags,named", [
    (["--prompt-tokens", "100000"], "--prompt-tokens 100000 exceeds the model's context"),
    (["--prompt-tokens", "8", "--new-tokens", "200"], "--new-tokens 200 after the 16-token decode prompt"),
])
def test_bench_inference_checks_the_lengths_against_the_models_positions(tmp_path, capsys, flags, named):
    """Issue 18 item 10: a 128-position model and a prompt or a decode run longer than that: one line, exit 2."""
    import transformers

    from hf_chts import SparsifyConfig, sparsify
    from hf_chts.cli import main as cli_main

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        n_embd=32, n_head=4, n_layer=1, n_positions=128, vocab_size=64, bos_token_id=0, eos_token_id=1))
    sparsify(model, SparsifyConfig(method="chts", target_density=0.5))
    save_sparse(model, tmp_path / "gpt2-128")
    code = cli_main(["bench-inference", str(tmp_path / "gpt2-128"), "--rounds", "1", "--decode-batches", "1", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err, err
    assert named in err and "max_position_embeddings = 128" in err, err
