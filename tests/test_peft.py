"""LoRA fine-tuning on a sparse model and merge_lora keeping the sparsity pattern."""

import copy

import pytest
import torch

import hf_chts
from hf_chts import SparsifyConfig, sparsify, sparsity_report
from hf_chts.checkpoint import load_sparse, save_sparse
from hf_chts.layers import sparse_layers
from hf_chts.state import find_state

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def lora_trained(make_tiny_model, model_type, steps=3):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(model_type)
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[model_type],
                      fan_in_fan_out=model_type == "gpt2")
    peft_model = get_peft_model(model, lora)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merge_lora_keeps_masks_and_zeros(make_tiny_model, model_type, tmp_path):
    peft_model = lora_trained(make_tiny_model, model_type)
    masks = {name: layer.mask.clone() for name, layer in sparse_layers(peft_model).items()}
    density = sparsity_report(peft_model).density
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped, "peft wrapped no sparse layer"

    plain = copy.deepcopy(peft_model).merge_and_unload()  # what merging without re-masking gives
    plain_layers = sparse_layers(plain)
    leaked = [name for name, layer in plain_layers.items() if bool(layer.logical_weight()[~layer.mask].any())]
    assert leaked, "the LoRA delta did not touch masked positions: the test could not fail"

    merged = hf_chts.merge_lora(peft_model)
    assert find_state(merged) is not None and not hasattr(merged, "peft_config")
    layers = sparse_layers(merged)
    assert set(layers) == set(masks)
    for name, layer in layers.items():
        assert torch.equal(layer.mask, masks[name]), name
        weight = layer.logical_weight().detach()
        assert not bool(weight[~layer.mask].any()), name
        # live links carry the merged LoRA update, exactly as the plain merge computes it
        assert torch.equal(weight[layer.mask], plain_layers[name].logical_weight().detach()[layer.mask]), name
    assert sparsity_report(merged).density == pytest.approx(density)
    assert any(not torch.equal(layers[n].weight, plain_layers[n].weight) for n in leaked)

    save_sparse(merged, tmp_path)
    reloaded = load_sparse(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_merge_lora_rejects_non_peft_and_dense(make_tiny_model):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="peft model"):
        hf_chts.merge_lora(model)
    from peft import LoraConfig, get_peft_model

    dense_peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not sparsified"):
        hf_chts.merge_lora(dense_peft)


@pytest.mark.parametrize("save", ["save_pretrained", "save_sparse"])
def test_plain_merge_and_unload_is_reported_and_its_save_warns(make_tiny_model, tmp_path, caplog, save):
    import logging

    peft_model = lora_trained(make_tiny_model, "llama")
    mask_density = sparsity_report(peft_model).density
    merged = copy.deepcopy(peft_model).merge_and_unload()  # peft's own merge: the LoRA delta fills masked positions
    leaked = sorted(name for name, layer in sparse_layers(merged).items() if layer.masked_nonzero())
    assert leaked
    report = sparsity_report(merged)  # the real state, not the masks' 0.3
    assert report.mask_density == pytest.approx(mask_density) and report.masked_nonzero > 0
    assert report.density > mask_density + 0.3
    assert report.to_dict()["masked_nonzero"] == report.masked_nonzero
    assert "not 0 at masked positions" in report.table() and "hf_chts.merge_lora" in report.table()

    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        merged.save_pretrained(tmp_path / "plain") if save == "save_pretrained" else save_sparse(merged, tmp_path / "plain")
    (warning,) = [r.getMessage() for r in caplog.records if "masked positions" in r.getMessage()]
    assert "hf_chts.merge_lora" in warning and f"in {len(leaked)} sparsified layer(s)" in warning
    assert all(name in warning for name in leaked[:5])
    assert sparsity_report(merged).masked_nonzero == 0  # the save re-masked it

    caplog.clear()
    kept = hf_chts.merge_lora(peft_model)  # the fix the warning names: no warning, same densities
    assert sparsity_report(kept).density == pytest.approx(mask_density)
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        save_sparse(kept, tmp_path / "kept")
    assert not [r for r in caplog.records if "masked positions" in r.getMessage()]


def test_adapter_files_in_a_sparse_checkpoint_folder_are_named_with_the_fix(make_tiny_model, tmp_path, capsys):
    """Issue 18 item 8: a LoRA adapter saved into the sparse checkpoint's folder (transformers would load it into the
    model): load_sparse and the CLI name the adapter files and the fix; the fix reproduces the adapted model."""
    import shutil

    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_chts.cli import main as cli_main

    folder = tmp_path / "sparse"
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    save_sparse(model, folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: it changes the outputs
    peft_model.eval().save_pretrained(folder)
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()

    for inference in (False, True):
        with pytest.raises(ValueError, match="adapter_config.json, adapter_model.safetensors") as refused:
            load_sparse(str(folder), inference=inference)
        assert "PeftModel.from_pretrained(hf_chts.load_sparse(folder), adapter_folder)" in str(refused.value)
    assert cli_main(["export", str(folder), str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and "internal error" not in err and "sparsity.safetensors" not in err
    # the advice works: the adapter in its own folder, applied after load_sparse
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.move(folder / name, adapter / name)
    adapted = PeftModel.from_pretrained(load_sparse(str(folder)), str(adapter)).eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
