"""Sparse checkpoints: round trips (dense and compact), validation, atomic saves, Trainer, Hub, CLI."""

import copy
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import hf_chts
from hf_chts import SparsifyConfig, sparsify, sparsity_report
from hf_chts.checkpoint import (
    CONFIG_FILE, SPARSE_WEIGHTS_FILE, SPARSITY_FILE, load_sparse, pack_mask, read_engine_state, read_masks, save_sparse,
    unpack_mask, write_sparsity_files,
)
from hf_chts.cli import main as cli_main
from hf_chts.layers import sparse_layers
from hf_chts.state import find_state

DENSITY = 0.3


def random_tokens(batch=2, length=16, vocab=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def train_masked(model, steps=3, lr=1e-2, seed=0):
    """A few Adam steps on random tokens, re-masking after each step (masking invariant)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        ids = random_tokens(seed=seed + step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer in sparse_layers(model).values():
            layer.apply_mask_()
    model.eval()
    return model


_TRAINED = {}


def sparse_trained(make_tiny_model, model_type, seed=0):
    """A tiny model at 30 % density after a few masked Adam steps (built once per type, copied per test)."""
    if (model_type, seed) not in _TRAINED:
        model = make_tiny_model(model_type, seed=seed)
        sparsify(model, SparsifyConfig(method="chts", target_density=DENSITY, seed=seed))
        _TRAINED[model_type, seed] = train_masked(model)
    return copy.deepcopy(_TRAINED[model_type, seed])


def logits(model, ids=None):
    ids = random_tokens(seed=99) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def masks_of(model):
    return {name: layer.mask.clone() for name, layer in sparse_layers(model).items()}


def assert_same_masks(a, b):
    masks_a, masks_b = masks_of(a), masks_of(b)
    assert masks_a.keys() == masks_b.keys() and masks_a
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), name


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_round_trip_dense_compact_and_vanilla(make_tiny_model, model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = sparse_trained(make_tiny_model, model_type)
    reference = logits(model)
    save_sparse(model, tmp_path / "dense")
    save_sparse(model, tmp_path / "compact", compact=True)
    assert {SPARSITY_FILE, CONFIG_FILE, "model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "dense"))
    assert not (tmp_path / "dense" / SPARSE_WEIGHTS_FILE).exists()

    for folder in ("dense", "compact"):
        loaded = load_sparse(tmp_path / folder).eval()
        assert find_state(loaded).config.to_dict() == find_state(model).config.to_dict()
        assert_same_masks(model, loaded)
        assert torch.equal(logits(loaded), reference), folder
        for layer in sparse_layers(loaded).values():  # exactly zero at masked positions
            assert not bool(layer.logical_weight()[~layer.mask].any())

    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not hasattr(vanilla, "hf_chts_state")
    assert torch.equal(logits(vanilla), reference)

    # compact: live values only, a fraction of the dense bytes of the sparsified weights
    dense_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in sparse_layers(model).values())
    compact_bytes = (tmp_path / "compact" / SPARSE_WEIGHTS_FILE).stat().st_size
    assert compact_bytes <= 0.4 * dense_bytes, (compact_bytes, dense_bytes)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "compact" / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    assert not stored & {f"{name}.weight" for name in sparse_layers(model)}
    assert (tmp_path / "compact" / "model.safetensors").stat().st_size < (tmp_path / "dense" / "model.safetensors").stat().st_size

    # vanilla transformers refuses the compact folder (no random weights), pointing to load_sparse
    with pytest.raises(ValueError, match=r"hf_chts compact sparse checkpoint.*hf_chts\.load_sparse\(folder\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert config["model_type"] == model.config.model_type  # the rest of config.json is transformers' own
    inference = load_sparse(tmp_path / "compact", inference=True).eval()  # the inference loader reads it too
    assert torch.allclose(logits(inference), reference, atol=1e-5)
    assert not hasattr(inference.config, "transformers_weights")


def test_mask_file_format(make_tiny_model, tmp_path):
    model = sparse_trained(make_tiny_model, "gpt2")
    save_sparse(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / SPARSITY_FILE), "pt") as handle:
        metadata = handle.metadata()
        key = "transformer.h.0.attn.c_attn.weight"  # Conv1D stored in x out; mask is logical out x in
        packed = handle.get_tensor(key)
    shapes = json.loads(metadata["shapes"])
    assert metadata["hf_chts_format_version"] == "2"
    assert shapes[key] == [192, 64] and packed.dtype == torch.uint8 and list(packed.shape) == [192, 8]
    layer = sparse_layers(model)["transformer.h.0.attn.c_attn"]
    assert torch.equal(unpack_mask(packed, shapes[key]), layer.mask)
    odd = torch.rand(5, 13) > 0.5  # last dim not a multiple of 8
    assert torch.equal(unpack_mask(pack_mask(odd), [5, 13]), odd)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert record["format_version"] == 2 and record["config"]["target_density"] == DENSITY
    assert record["engine"] is None and record["weights_format"] == "dense"


@pytest.mark.parametrize("compact", [False, True])
def test_planted_zero_live_link_survives(make_tiny_model, tmp_path, compact):
    model = sparse_trained(make_tiny_model, "llama")
    layer = sparse_layers(model)["model.layers.0.mlp.up_proj"]
    row, col = map(int, layer.mask.nonzero()[0])
    with torch.no_grad():
        layer.weight[row, col] = 0.0
    assert bool(layer.mask[row, col])
    save_sparse(model, tmp_path, compact=compact)
    loaded = load_sparse(tmp_path)
    loaded_layer = sparse_layers(loaded)["model.layers.0.mlp.up_proj"]
    assert bool(loaded_layer.mask[row, col]) and float(loaded_layer.weight[row, col]) == 0.0
    assert torch.equal(loaded_layer.mask, layer.mask)


def test_engine_progress_resumes_exactly(make_tiny_model, tmp_path):
    from hf_chts.engine import SparseTrainingEngine

    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=DENSITY, update_interval=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = SparseTrainingEngine(model, total_steps=12, optimizer=optimizer)
    for step in range(4):  # two topology updates
        ids = random_tokens(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.step()
    assert len(engine.history) == 2 and all(stats.layer_density for stats in engine.history)
    state_dict_calls = []
    engine_state_dict = engine.state_dict
    engine.state_dict = lambda **kwargs: state_dict_calls.append(kwargs) or engine_state_dict(**kwargs)
    save_sparse(model, tmp_path)
    del engine.state_dict
    assert state_dict_calls == [{"include_masks": False}]  # no mask copies: they go to sparsity.safetensors
    assert "layer_density" not in (tmp_path / CONFIG_FILE).read_text()
    record = json.loads((tmp_path / CONFIG_FILE).read_text())["engine"]
    assert record["completed_steps"] == 4 and record["total_steps"] == 12
    assert record["target_density"] == pytest.approx(DENSITY) and record["schedule"]["updates_done"] == 2

    state = read_engine_state(tmp_path)
    expected = engine.state_dict()
    assert state.keys() == expected.keys()
    assert torch.equal(state["generator_state"], expected["generator_state"])
    # the saved history is each update's stats without the per-layer densities
    without_layers = [{k: v for k, v in stats.items() if k != "layer_density"} for stats in expected["history"]]
    assert state["history"] == json.loads(json.dumps(without_layers))
    assert all(torch.equal(state["masks"][name], expected["masks"][name]) for name in expected["masks"])

    loaded = load_sparse(tmp_path)
    resumed = SparseTrainingEngine(loaded, total_steps=12)
    resumed.load_state_dict(state)
    assert resumed.completed_steps == 4
    assert [asdict(s) for s in resumed.history] == [{**s, "layer_density": {}} for s in without_layers]
    engine.completed_steps = resumed.completed_steps = 6  # same weights, RNG, step: the next update must agree
    engine.update_topology()
    resumed.update_topology()
    assert_same_masks(model, loaded)

    write_sparsity_files(model, tmp_path)  # what the Trainer callback does on each checkpoint
    refreshed = read_engine_state(tmp_path)
    assert refreshed["completed_steps"] == 6 and len(refreshed["history"]) == 3
    assert all(torch.equal(refreshed["masks"][n], m) for n, m in engine.masks().items())


def test_only_the_main_process_writes(make_tiny_model, tmp_path, monkeypatch):
    import hf_chts.checkpointing.saving as checkpoint

    model = sparse_trained(make_tiny_model, "llama")
    monkeypatch.setattr(checkpoint, "is_main_process", lambda: False)
    assert save_sparse(model, tmp_path / "a") is None
    assert write_sparsity_files(model, tmp_path) is None
    model.save_pretrained(tmp_path / "b")  # the hook defers to transformers on other ranks
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / SPARSITY_FILE).exists()


# ---------------------------------------------------------------- validation
def _saved(make_tiny_model, tmp_path, model_type="llama", compact=False):
    model = sparse_trained(make_tiny_model, model_type)
    folder = tmp_path / f"{model_type}-{'compact' if compact else 'dense'}"
    save_sparse(model, folder, compact=compact)
    return model, folder


@pytest.mark.parametrize("filename", [SPARSITY_FILE, SPARSE_WEIGHTS_FILE])
def test_garbage_and_truncated_files_raise(make_tiny_model, tmp_path, filename, reseal):
    """Each damage is caught by the manifest, and, with a manifest rewritten to match, by the file's own checks."""
    _, folder = _saved(make_tiny_model, tmp_path, compact=True)
    target = folder / filename
    original = target.read_bytes()
    backup = shutil.copytree(folder, tmp_path / "backup")
    corrupted = bytearray(original)  # header intact, payload bytes flipped: caught by the crc32
    corrupted[-3] ^= 0xFF
    for damaged, message in [(b"\x13garbage" * 64, filename), (original[: len(original) // 2], filename),
                             (bytes(corrupted), f"{filename}.*(crc32|corrupted)")]:
        target.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"mixes files.*{filename}"):
            load_sparse(folder)
        reseal(folder)
        with pytest.raises(ValueError, match=message):
            load_sparse(folder)
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)
    load_sparse(folder)


def test_corrupted_config_json_raises(make_tiny_model, tmp_path):
    _, folder = _saved(make_tiny_model, tmp_path)
    (folder / CONFIG_FILE).write_text('{"format_version": 1, "config": {"method": "chts", ')
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_sparse(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"format_version": 1, "config": {"target_density": 7}}))
    with pytest.raises(ValueError, match="target_density"):
        load_sparse(folder)


def test_masks_from_another_model_raise(make_tiny_model, tmp_path, reseal):
    _, llama = _saved(make_tiny_model, tmp_path, "llama")
    _, gpt2 = _saved(make_tiny_model, tmp_path, "gpt2")
    shutil.copy(gpt2 / SPARSITY_FILE, llama / SPARSITY_FILE)
    with pytest.raises(ValueError, match=rf"mixes files.*{SPARSITY_FILE}: .*save id"):
        load_sparse(llama)
    reseal(llama)
    with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}.*'transformer\.h\.0\.\S+\.weight'"):
        load_sparse(llama)


def test_mask_shape_and_missing_layer_raise(make_tiny_model, tmp_path, reseal):
    from safetensors.torch import save_file

    model, folder = _saved(make_tiny_model, tmp_path)
    masks = read_masks(folder)
    key = "model.layers.1.mlp.down_proj.weight"

    def rewrite(entries, shapes, dtype_override=None):
        tensors = {k: (pack_mask(v) if dtype_override is None else v.to(dtype_override)) for k, v in entries.items()}
        save_file(tensors, str(folder / SPARSITY_FILE),
                  metadata={"hf_chts_format_version": "1", "shapes": json.dumps(shapes)})
        reseal(folder)

    shapes = {k: list(v.shape) for k, v in masks.items()}
    wrong = dict(masks)
    wrong[key] = torch.ones(64, 40, dtype=torch.bool)  # layer is 64 x 96
    rewrite(wrong, {**shapes, key: [64, 40]})
    with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}.*{key}.*shape"):
        load_sparse(folder)
    missing = {k: v for k, v in masks.items() if k != key}
    rewrite(missing, {k: v for k, v in shapes.items() if k != key})
    with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}.*no mask.*{key}"):
        load_sparse(folder)
    rewrite(masks, shapes, dtype_override=torch.bool)  # unpacked bool masks: wrong dtype
    with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}.*dtype"):
        load_sparse(folder)


def test_missing_mask_file_loads_dense_with_warning(make_tiny_model, tmp_path, caplog):
    """Without any hf_chts file a folder is a dense model; with the config but no masks it is refused."""
    model, folder = _saved(make_tiny_model, tmp_path)
    (folder / SPARSITY_FILE).unlink()
    with pytest.raises(ValueError, match=f"{SPARSITY_FILE}.*missing"):
        load_sparse(folder)
    (folder / CONFIG_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="hf_chts.checkpoint"):
        loaded = load_sparse(folder)
    assert find_state(loaded) is None
    assert any("not sparse" in record.getMessage() for record in caplog.records)
    assert torch.equal(logits(loaded.eval()), logits(model))


def test_failed_save_keeps_previous_checkpoint(make_tiny_model, tmp_path, monkeypatch):
    import hf_chts.checkpointing.saving as checkpoint

    model = sparse_trained(make_tiny_model, "llama")
    save_sparse(model, tmp_path)
    before = logits(model)
    old_masks = read_masks(tmp_path)
    train_masked(model, steps=2, seed=50)
    for layer in sparse_layers(model).values():  # a different topology too
        layer.set_mask(layer.mask & (torch.rand(layer.mask.shape) > 0.2))
    assert not torch.equal(logits(model), before)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    for target in ("mask_entries", "compact_split"):  # after / before the weights were written
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint, target, explode)
            with pytest.raises(RuntimeError, match="disk full"):
                save_sparse(model, tmp_path, compact=target == "compact_split")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
        reloaded = load_sparse(tmp_path).eval()
        assert torch.equal(logits(reloaded), before)
        masks = read_masks(tmp_path)
        assert all(torch.equal(masks[k], old_masks[k]) for k in old_masks)
    save_sparse(model, tmp_path)  # and a successful save replaces it
    assert torch.equal(logits(load_sparse(tmp_path).eval()), logits(model))


def test_compact_then_dense_save_removes_stale_files(make_tiny_model, tmp_path):
    model = sparse_trained(make_tiny_model, "llama")
    save_sparse(model, tmp_path, compact=True, max_shard_size="40KB")
    assert (tmp_path / SPARSE_WEIGHTS_FILE).exists() and (tmp_path / "model.safetensors.index.json").exists()
    save_sparse(model, tmp_path)
    names = set(os.listdir(tmp_path))
    assert SPARSE_WEIGHTS_FILE not in names and "model.safetensors.index.json" not in names
    assert not any(name.startswith("model-0") for name in names)
    assert torch.equal(logits(load_sparse(tmp_path).eval()), logits(model))


# ------------------------------------------------------- save_pretrained / Trainer
def test_save_pretrained_hook_and_deepcopy(make_tiny_model, tmp_path):
    model = sparse_trained(make_tiny_model, "gpt2")
    with torch.no_grad():  # weights drifted at masked positions (e.g. no callback): the save re-masks
        for layer in sparse_layers(model).values():
            layer.weight.add_(0.01)
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / SPARSITY_FILE).exists() and (tmp_path / "a" / CONFIG_FILE).exists()
    loaded = load_sparse(tmp_path / "a").eval()
    assert torch.equal(logits(loaded), logits(model))
    for layer in sparse_layers(model).values():
        assert not bool(layer.logical_weight()[~layer.mask].any())

    clone = copy.deepcopy(model)
    for layer in sparse_layers(clone).values():
        layer.set_mask(torch.zeros_like(layer.mask))
    clone.save_pretrained(tmp_path / "b")  # the copy saves its own masks
    assert all(not bool(m.any()) for m in read_masks(tmp_path / "b").values())
    torch.save(clone, tmp_path / "clone.pt")  # and the hook survives pickling
    unpickled = torch.load(tmp_path / "clone.pt", weights_only=False)
    unpickled.save_pretrained(tmp_path / "d")
    assert all(not bool(m.any()) for m in read_masks(tmp_path / "d").values())
    model.save_pretrained(tmp_path / "c", is_main_process=False)
    assert not (tmp_path / "c" / SPARSITY_FILE).exists()


def test_trainer_save_model_writes_sparsity_files(make_tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=DENSITY))
    data = [{"input_ids": ids, "labels": ids} for ids in random_tokens(batch=8, length=16)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, logging_steps=1,
                             learning_rate=1e-2, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert (folder / SPARSITY_FILE).exists() and (folder / CONFIG_FILE).exists(), folder
        loaded = load_sparse(folder).eval()
        assert_same_masks(model, loaded)
    model.eval()
    assert torch.equal(logits(load_sparse(tmp_path / "final").eval()), logits(model))


# ------------------------------------------------------------------------ Hub
def test_push_to_hub_uploads_a_valid_checkpoint(make_tiny_model, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class Repo:
        repo_id = "someone/tiny-sparse"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return Repo()

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        loaded = load_sparse(folder)  # the uploaded folder must be a complete checkpoint
        calls.append(("upload_folder", kwargs, masks_of(loaded), sorted(os.listdir(folder))))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = sparse_trained(make_tiny_model, "llama")
    save_sparse(model, tmp_path / "out", push_to_hub=True, repo_id="someone/tiny-sparse", private=True,
                commit_message="sparse 30%")
    assert calls[0][:2] == ("create_repo", "someone/tiny-sparse") and calls[0][2]["private"] is True
    kind, kwargs, masks, files = calls[1]
    assert kind == "upload_folder" and kwargs["repo_id"] == "someone/tiny-sparse"
    assert kwargs["commit_message"] == "sparse 30%" and Path(kwargs["folder_path"]) == tmp_path / "out"
    assert {SPARSITY_FILE, CONFIG_FILE, "model.safetensors"} <= set(files)
    assert all(torch.equal(masks[name], mask) for name, mask in masks_of(model).items())

    calls.clear()  # the save_pretrained hook pushes the same files
    model.save_pretrained(tmp_path / "hooked", push_to_hub=True, repo_id="someone/tiny-sparse")
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"] and SPARSITY_FILE in calls[1][3]


def test_load_from_hub_cache_offline(make_tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = sparse_trained(make_tiny_model, "llama")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-sparse"
    save_sparse(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    loaded = hf_chts.load_sparse("someone/tiny-sparse", cache_dir=tmp_path / "cache").eval()
    assert_same_masks(model, loaded)
    assert torch.equal(logits(loaded), logits(model))
    assert read_engine_state("someone/tiny-sparse", cache_dir=tmp_path / "cache") is None
    with pytest.raises(FileNotFoundError, match="someone/absent"):
        load_sparse("someone/absent", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------ CLI
def test_inspect_prints_layer_densities(make_tiny_model, tmp_path, capsys):
    model = sparse_trained(make_tiny_model, "llama")
    layer = sparse_layers(model)["model.layers.1.self_attn.v_proj"]
    layer.set_mask(layer.mask & (torch.arange(layer.mask.shape[0]) >= 8)[:, None])  # 8 dead v rows: a lower density
    save_sparse(model, tmp_path)
    assert cli_main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    report = sparsity_report(model)
    assert info["density"] == pytest.approx(report.density) and info["anp"] == pytest.approx(report.anp)
    for entry in report.layers:
        layer_info = info["layers"][f"{entry.name}.weight"]
        assert layer_info["density"] == pytest.approx(entry.density)
        assert layer_info["active_neurons"] == entry.active_neurons
    assert info["files"][SPARSITY_FILE] == (tmp_path / SPARSITY_FILE).stat().st_size
    assert info["method"] == "chts"

    assert cli_main(["inspect", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for entry in report.layers:
        line = next(line for line in table.splitlines() if line.startswith(f"{entry.name}.weight "))
        assert f"{entry.density:.4f}" in line
    assert "ANP" in table and SPARSITY_FILE in table


def test_inspect_refuses_masks_that_do_not_fit_the_stored_config(make_tiny_model, tmp_path, capsys, monkeypatch):
    """A mismatch is the user's error (exit 2, file named); an architecture that cannot be built only warns."""
    model = sparse_trained(make_tiny_model, "llama")
    save_sparse(model, tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    record["config"]["exclude_modules"] = ["o_proj"]  # the o_proj masks now match no sparsified layer
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    assert cli_main(["inspect", str(tmp_path)]) == 2
    assert SPARSITY_FILE in capsys.readouterr().err

    import hf_chts.checkpointing.tools as tools

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tools, "_meta_model", offline)
    info = tools.inspect_checkpoint(tmp_path)
    assert info["anp"] is None and info["density"] == pytest.approx(sparsity_report(model).density)


def test_export_compact_and_back(make_tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = sparse_trained(make_tiny_model, "gpt2")
    save_sparse(model, tmp_path / "src")
    assert cli_main(["export", str(tmp_path / "src"), str(tmp_path / "compact"), "--format", "compact"]) == 0
    assert (tmp_path / "compact" / SPARSE_WEIGHTS_FILE).exists()
    assert cli_main(["export", str(tmp_path / "compact"), str(tmp_path / "dense"), "--format", "dense"]) == 0
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert torch.equal(logits(vanilla), logits(model))
    assert_same_masks(model, load_sparse(tmp_path / "dense"))
    assert cli_main(["export", str(tmp_path / "src"), str(tmp_path / "dense"), "--format", "dense"]) == 2
    assert "not an empty folder" in capsys.readouterr().err


# --------------------------------------------------------------------- FSDP2
_FSDP_SAVE_SCRIPT = r'''
import os, socket, sys
import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import hf_chts
from hf_chts import SparsifyConfig, save_sparse, sparsify
from hf_chts.layers import sparse_layers

out = sys.argv[1]
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
try:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    sparsify(model, SparsifyConfig(method="chtss", target_density=0.3, update_interval=2, seed=0))
    mesh = init_device_mesh("cpu", (1,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine = hf_chts.SparseTrainingEngine(model, total_steps=10, optimizer=optimizer)
    for step in range(2):  # one topology update
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.step()
    layers = sparse_layers(model)
    assert all(layer.is_sharded and isinstance(layer.storage_mask(), DTensor) for layer in layers.values())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    assert not any(isinstance(value, DTensor) for value in full.values())
    name = "model.layers.0.mlp.up_proj"
    row, col = (~layers[name].mask).nonzero()[0].tolist()
    full[name + ".weight"] = full[name + ".weight"].clone()
    full[name + ".weight"][row, col] = float("nan")  # NaN at a masked position: the save must make it exactly 0
    model.save_pretrained(os.path.join(out, "hook"), state_dict=full)  # Trainer / accelerate FSDP path
    save_sparse(model, os.path.join(out, "dense"))
    save_sparse(model, os.path.join(out, "compact"), compact=True)
    full[name + ".weight"][row, col] = 0.0
    from hf_chts.checkpointing.saving import masked_state_dict  # a sharded (DTensor) state dict is masked shard-wise
    sharded = {key: value.detach().clone() for key, value in model.state_dict().items()}
    sharded[name + ".weight"].to_local()[row, col] = float("nan")
    masked = masked_state_dict(model, sharded)[name + ".weight"]
    assert isinstance(masked, DTensor) and float(masked.to_local()[row, col]) == 0.0
    assert torch.equal(masked.full_tensor(), full[name + ".weight"])
    torch.save({"weights": {n + ".weight": full[n + ".weight"] for n in layers},
                "masks": {n: layer.mask.clone() for n, layer in layers.items()},
                "planted": (name, row, col), "steps": engine.completed_steps}, os.path.join(out, "expected.pt"))
finally:
    dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp2_sharded_model_saves_full_checkpoints(tmp_path):
    """Under FSDP2 the masks are sharded DTensors: saving a full state dict (the Trainer path) and
    save_sparse (dense and compact) must mask with the full plain masks and write full weights."""
    import subprocess
    import sys

    script = tmp_path / "fsdp_save.py"
    script.write_text(_FSDP_SAVE_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = torch.load(tmp_path / "expected.pt")
    name, row, col = expected["planted"]
    for folder in ("hook", "dense", "compact"):
        loaded = load_sparse(tmp_path / folder)
        layers = sparse_layers(loaded)
        assert set(layers) == set(expected["masks"])
        for module, mask in expected["masks"].items():
            assert torch.equal(layers[module].mask, mask), (folder, module)
            assert torch.equal(layers[module].weight, expected["weights"][module + ".weight"]), (folder, module)
        assert float(layers[name].weight.detach()[row, col]) == 0.0
        assert read_engine_state(tmp_path / folder)["completed_steps"] == expected["steps"]
