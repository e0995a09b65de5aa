"""The model card every sparse save writes (docs/hub.md#2-the-model-card)."""

from __future__ import annotations

import json
import logging
import os
from argparse import Namespace

import pytest
from huggingface_hub import ModelCard
from trainer_utils import make_trainer

import hf_chts
from hf_chts import SparsifyConfig, sparsify, sparsity_report
from hf_chts.checkpoint import export_command, read_sparsify_config
from hf_chts.model_card import build_model_card, card_owner, write_model_card
from hf_chts.version import REPOSITORY_URL

USER_README = "# My model\n\nWritten by hand.\n"


def sparse_llama(make_tiny_model, **config):
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(**{"method": "chts", "target_density": 0.1, "init": "er", **config}))
    return model


def card_of(folder):
    card = ModelCard.load(folder / "README.md")
    return card.data.to_dict(), card.text


def table_value(text, row):
    line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
    return line.split("|")[2].strip()


def test_save_sparse_writes_a_card_with_metadata_and_facts(tmp_path, make_tiny_model):
    model = sparse_llama(make_tiny_model)
    report = sparsity_report(model)
    assert report.anp < 1.0  # low-density ER leaves inactive neurons: the ANP row is informative
    folder = hf_chts.save_sparse(model, tmp_path / "ckpt")
    meta, text = card_of(folder)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"hf_chts", "sparse", "dynamic-sparse-training", "chts", "llama"} <= set(meta["tags"])
    assert meta["hf_chts"]["generated_card"] is True
    assert meta["hf_chts"]["density"] == pytest.approx(report.density)
    assert meta["hf_chts"]["anp"] == pytest.approx(report.anp)
    assert table_value(text, "target density") == "0.1000"
    assert table_value(text, "final density (measured)") == f"{report.density:.4f}"
    assert table_value(text, "ANP (active-neuron post-percolation rate)") == f"{report.anp:.4f}"
    assert table_value(text, "live / total links").startswith(f"{report.live_links:,} / {report.total_links:,}")
    assert "`chts` (init `er`" in table_value(text, "method")
    # a bare folder name would be looked up on the Hub: the snippets show a path to fill in (issue 19 item 9)
    assert "AutoModelForCausalLM.from_pretrained(\"path/to/ckpt\")" in text
    assert "hf_chts.load_sparse(\"path/to/ckpt\")" in text and 'load_sparse("ckpt")' not in text
    for name in os.listdir(folder):  # every file of the checkpoint is listed
        assert f"- `{name}`:" in text
    # the wheel ships no docs/: the format specification is linked in the repository
    assert f"({REPOSITORY_URL}/blob/main/docs/checkpoint-format.md)" in text and "of the hf_chts package" not in text


def test_compact_card_says_only_hf_chts_loads_it(tmp_path, make_tiny_model):
    folder = hf_chts.save_sparse(sparse_llama(make_tiny_model), tmp_path / "c", compact=True)
    meta, text = card_of(folder)
    assert meta["library_name"] == "hf_chts"
    assert "AutoModelForCausalLM" not in text and "hf_chts.load_sparse" in text
    assert "- `sparse_weights.safetensors`:" in text


def test_a_users_readme_is_kept_unless_overwrite_card(tmp_path, make_tiny_model, caplog):
    model = sparse_llama(make_tiny_model)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "README.md").write_text(USER_README)
    with caplog.at_level(logging.WARNING, logger="hf_chts.checkpoint"):
        hf_chts.save_sparse(model, folder)
    assert (folder / "README.md").read_text() == USER_README
    assert "overwrite_card=True" in caplog.text and (folder / "sparsity.safetensors").exists()
    model.save_pretrained(folder)  # the save hook keeps it too
    assert (folder / "README.md").read_text() == USER_README
    hf_chts.save_sparse(model, folder, overwrite_card=True)
    assert card_owner(folder / "README.md") == "hf_chts"


def test_own_card_and_trainer_draft_are_replaced(tmp_path, make_tiny_model):
    model = sparse_llama(make_tiny_model)
    folder = hf_chts.save_sparse(model, tmp_path / "ckpt")
    stale = (folder / "README.md").read_text().replace("final density (measured) | 0.", "final density (measured) | 9.")
    (folder / "README.md").write_text(stale)
    hf_chts.save_sparse(model, folder)
    assert "| final density (measured) | 9." not in (folder / "README.md").read_text()
    draft = ("---\nlibrary_name: transformers\n---\n# x\n<!-- This model card has been generated automatically "
             "according to the information the Trainer had access to. You\nshould probably proofread -->\n")
    (folder / "README.md").write_text(draft)
    assert card_owner(folder / "README.md") == "trainer"
    hf_chts.save_sparse(model, folder)
    assert card_owner(folder / "README.md") == "hf_chts"


def test_card_owner_of_unusual_files(tmp_path):
    assert card_owner(tmp_path / "README.md") is None
    (tmp_path / "README.md").write_text("---\nhf_chts: [broken\n---\ntext")
    assert card_owner(tmp_path / "README.md") == "user"
    (tmp_path / "README.md").write_text("---\nhf_chts:\n  generated_card: false\n---\ntext")
    assert card_owner(tmp_path / "README.md") == "user"


def test_evaluation_results_table_and_model_index(tmp_path, make_tiny_model):
    folder = hf_chts.save_sparse(sparse_llama(make_tiny_model), tmp_path / "ckpt")
    assert "No evaluation results" in card_of(folder)[1]
    write_model_card(folder, record=read_sparsify_config(folder),
                     eval_results={"arc_easy": {"acc": 0.25, "acc_norm": 0.5}}, repo_id="me/sparse")
    meta, text = card_of(folder)
    assert "| arc_easy | acc | 0.2500 |" in text and "| arc_easy | acc_norm | 0.5000 |" in text
    results = meta["model-index"][0]["results"]
    values = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert values == {("arc_easy", "acc"): 0.25, ("arc_easy", "acc_norm"): 0.5}
    assert 'load_sparse("me/sparse")' in text and 'SparsifyConfig.from_pretrained("me/sparse")' in text


def test_the_repository_url_is_the_one_pyproject_names():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["urls"]["Repository"] == REPOSITORY_URL


def test_trainer_save_model_writes_the_card_with_steps(tmp_path, make_tiny_model):
    model = make_tiny_model("llama")
    config = SparsifyConfig(method="chtss", target_density=0.3, update_interval=4)
    trainer, _ = make_trainer(model, tmp_path / "run", config, max_steps=8)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    meta, text = card_of(tmp_path / "run")
    assert meta["hf_chts"]["method"] == "chtss"
    assert table_value(text, "steps trained") == "8 of 8"
    assert "trained by dynamic sparse training" in text
    record = json.loads((tmp_path / "run" / "sparsify_config.json").read_text())
    assert table_value(text, "ANP (active-neuron post-percolation rate)") == f"{sparsity_report(model).anp:.4f}"
    assert f"{record['engine']['schedule']['updates_done']} of {record['engine']['schedule']['updates_total']} done" \
        in table_value(text, "topology updates")


def test_export_writes_a_card_for_the_new_format(tmp_path, make_tiny_model, capsys):
    source = hf_chts.save_sparse(sparse_llama(make_tiny_model), tmp_path / "src")
    export_command(Namespace(checkpoint=str(source), output=str(tmp_path / "out"), format="compact"))
    meta, text = card_of(tmp_path / "out")
    assert meta["library_name"] == "hf_chts" and 'load_sparse("path/to/out")' in text


def test_write_sparsity_files_writes_the_card_too(tmp_path, make_tiny_model):
    from hf_chts.checkpointing.saving import write_sparsity_files

    model = sparse_llama(make_tiny_model)
    type(model).save_pretrained(model, str(tmp_path))  # the class's save (as the FSDP final save does)
    assert not (tmp_path / "README.md").exists()
    write_sparsity_files(model, tmp_path)
    assert card_owner(tmp_path / "README.md") == "hf_chts"


def test_build_model_card_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="has no sparsify_config.json"):
        build_model_card(tmp_path, record=None)



def test_card_built_before_the_record_is_written(tmp_path, make_tiny_model):
    """A save may write the card before sparsify_config.json (e.g. to list it in a manifest): it passes the record."""
    folder = hf_chts.save_sparse(sparse_llama(make_tiny_model), tmp_path / "ckpt")
    record = json.loads((folder / "sparsify_config.json").read_text())
    (folder / "sparsify_config.json").unlink()
    text = str(build_model_card(folder, record=record))
    assert "- `sparsify_config.json`:" in text and f"| target density | {record['config']['target_density']:.4f} |" in text
