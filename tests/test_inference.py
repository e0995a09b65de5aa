"""Sparse inference (docs/inference.md): to_sparse_inference on tiny models of every registered architecture."""

import copy

import pytest
import torch

import hf_chts
from hf_chts import SparsifyConfig, sparsify, sparsity_report
from hf_chts.architectures import ARCHITECTURES
from hf_chts.inference import (
    InferenceOnlyError, SparseInferenceLinear, inference_info, inference_report, to_sparse_inference,
)
from hf_chts.inference import autotune
from hf_chts.inference.autotune import KernelChoice, choose_by_timing
from hf_chts.inference.kernels import csr_from_mask, csr_matmul, csr_supported, make_csr
from hf_chts.layers import sparse_layers

from conftest import tiny_model

CONFTEST_TYPES = ("llama", "qwen2", "gpt2", "gpt_neox", "phi3")
PROMPTS = [[5, 17, 42, 9], [3, 3, 3, 3, 3, 3], [100, 1 + 1, 77, 64, 12, 0, 31, 8]]


def any_tiny_model(model_type: str):
    """Tiny model of a registered architecture (conftest's builders, else a generic decoder config)."""
    if model_type in CONFTEST_TYPES:
        return tiny_model(model_type)
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def sparse_tiny(model_type: str, density: float = 0.1):
    model = any_tiny_model(model_type)
    sparsify(model, SparsifyConfig(method="chts", target_density=density))
    with torch.no_grad():  # non-zero biases so a dropped bias shows in the logits
        for layer in sparse_layers(model).values():
            if layer.bias is not None:
                layer.bias.normal_()
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def greedy(model, prompt, new_tokens=8):
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)[0].tolist()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_csr_model_matches_masked_dense(model_type):
    reference = sparse_tiny(model_type)
    model = to_sparse_inference(copy.deepcopy(reference), kernel="csr")
    converted = [m for m in model.modules() if isinstance(m, SparseInferenceLinear)]
    assert len(converted) == len(sparse_layers(reference)) > 0
    assert all(m.kernel == "csr" for m in converted) and not sparse_layers(model)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    expected = logits(reference, ids)
    assert (logits(model, ids) - expected).abs().max() <= 1e-4
    for prompt in PROMPTS:
        assert greedy(model, prompt) == greedy(reference, prompt)


def test_every_registered_architecture_is_tested():
    assert set(ARCHITECTURES) >= set(CONFTEST_TYPES)  # the parametrisation above iterates the registry itself


@pytest.mark.parametrize("kernel", ["dense", "auto"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_dense_and_auto_kernels_match(model_type, kernel):
    reference = sparse_tiny(model_type)
    model = to_sparse_inference(copy.deepcopy(reference), kernel=kernel)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-4
    assert greedy(model, PROMPTS[0]) == greedy(reference, PROMPTS[0])
    for module in model.modules():
        if isinstance(module, SparseInferenceLinear):
            assert f"kernel={module.kernel}" in repr(module)
            assert ("auto" if kernel == "auto" else "requested") in repr(module)


def test_csr_stores_only_live_weights_and_frees_the_dense_weight():
    reference = sparse_tiny("gpt2")
    model = copy.deepcopy(reference)
    layers = sparse_layers(model)
    old_weights = {name: layer.weight for name, layer in layers.items()}
    live = {name: int(layer.mask.sum()) for name, layer in layers.items()}
    to_sparse_inference(model, kernel="csr")
    state = model.state_dict()
    for name, old in old_weights.items():
        assert old.numel() == 0  # storage released even though we still hold the parameter
        assert f"{name}.weight" not in state
        module = model.get_submodule(name)
        assert module.csr_values.numel() == live[name] and module.csr_values.dtype == torch.float32
        assert module.csr_col_indices.dtype == torch.int32 and module.csr_crow_indices.dtype == torch.int32
        assert module.weight_bytes() == live[name] * 8 + (module.out_features + 1) * 4
    report = inference_report(model)
    assert report["weight_bytes"] == sum(row["weight_bytes"] for row in report["layers"])
    assert set(report["kernels_by_role"]) == {"c_attn", "c_proj", "c_fc"}
    assert report["weight_ratio"] < 0.25  # 10 % density, fp32 values + int32 indices
    info = inference_info(model)
    assert info.density == pytest.approx(sum(live.values()) / sum(
        m.mask.numel() for m in sparse_layers(reference).values()))
    expected = sparsity_report(reference)
    assert info.anp == pytest.approx(expected.anp) and info.live_links == expected.live_links
    assert info.summary()["method"] == "chts" and info.summary()["csr_layers"] == len(live)


def test_csr_from_mask_matches_torch_csr():
    generator = torch.Generator().manual_seed(3)
    mask = torch.rand(37, 29, generator=generator) < 0.2
    mask[4] = False  # an empty row
    mask[:, 0] = True
    weight = torch.randn(37, 29, generator=generator) * mask
    crow, col, values = csr_from_mask(mask, weight[mask], rows_per_chunk=5)
    reference = weight.to_sparse_csr()
    assert crow.dtype == col.dtype == torch.int32
    assert torch.equal(crow.long(), reference.crow_indices()) and torch.equal(col.long(), reference.col_indices())
    assert torch.equal(values, reference.values())
    csr = make_csr(crow, col, values, (37, 29))
    for tokens in (0, 1, 6):
        x = torch.randn(tokens, 29, generator=generator)
        assert torch.allclose(csr_matmul(csr, x), x @ weight.t(), atol=1e-5)
    with pytest.raises(ValueError, match="live entries"):
        csr_from_mask(mask, values[:-1])
    empty = csr_from_mask(torch.zeros(3, 4, dtype=torch.bool), torch.zeros(0))
    assert empty[0].tolist() == [0, 0, 0, 0] and empty[1].numel() == 0


def test_auto_picks_csr_only_when_faster_at_every_token_count(monkeypatch):
    timings = {1: {"dense": 1.0, "csr": 0.5}, 128: {"dense": 1.0, "csr": 0.98}}

    def fake_time_forward(modules, x, **kwargs):  # three rounds; one noisy round must not decide
        dense, csr = timings[x.shape[0]]["dense"], timings[x.shape[0]]["csr"]
        return {"dense": [dense, dense, 0.4 * dense], "csr": [csr, csr, 9 * csr]}

    monkeypatch.setattr(autotune, "time_forward", fake_time_forward)
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    weight = torch.randn(6, 4) * mask
    dense = SparseInferenceLinear.from_dense_weight(weight, None, transposed=False, density=0.5,
                                                    choice=KernelChoice("dense", "auto"))
    csr = SparseInferenceLinear.from_live_values(mask, weight[mask], None, choice=KernelChoice("csr", "auto"))
    args = dict(in_features=4, dtype=torch.float32, device=torch.device("cpu"))
    choice = choose_by_timing(dense, csr, tokens=(1, 128), **args)
    assert choice.kernel == "dense" and choice.csr_over_dense == {1: 0.5, 128: 0.98}  # 2 % faster is not enough
    timings[128]["csr"] = 0.9
    assert choose_by_timing(dense, csr, tokens=(1, 128), **args).kernel == "csr"
    assert choose_by_timing(dense, csr, tokens=(1,), **args).kernel == "csr"  # one lucky dense round ignored
    timings[1]["csr"] = 1.2
    assert choose_by_timing(dense, csr, tokens=(1, 128), **args).kernel == "dense"
    assert "1 tok 1.20" in choose_by_timing(dense, csr, tokens=(1, 128), **args).describe()


def test_auto_uses_the_measurement_per_layer(monkeypatch):
    calls = []

    def fake_choice(dense, csr, in_features, **kwargs):
        calls.append(in_features)
        return KernelChoice("csr" if in_features == 64 else "dense", "auto", {1: 0.5})

    import hf_chts.inference.convert as convert

    monkeypatch.setattr(convert, "choose_by_timing", fake_choice)
    model = to_sparse_inference(sparse_tiny("llama"), kernel="auto")
    kinds = {name: module.kernel for name, module in model.named_modules() if isinstance(module, SparseInferenceLinear)}
    assert kinds["model.layers.0.mlp.down_proj"] == "dense" and kinds["model.layers.0.self_attn.q_proj"] == "csr"
    assert sorted(set(calls)) == [64, 96] and len(calls) <= 4  # one measurement per (shape, density) kind


def test_half_precision_without_csr_kernel():
    model = sparse_tiny("llama").to(torch.bfloat16)
    if csr_supported("cpu", torch.bfloat16):
        pytest.skip("this torch has a bfloat16 CSR kernel on CPU")
    with pytest.raises(ValueError, match="model.float"):
        to_sparse_inference(copy.deepcopy(model), kernel="csr")
    converted = to_sparse_inference(model, kernel="auto")
    module = converted.model.layers[0].self_attn.q_proj
    assert module.kernel == "dense" and "no CSR kernel for torch.bfloat16" in repr(module)


def test_inference_model_refuses_training():
    model = to_sparse_inference(sparse_tiny("llama"), kernel="csr")
    ids = torch.randint(0, 128, (1, 5))
    model(input_ids=ids)  # plain forward with grad mode on works (parameters are frozen)
    model.eval()
    with pytest.raises(InferenceOnlyError, match="inference-only"):
        model.train()
    model.eval()
    model.requires_grad_(True)
    with pytest.raises(InferenceOnlyError, match="gradients"):
        model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(InferenceOnlyError, match="save_sparse"):
        model.save_pretrained("/nonexistent/never-written")


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernel must be one of"):
        to_sparse_inference(sparse_tiny("llama"), kernel="bsr")
    with pytest.raises(ValueError, match="auto_tokens"):
        to_sparse_inference(sparse_tiny("llama"), auto_tokens=(0,))
    with pytest.raises(ValueError, match="no sparsified layer"):
        to_sparse_inference(tiny_model("llama"))
    model = to_sparse_inference(sparse_tiny("llama"), kernel="csr")
    with pytest.raises(ValueError, match="already converted"):
        to_sparse_inference(model)
    assert hf_chts.to_sparse_inference is to_sparse_inference


def test_dtype_move_keeps_indices_and_results():
    reference = sparse_tiny("gpt_neox")
    model = to_sparse_inference(copy.deepcopy(reference), kernel="csr")
    ids = torch.randint(0, 128, (1, 7))
    expected = logits(reference, ids)
    logits(model, ids)  # builds the cached CSR view
    model.to(torch.float64)
    module = model.gpt_neox.layers[0].attention.query_key_value
    assert module.csr_values.dtype == torch.float64 and module.csr_col_indices.dtype == torch.int32
    assert (logits(model, ids).float() - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_half_precision_cast_after_csr_conversion_still_runs(cast, caplog, monkeypatch):
    """Issue 18 item 10: ``.to(torch.bfloat16)`` / ``.half()`` after a float32 CSR conversion (docs/inference.md,
    "dtypes and devices"): where torch has no CSR kernel for that dtype the layers compute in float32, once warned."""
    reference = sparse_tiny("llama")
    model = to_sparse_inference(copy.deepcopy(reference), kernel="csr")
    ids = torch.tensor([PROMPTS[2]])
    logits(model, ids)  # the float32 CSR view is cached before the cast
    dtype = torch.bfloat16 if cast == "bfloat16" else torch.float16
    model = model.to(dtype) if cast == "bfloat16" else model.half()
    module = model.model.layers[0].self_attn.q_proj
    assert module.csr_values.dtype == dtype and module.kernel == "csr"
    monkeypatch.setattr("hf_chts.inference.linear._WARNED_UPCAST", set(), raising=False)
    with caplog.at_level("WARNING", logger="hf_chts.inference.linear"):
        cast_logits = logits(model, ids)
        logits(model, torch.tensor([PROMPTS[0][:1]]))  # one token: the matrix-vector path
    assert cast_logits.dtype == dtype
    expected = logits(copy.deepcopy(reference).to(dtype), ids)  # the masked dense model in the same dtype
    assert (cast_logits.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()
    if not csr_supported("cpu", dtype):
        assert sum("no CSR kernel" in record.getMessage() for record in caplog.records) == 1


def test_lm_eval_hflm_scores_like_the_masked_model():
    pytest.importorskip("lm_eval")
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=384, max_position_embeddings=256)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    sparsify(reference, SparsifyConfig(method="chts", target_density=0.1))
    model = to_sparse_inference(copy.deepcopy(reference), kernel="csr")
    tokenizer = transformers.ByT5Tokenizer()
    requests = [Instance("loglikelihood", {}, ("The cat sat on", " the mat"), 0),
                Instance("loglikelihood", {}, ("Sparse models", " are cheap"), 1)]
    scores = [HFLM(pretrained=m, tokenizer=tokenizer, batch_size=2, device="cpu").loglikelihood(requests)
              for m in (reference, model)]
    for (expected, _), (got, _) in zip(*scores):
        assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kernel", ["dense", "csr"])
def test_masked_positions_count_as_zero_even_if_nan(kernel):
    reference = sparse_tiny("gpt2")
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            layer.weight[~layer.storage_mask()] = float("nan")
    to_sparse_inference(model, kernel=kernel)
    ids = torch.randint(0, 128, (2, 6))
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-4


def test_replicas_are_independent_copies_with_the_same_output():
    model = to_sparse_inference(sparse_tiny("gpt2"), kernel="dense")
    for kernel in ("dense", "csr"):
        layer = model.transformer.h[0].attn.c_attn
        if kernel == "csr":
            layer = to_sparse_inference(sparse_tiny("gpt2"), kernel="csr").transformer.h[0].attn.c_attn
        copy_ = layer.replica()
        storage = "csr_values" if kernel == "csr" else "weight"
        assert getattr(copy_, storage).data_ptr() != getattr(layer, storage).data_ptr()
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            assert torch.equal(copy_(x), layer(x))
    assert autotune.replica_count(64 * 2**20) == 2 and autotune.replica_count(1) == autotune.MAX_REPLICAS
    assert autotune.replica_count(8 * 2**20) == 8


@pytest.mark.parametrize("transposed", [False, True])
def test_densified_twin_of_a_csr_layer(transposed):
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(4)) < 0.4
    weight = torch.randn(7, 5) * mask
    csr = SparseInferenceLinear.from_live_values(mask, weight[mask], torch.randn(7), choice=KernelChoice("csr", "x"))
    dense = csr.densified(KernelChoice("dense", "y"), transposed=transposed)
    assert dense.kernel == "dense" and dense.transposed == transposed
    assert torch.equal(dense.weight, weight.t() if transposed else weight)
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        assert torch.allclose(dense(x), csr(x), atol=1e-6)
