"""Hub pushes carry the masks, the config and the model card (docs/hub.md#3-pushes-carry-the-sparsity-files),
tested against a local stand-in for the Hub API (tests/hub_stub.py; no network)."""

from __future__ import annotations

import torch
from huggingface_hub import ModelCard
from hub_stub import fake_hub  # noqa: F401  (fixture)
from trainer_utils import make_trainer

import hf_chts
from hf_chts import SparsifyConfig, sparsify
from hf_chts.checkpointing.format import read_masks
from hf_chts.cli import main as cli_main
from hf_chts.model_card import card_owner

SPARSE_FILES = {"sparsity.safetensors", "sparsify_config.json", "README.md"}


def sparse_llama(make_tiny_model):
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.2))
    return model


def download(fake_hub, repo_id, folder):
    folder.mkdir(parents=True)
    for name, data in fake_hub.repos[repo_id].items():
        (folder / name).write_bytes(data)
    return folder


def test_save_sparse_push_uploads_masks_config_and_card(tmp_path, make_tiny_model, fake_hub):
    model = sparse_llama(make_tiny_model)
    hf_chts.save_sparse(model, tmp_path / "ckpt", push_to_hub=True, repo_id="me/tiny-sparse")
    assert SPARSE_FILES | {"config.json", "model.safetensors"} <= fake_hub.files("me/tiny-sparse")
    assert not any(name.startswith(".") for name in fake_hub.files("me/tiny-sparse"))
    card = ModelCard(fake_hub.text("me/tiny-sparse", "README.md"))
    assert card.data.hf_chts["generated_card"] and 'load_sparse("me/tiny-sparse")' in card.text
    reloaded = hf_chts.load_sparse(download(fake_hub, "me/tiny-sparse", tmp_path / "dl"))
    assert hf_chts.sparsity_report(reloaded).live_links == hf_chts.sparsity_report(model).live_links


def test_export_push_to_hub(tmp_path, make_tiny_model, fake_hub, capsys):
    model = sparse_llama(make_tiny_model)
    source = hf_chts.save_sparse(model, tmp_path / "src")
    code = cli_main(["export", str(source), str(tmp_path / "out"), "--format", "compact", "--push-to-hub", "me/exp"])
    assert code == 0
    assert SPARSE_FILES | {"sparse_weights.safetensors", "config.json"} <= fake_hub.files("me/exp")
    card = ModelCard(fake_hub.text("me/exp", "README.md"))
    assert card.data.library_name == "hf_chts" and 'load_sparse("me/exp")' in card.text
    reloaded = hf_chts.load_sparse(download(fake_hub, "me/exp", tmp_path / "dl"))
    for name, mask in read_masks(source).items():
        assert torch.equal(read_masks(tmp_path / "dl")[name], mask)
    assert reloaded is not None and "pushed" in capsys.readouterr().out


def test_trainer_push_to_hub_carries_the_sparsity_files(tmp_path, make_tiny_model, fake_hub):
    model = make_tiny_model("llama")
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=2)
    out = tmp_path / "run"
    trainer, _ = make_trainer(model, out, config, max_steps=8, save_strategy="steps", save_steps=4,
                              push_to_hub=True, hub_model_id="me/run", hub_always_push=True)
    trainer.train()
    trainer._finish_current_push()
    pushes = [c for c in fake_hub.commits if c["message"].startswith("Training in progress")]
    assert [c["message"] for c in pushes] == ["Training in progress, step 4", "Training in progress, step 8"]
    for commit in pushes:  # each push: the weights with the masks, config and card of the same checkpoint
        step = commit["message"].rsplit(" ", 1)[1]
        checkpoint = out / f"checkpoint-{step}"
        assert SPARSE_FILES | {"model.safetensors"} <= set(commit["files"])
        for name in ("model.safetensors", "sparsity.safetensors", "sparsify_config.json"):
            assert commit["data"][name] == (checkpoint / name).read_bytes(), (step, name)
        card = ModelCard(commit["data"]["README.md"].decode())
        assert card.data.hf_chts["generated_card"] and f"| steps trained | {step} of 8 |" in card.text

    trainer.push_to_hub()  # end of training: Trainer.create_model_card runs, the hf_chts card is kept
    final = fake_hub.commits[-1]
    assert final["message"] == "End of training" and SPARSE_FILES <= set(final["files"])
    card = ModelCard(final["data"]["README.md"].decode())
    assert card_owner(out / "README.md") == "hf_chts"
    assert card.data.hf_chts["generated_card"] and "## Training details (from transformers.Trainer)" in card.text
    assert "| steps trained | 8 of 8 |" in card.text
