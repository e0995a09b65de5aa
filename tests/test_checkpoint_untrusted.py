"""Untrusted checkpoint contents cannot hang or crash the process: every malformed folder gives a ValueError
naming the file and the field, within a deadline (docs/checkpoint-format.md#7-consistency-between-files-and-crash-safety)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch

from hf_chts import SparsifyConfig, sparsify
from hf_chts.checkpoint import (
    CONFIG_FILE, SPARSITY_FILE, export_checkpoint, inspect_checkpoint, load_sparse, read_engine_state, read_masks,
    save_sparse,
)
from hf_chts.cli import main as cli_main
from hf_chts.layers import sparse_layers

CATASTROPHIC = r"(\w|\.|.)+(\w|\.|.)+X"  # exponential backtracking on any module name


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (interrupts regex matching and a blocking open)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the checkpoint made the process hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def saved(make_tiny_model, tmp_path):
    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3, seed=0))
    folder = tmp_path / "ckpt"
    save_sparse(model, folder)
    return model, folder


def edit_record(folder, change):
    record = json.loads((folder / CONFIG_FILE).read_text())
    change(record)
    (folder / CONFIG_FILE).write_text(json.dumps(record))


def test_stored_regex_is_never_run(saved, tmp_path):
    """Masked modules come from the names stored with the masks, not from the stored target_modules pattern."""
    model, folder = saved
    edit_record(folder, lambda record: record["config"].update(target_modules=CATASTROPHIC))
    with deadline(20):
        loaded = load_sparse(folder)
        info = inspect_checkpoint(folder)
        export_checkpoint(folder, tmp_path / "exported")
    assert sorted(sparse_layers(loaded)) == sorted(sparse_layers(model))
    for name, layer in sparse_layers(model).items():
        assert torch.equal(sparse_layers(loaded)[name].mask, layer.mask)
    assert len(info["layers"]) == len(sparse_layers(model))


def test_invalid_regex_names_the_file_and_field(saved):
    _, folder = saved
    edit_record(folder, lambda record: record["config"].update(target_modules="(unclosed"))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*target_modules.*regular expression"):
        load_sparse(folder)
    with pytest.raises(ValueError, match="target_modules"):
        SparsifyConfig(target_modules="[a-")


@contextlib.contextmanager
def fifo_watchdog(fifo, seconds: float):
    """Unblock a reader stuck opening ``fifo`` after ``seconds``: a helper process opens the write end (a blocked
    open in native code may hold the GIL, so a thread could not). Yields a list that holds True if it had to."""
    helper = subprocess.Popen(["sh", "-c", 'sleep "$1"; : > "$2"', "watchdog", str(seconds), str(fifo)])
    fired = []
    try:
        yield fired
    finally:
        if helper.poll() is None:
            helper.kill()  # no reader ever waited: the helper is still blocked opening the write end
        if helper.wait() == 0:
            fired.append(True)


@pytest.mark.parametrize("name", [SPARSITY_FILE, CONFIG_FILE, "model.safetensors", "config.json"])
def test_fifo_in_place_of_a_file_is_refused_not_opened(saved, name):
    _, folder = saved
    (folder / name).unlink()
    os.mkfifo(folder / name)
    for load in (load_sparse, inspect_checkpoint):
        with fifo_watchdog(folder / name, 10) as hung:
            with pytest.raises(ValueError, match=rf"{name}.*FIFO"):
                load(folder)
        assert not hung, f"{load.__name__} blocked opening the FIFO {name}"


@pytest.mark.parametrize("name", [CONFIG_FILE, "config.json"])
def test_a_folder_in_place_of_a_config_file_is_refused(saved, reseal, name):
    _, folder = saved
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(ValueError, match=rf"{name}.*is a folder"):
        load_sparse(folder)


@pytest.mark.parametrize("name", [CONFIG_FILE, "config.json"])
def test_deeply_nested_json_is_refused(saved, reseal, name):
    _, folder = saved
    text = json.dumps(json.loads((folder / name).read_text()))
    (folder / name).write_text(text[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}")
    if name != CONFIG_FILE:
        reseal(folder)
    with pytest.raises(ValueError, match=rf"{name}.*nested too deeply"):
        load_sparse(folder)


def test_wrong_metadata_types_name_the_field(saved, reseal):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, folder = saved
    with safe_open(str(folder / SPARSITY_FILE), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    shapes = json.loads(metadata["shapes"])
    key = sorted(shapes)[0]
    for wrong in ("64x64", [64, "64"], [64], [True, 64]):
        save_file(tensors, str(folder / SPARSITY_FILE), metadata={**metadata, "shapes": json.dumps({**shapes, key: wrong})})
        reseal(folder)
        with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}.*'shapes'.*{key}"):
            read_masks(folder)
    save_file(tensors, str(folder / SPARSITY_FILE), metadata={**metadata, "crc32": json.dumps({key: 7})})
    reseal(folder)
    with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}.*'crc32'"):
        load_sparse(folder)


@pytest.mark.parametrize("field, value", [("completed_steps", "7"), ("generator_state", 12), ("history", {"a": 1}),
                                          ("history", [3])])
def test_wrong_engine_field_types_name_the_field(make_tiny_model, tmp_path, field, value):
    from hf_chts import SparseTrainingEngine

    model = make_tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3, update_interval=1, seed=0))
    engine = SparseTrainingEngine(model, total_steps=4)
    save_sparse(model, tmp_path / "ckpt")
    engine.close()
    folder = tmp_path / "ckpt"
    edit_record(folder, lambda record: record["engine"].update({field: value}))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*'engine.{field}'"):
        read_engine_state(folder)
    edit_record(folder, lambda record: record.update(weights_format=["dense"]))
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}.*'weights_format'"):
        load_sparse(folder)


def test_truncated_weights_are_refused_naming_the_file(saved, reseal, capsys):
    _, folder = saved
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="mixes files.*model.safetensors"):
        load_sparse(folder)
    reseal(folder)  # a manifest that agrees: the weight file's own header check still refuses it
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_sparse(folder)
    assert cli_main(["inspect", str(folder)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_config_and_model_are_loaded_without_remote_code(saved, monkeypatch):
    import transformers

    _, folder = saved
    seen = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoConfig):
        original = auto.from_pretrained.__func__

        def spy(cls, *args, _original=original, **kwargs):
            seen.append((cls.__name__, kwargs.get("trust_remote_code", "absent")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    load_sparse(folder)
    inspect_checkpoint(folder)
    assert {"AutoModelForCausalLM", "AutoConfig"} <= {name for name, _ in seen}
    assert all(value is False for _, value in seen), seen


def test_checkpoint_with_symlinked_hub_style_files_still_loads(saved, tmp_path):
    """Hub snapshots are symlinks to blobs: regular files behind a symlink are accepted."""
    model, folder = saved
    blobs = tmp_path / "blobs"
    shutil.copytree(folder, blobs)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in blobs.iterdir():
        (snapshot / path.name).symlink_to(path)
    loaded = load_sparse(snapshot)
    assert sorted(sparse_layers(loaded)) == sorted(sparse_layers(model))
