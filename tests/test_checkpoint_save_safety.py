"""What a save refuses and what it never deletes: inference-only models, the working directory, the user's
files in the checkpoint folder and an edited model card; pseudo-files and devices in place of checkpoint files
(docs/checkpoint-format.md#74-what-a-save-replaces-what-it-keeps)."""

import copy
import json
import os

import pytest
import torch

from hf_chts import SparsifyConfig, sparsify
from hf_chts.checkpoint import (
    CONFIG_FILE, export_checkpoint, inspect_checkpoint, load_sparse, save_sparse, write_sparsity_files,
)
from hf_chts.inference import to_sparse_inference
from hf_chts.io_utils import read_json_object


def sparse_model(make_tiny_model, seed=0):
    return sparsify(make_tiny_model("llama", seed=seed), SparsifyConfig(method="chts", target_density=0.3, seed=seed))


def logits(model):
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


# ----------------------------------------------------------------- item 3: inference-only models
def test_saving_an_inference_model_is_refused_and_keeps_the_checkpoint(make_tiny_model, tmp_path):
    """Mutant: no refusal in write_checkpoint -> a checkpoint with csr_* keys and no masks replaces the good one."""
    model = sparse_model(make_tiny_model)
    save_sparse(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()}
    expected = logits(model)
    converted = to_sparse_inference(copy.deepcopy(model), kernel="csr")
    for save in (lambda: save_sparse(converted, tmp_path / "ckpt"),
                 lambda: save_sparse(converted, tmp_path / "ckpt", compact=True),
                 lambda: write_sparsity_files(converted, tmp_path / "ckpt")):
        with pytest.raises(ValueError, match=r"converted by to_sparse_inference\(\).*no checkpoint") as error:
            save()
        assert "\n" not in str(error.value)
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.is_file()}
    assert after == before
    assert torch.equal(logits(load_sparse(tmp_path / "ckpt")), expected)
    loaded = load_sparse(tmp_path / "ckpt", inference=True, kernel="csr")
    with pytest.raises(ValueError, match="converted by to_sparse_inference"):
        save_sparse(loaded, tmp_path / "other")
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------- item 6: the working directory
@pytest.mark.parametrize("relative", [".", ".."])
def test_saving_into_the_working_directory_or_an_ancestor_is_refused(make_tiny_model, tmp_path, monkeypatch, relative):
    """Mutant: no check in staged_commit -> the swap deletes the working directory, and the next relative write
    fails with a bare ENOENT."""
    model = sparse_model(make_tiny_model)
    save_sparse(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt" / ("sub" if relative == ".." else "."))
    with pytest.raises(ValueError, match="cannot save a checkpoint into .*current directory") as error:
        save_sparse(model, relative)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="current directory"):
        model.save_pretrained(relative)
    with open("still-here.txt", "w", encoding="utf-8") as handle:  # the working directory was not swapped away
        handle.write("ok")
    assert os.path.samefile(os.getcwd(), tmp_path / "ckpt" / ("sub" if relative == ".." else "."))
    save_sparse(model, "saved-below")  # a subfolder is fine
    assert torch.equal(logits(load_sparse("saved-below")), logits(model))


# ----------------------------------------------------------------- item 11: files a save did not write
USER_FILES = {"model.fp16.safetensors": b"half", "model-backup.safetensors": b"backup", "pytorch_model_old.bin": b"old",
              "notes.txt": b"mine"}


def test_a_save_keeps_the_users_weight_like_files(make_tiny_model, tmp_path, caplog):
    """Mutant: weight-like names owned by every save (the old is_weight_file) -> the next save deletes them."""
    model = sparse_model(make_tiny_model)
    folder = tmp_path / "ckpt"
    save_sparse(model, folder)
    for name, data in USER_FILES.items():
        (folder / name).write_bytes(data)
    with caplog.at_level("WARNING", logger="hf_chts.checkpoint"):
        save_sparse(model, folder)
    for name, data in USER_FILES.items():
        assert (folder / name).read_bytes() == data, name
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in warning for name in ("model.fp16.safetensors", "model-backup.safetensors",
                                            "pytorch_model_old.bin"))
    assert torch.equal(logits(load_sparse(folder)), logits(model))  # kept files do not make the folder refused
    assert inspect_checkpoint(folder)["density"] == pytest.approx(0.3, abs=0.02)
    export_checkpoint(folder, tmp_path / "exported")
    assert not (tmp_path / "exported" / "model-backup.safetensors").exists()


def test_an_edited_model_card_is_set_aside_with_a_warning(make_tiny_model, tmp_path, caplog):
    """Mutant: no set-aside copy (write_model_card replaces a card hf_chts wrote whatever its hash) -> the user's
    edit is lost silently."""
    model = sparse_model(make_tiny_model)
    folder = tmp_path / "ckpt"
    save_sparse(model, folder)
    edits = []
    for number, save in enumerate((lambda: save_sparse(model, folder), lambda: write_sparsity_files(model, folder)), 1):
        edits.append((folder / "README.md").read_text(encoding="utf-8") + f"\nMy evaluation notes {number}.\n")
        (folder / "README.md").write_text(edits[-1], encoding="utf-8")
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_chts.checkpoint"):
            save()
        aside = "README.edited.md" if number == 1 else "README.edited-2.md"
        assert any("README.md was edited" in r.getMessage() and aside in r.getMessage() for r in caplog.records)
        assert "My evaluation notes" not in (folder / "README.md").read_text(encoding="utf-8")  # a fresh card
    assert (folder / "README.edited.md").read_text(encoding="utf-8") == edits[0]  # kept by the later save too
    assert (folder / "README.edited-2.md").read_text(encoding="utf-8") == edits[1]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_chts.checkpoint"):
        load_sparse(folder)  # the copies are outside the manifest, the new card inside: nothing to report
    assert not any("README" in r.getMessage() for r in caplog.records)
    save_sparse(model, folder)
    assert {"README.edited.md", "README.edited-2.md"} <= {p.name for p in folder.iterdir()}


# ----------------------------------------------------------------- item 7: pseudo-files and devices
def test_pseudo_files_and_devices_are_refused_without_reading(make_tiny_model, tmp_path):
    """Mutant: no /proc, /sys check in require_regular_file -> /proc/self/status (size 0, regular) is read."""
    model = sparse_model(make_tiny_model)
    folder = tmp_path / "ckpt"
    save_sparse(model, folder)
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).symlink_to("/proc/self/status")
    for reader in (load_sparse, inspect_checkpoint):
        with pytest.raises(ValueError, match=rf"{CONFIG_FILE}: the {CONFIG_FILE} is /proc/\d+/status, a file of the "
                                             "kernel's proc filesystem"):
            reader(folder)
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="is a character device"):
        load_sparse(folder)
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        with pytest.raises(ValueError, match="sys filesystem"):
            read_json_object("/sys/kernel/mm/transparent_hugepage/enabled")


def test_a_reader_reads_at_most_the_reported_size_plus_one(tmp_path, monkeypatch):
    """A file whose size is under-reported (as /proc files report 0) returns at once: the read stops at size + 1."""
    file = tmp_path / "grows.json"
    file.write_text(json.dumps({"a": "x" * 1000}))
    real_fstat = os.fstat

    class ZeroSize:
        def __init__(self, result):
            self._result = result

        def __getattr__(self, name):
            return 0 if name == "st_size" else getattr(self._result, name)

    monkeypatch.setattr(os, "fstat", lambda fd: ZeroSize(real_fstat(fd)))
    with pytest.raises(ValueError, match="holds more than the 0 bytes its size says"):
        read_json_object(file)
