"""A checkpoint folder is all from one save, or it is refused: save id + manifest, masked weights are 0,
crash-safe commit (kills at every step and at random points), concurrent saves, leftovers
(docs/checkpoint-format.md#7-consistency-between-files-and-crash-safety)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hf_chts.checkpoint import (
    CONFIG_FILE, SPARSITY_FILE, export_checkpoint, inspect_checkpoint, load_sparse, read_engine_state, save_sparse,
)
from hf_chts.checkpointing import commit
from hf_chts.cli import main as cli_main
from hf_chts.layers import sparse_layers
from hf_chts.state import find_state

BUILD = textwrap.dedent('''
    import torch, transformers
    from hf_chts import SparsifyConfig, sparsify

    def build(seed, hidden=64, layers=2):
        """A sparsified tiny LLaMA; the same seed gives the same weights and masks in every process."""
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          vocab_size=128)
        model = transformers.AutoModelForCausalLM.from_config(config)
        return sparsify(model, SparsifyConfig(method="chts", target_density=0.3, seed=seed))
''')
namespace: dict = {}
exec(BUILD, namespace)
build = namespace["build"]

# argv: folder, hidden, layers, repeats, seeds: saves each seed's model in turn, ``repeats`` times over;
# prints "ready" once the models are built
CHILD = BUILD + textwrap.dedent('''
    import sys
    from hf_chts import save_sparse
    folder, hidden, layers, repeats, *seeds = sys.argv[1:]
    models = [build(int(seed), int(hidden), int(layers)) for seed in seeds]
    print("ready", flush=True)
    for model in models * int(repeats):
        save_sparse(model, folder)
''')


def run_child(folder, seeds, *, hidden=64, layers=2, repeats=1, env=None):
    environment = {**os.environ, **(env or {})}
    arguments = [str(folder), str(hidden), str(layers), str(repeats), *map(str, seeds)]
    return subprocess.Popen([sys.executable, "-c", CHILD, *arguments], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def identify(folder, references: dict) -> str:
    """Which reference the folder loads as exactly ("refused" if loading refuses it); fails on anything else."""
    try:
        loaded = load_sparse(folder)
    except (ValueError, FileNotFoundError):
        return "refused"
    return identify_model(loaded, references, folder)


def identify_model(loaded, references: dict, folder) -> str:
    """Which reference ``loaded`` equals exactly (masks and every tensor); fails on anything else."""
    assert find_state(loaded) is not None, f"{folder} loaded as a dense model"
    state = loaded.state_dict()
    for label, reference in references.items():
        same_masks = all(torch.equal(sparse_layers(loaded)[name].mask, layer.mask)
                         for name, layer in sparse_layers(reference).items())
        if same_masks and all(torch.equal(state[key], value) for key, value in reference.state_dict().items()):
            return label
    raise AssertionError(f"{folder} loaded as neither {sorted(references)}: a mixed checkpoint")


def hf_chts_leftovers(parent: Path) -> list[str]:
    locks = (commit.LOCK_NAME, commit.SWAP_LOCK_NAME)
    return sorted(p.name for p in parent.iterdir() if ".hf_chts" in p.name and p.name not in locks)


# ------------------------------------------------------------------ mixed folders
def test_masks_file_from_another_checkpoint_is_refused(tmp_path, reseal):
    a, b = build(0), build(1)
    save_sparse(a, tmp_path / "a")
    save_sparse(b, tmp_path / "b")
    shutil.copy(tmp_path / "b" / SPARSITY_FILE, tmp_path / "a" / SPARSITY_FILE)
    with pytest.raises(ValueError, match=rf"mixes files.*{SPARSITY_FILE}: .*SHA-256.*{SPARSITY_FILE}: save id"):
        load_sparse(tmp_path / "a")
    reseal(tmp_path / "a")  # even with a manifest that agrees, the stored weights give the masks away
    with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}: mask '\S+' marks \d+ weights as masked .* non-zero"):
        load_sparse(tmp_path / "a")


def test_nan_at_a_masked_position_is_refused(tmp_path, reseal):
    from safetensors.torch import load_file, save_file

    model = build(0)
    save_sparse(model, tmp_path)
    name, layer = next(iter(sparse_layers(model).items()))
    row, col = (~layer.mask).nonzero()[0].tolist()
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights[f"{name}.weight"][row, col] = float("nan")
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reseal(tmp_path)
    with pytest.raises(ValueError, match=rf"mask '{name}.weight' marks 1 weights as masked"):
        load_sparse(tmp_path)


def test_weights_of_another_save_are_refused_by_every_reader(tmp_path, capsys):
    a, b = build(0), build(1)
    save_sparse(a, tmp_path / "a")
    save_sparse(b, tmp_path / "b")
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    folder = tmp_path / "a"
    for reader in (load_sparse, read_engine_state, inspect_checkpoint,
                   lambda path: export_checkpoint(path, tmp_path / "out")):
        with pytest.raises(ValueError, match="mixes files of different saves.*model.safetensors"):
            reader(folder)
    for command in (["inspect", str(folder)], ["export", str(folder), str(tmp_path / "out2")]):
        assert cli_main(command) == 2
        assert "model.safetensors" in capsys.readouterr().err
    save_sparse(a, folder)
    shutil.copy(tmp_path / "b" / "model.safetensors", folder / "model-00001-of-00002.safetensors")  # a stray shard
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors: not written by save"):
        load_sparse(folder)


def test_resume_refuses_a_trainer_checkpoint_with_foreign_weights(make_tiny_model, tmp_path):
    from hf_chts import SparsifyConfig
    from trainer_utils import make_trainer

    config = SparsifyConfig(method="chts", target_density=0.5, update_interval=2)
    trainer, _ = make_trainer(make_tiny_model("llama"), tmp_path / "run", config, max_steps=4, save_strategy="steps",
                              save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    record = json.loads((checkpoint / CONFIG_FILE).read_text())
    # the manifest covers the weights the Trainer saved through save_pretrained, not the Trainer's own files
    assert {"model.safetensors", "config.json", SPARSITY_FILE} <= set(record["manifest"])
    assert (checkpoint / "optimizer.pt").exists() and "optimizer.pt" not in record["manifest"]
    shutil.copy(tmp_path / "run" / "checkpoint-4" / "model.safetensors", checkpoint / "model.safetensors")
    again, _ = make_trainer(make_tiny_model("llama"), tmp_path / "run", config, max_steps=4)
    with pytest.raises(ValueError, match="mixes files of different saves.*model.safetensors"):
        again.train(resume_from_checkpoint=str(checkpoint))


# -------------------------------------------------------------- commit, leftovers
def test_foreign_files_survive_and_only_marked_leftovers_are_deleted(tmp_path, caplog):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "runs").mkdir()
    (folder / "runs" / "events").write_text("tensorboard")
    save_sparse(build(0), folder)
    marked = tmp_path / f".ckpt.hf_chts-staging-{'a' * 32}"  # a staging folder of a killed save: marker inside
    marked.mkdir()
    (marked / commit.MARKER_NAME).write_text(json.dumps({"target": "ckpt"}))
    lookalike = tmp_path / f".ckpt.hf_chts-staging-{'b' * 32}"  # same pattern, no marker: not ours to delete
    lookalike.mkdir()
    (lookalike / "data").write_text("keep")
    save_sparse(build(1), folder)
    assert not marked.exists()
    assert (lookalike / "data").read_text() == "keep"
    assert any("not deleting it" in record.getMessage() for record in caplog.records)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "runs" / "events").read_text() == "tensorboard"
    assert hf_chts_leftovers(tmp_path) == [lookalike.name]
    assert identify(folder, {"b": build(1)}) == "b"


class Killed(BaseException):
    """Stands in for a kill in-process: raised at a fault point, nothing after it runs."""


@pytest.mark.parametrize("step, exchange, expected", [("retired", False, "new"), ("retired", True, "new"),
                                                      ("swapped", True, "new"), ("synced", True, "old")])
def test_interrupted_swap_is_recovered_by_the_next_save(tmp_path, monkeypatch, step, exchange, expected):
    old, new = build(0), build(1)
    folder = tmp_path / "ckpt"
    save_sparse(old, folder)
    monkeypatch.setenv("HF_CHTS_NO_RENAME_EXCHANGE", "0" if exchange else "1")

    def fault(name):
        if name == step:
            raise Killed(name)

    with monkeypatch.context() as patch:
        patch.setattr(commit, "fault_point", fault)
        if step == "retired" and exchange:  # the atomic exchange never leaves the folder missing: step not reached
            save_sparse(new, folder)
        else:
            with pytest.raises(Killed):
                save_sparse(new, folder)
    if step == "retired" and not exchange:  # between the two renames of the fallback: no folder, and the error says why
        with pytest.raises(FileNotFoundError, match="interrupted"):
            load_sparse(folder)
    else:
        assert identify(folder, {"old": old, "new": new}) == expected
    with commit.save_lock(folder):
        commit.recover_interrupted_save(folder)
    assert identify(folder, {"old": old, "new": new}) == expected
    assert hf_chts_leftovers(tmp_path) == []


@pytest.mark.slow  # the longest default-tier tests (5-10 s each); CI runs the slow tier too
def test_kill_before_the_swap_keeps_the_old_checkpoint(tmp_path):
    """A subprocess killed (os._exit, no cleanup) after writing and syncing the new checkpoint, before the swap."""
    old, new = build(0), build(1)
    folder = tmp_path / "ckpt"
    save_sparse(old, folder)
    child = run_child(folder, [1], env={commit.FAULT_ENV: "synced"})
    child.communicate(timeout=300)
    assert child.returncode == commit.FAULT_EXIT_CODE, "the save did not reach the fault point"
    assert identify(folder, {"old": old, "new": new}) == "old"
    leftovers = hf_chts_leftovers(tmp_path)  # the journal and the complete staging folder of the killed save
    staging = next(tmp_path / name for name in leftovers if "staging" in name)
    with pytest.raises(ValueError, match="staging or retired folder of an hf_chts save, not a checkpoint"):
        load_sparse(staging)  # never mistaken for a checkpoint, although it is complete
    save_sparse(new, folder)
    assert identify(folder, {"old": old, "new": new}) == "new" and hf_chts_leftovers(tmp_path) == []


# ------------------------------------------------------------------- slow tier
EXPECTED = {"staged": "old", "weights-written": "old", "sparsity-written": "old", "config-written": "old",
            "foreign-linked": "old", "synced": "old", "retired": "refused", "swapped": "new", "cleaned": "new"}


@pytest.mark.slow
@pytest.mark.parametrize("first_save, exchange", [(True, True), (False, True), (False, False)])
def test_kill_at_each_commit_step(tmp_path, first_save, exchange):
    old, new = build(0), build(1)
    for step in commit.FAULT_STEPS:
        if step == "retired" and (exchange or first_save):
            continue  # only the two-rename fallback over an existing folder has this step
        parent = tmp_path / f"{step}"
        parent.mkdir()
        folder = parent / "ckpt"
        if not first_save:
            save_sparse(old, folder)
        env = {commit.FAULT_ENV: step, "HF_CHTS_NO_RENAME_EXCHANGE": "0" if exchange else "1"}
        child = run_child(folder, [1], env=env)
        _, err = child.communicate(timeout=300)
        assert child.returncode == commit.FAULT_EXIT_CODE, (step, err[-2000:])
        outcome = identify(folder, {"old": old, "new": new})
        expected = EXPECTED[step] if not (first_save and EXPECTED[step] == "old") else "refused"
        assert outcome == expected, step
        save_sparse(new, folder)  # the next save recovers and cleans up
        assert identify(folder, {"old": old, "new": new}) == "new" and hf_chts_leftovers(parent) == [], step


@pytest.mark.slow
def test_random_kills_never_leave_a_mixed_folder(tmp_path):
    """>= 20 SIGKILLs at random moments of a loop of saves of two ~2 MB models to one folder."""
    references = {"a": build(0, hidden=128, layers=4), "b": build(1, hidden=128, layers=4)}
    rng = random.Random(0)
    outcomes = []
    for trial in range(20):
        parent = tmp_path / f"t{trial}"
        parent.mkdir()
        folder = parent / "ckpt"
        child = run_child(folder, [0, 1], hidden=128, layers=4, repeats=50)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.5))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
        outcomes.append(identify(folder, references))
        save_sparse(references["a"], folder)
        assert hf_chts_leftovers(parent) == [], (trial, outcomes)
    assert set(outcomes) <= {"a", "b", "refused"}
    assert {"a", "b"} & set(outcomes), outcomes  # the kills did land after complete saves too


@pytest.mark.slow
def test_concurrent_saves_to_one_folder_are_serialised(tmp_path):
    references = {"a": build(0, hidden=128, layers=4), "b": build(1, hidden=128, layers=4)}
    folder = tmp_path / "ckpt"
    children = [run_child(folder, [seed], hidden=128, layers=4, repeats=10) for seed in (0, 1)]
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-2000:]
    assert identify(folder, references) in ("a", "b")
    assert hf_chts_leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_save_waiting_too_long_for_the_lock_fails_clearly(tmp_path):
    old = build(0)
    folder = tmp_path / "ckpt"
    save_sparse(old, folder)
    with commit.save_lock(folder):
        child = run_child(folder, [1], env={commit.LOCK_TIMEOUT_ENV: "2"})
        _, err = child.communicate(timeout=300)
    assert child.returncode != 0 and "another process has been saving" in err
    assert identify(folder, {"old": old}) == "old"


def test_format_1_folders_load_unverified_with_a_warning(tmp_path, caplog):
    model = build(0)
    save_sparse(model, tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    for field in ("save_id", "manifest"):
        del record[field]
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**record, "format_version": 1}))
    with caplog.at_level("WARNING", logger="hf_chts.checkpoint"):
        assert identify(tmp_path, {"saved": model}) == "saved"
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))  # version 2 without a manifest: refused
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: field 'save_id'"):
        load_sparse(tmp_path)


@pytest.mark.parametrize("compact", [False, True])
def test_refreshing_the_sparsity_files_keeps_one_save(tmp_path, compact):
    from hf_chts.checkpoint import write_sparsity_files

    model = build(0)
    save_sparse(model, tmp_path / "ckpt", compact=compact)
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"trainer state")
    write_sparsity_files(model, tmp_path / "ckpt")
    record = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert "model.safetensors" in record["manifest"] and "optimizer.pt" not in record["manifest"]
    assert (tmp_path / "ckpt" / "optimizer.pt").read_bytes() == b"trainer state"
    assert identify(tmp_path / "ckpt", {"saved": model}) == "saved" and hf_chts_leftovers(tmp_path) == []


def test_an_edited_model_card_is_reported_not_refused(tmp_path, caplog):
    model = build(0)
    save_sparse(model, tmp_path)
    assert "README.md" in json.loads((tmp_path / CONFIG_FILE).read_text())["manifest"]
    with open(tmp_path / "README.md", "a", encoding="utf-8") as card:
        card.write("\nEdited on the Hub.\n")
    with caplog.at_level("WARNING", logger="hf_chts.checkpoint"):
        assert identify(tmp_path, {"saved": model}) == "saved"
    assert any("README.md" in r.getMessage() and "does not affect loading" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------ loads that overlap a save
def _pruned_copy(seed):
    """``build(seed)`` with half of each layer's live links cut and the rest doubled: its masks are a subset of
    ``build(seed)``'s (as after a density decay), so the masked-weights-are-zero check cannot tell the two apart."""
    model = build(seed)
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            live = layer.mask.nonzero()
            layer.mask[tuple(live[::2].t())] = False
            layer.weight.mul_(2)
            layer.apply_mask_()
    return model


def _swap_folders(first: Path, second: Path) -> None:
    """What a save does to a loader: the folder's whole content is replaced between two of its reads."""
    parked = first.with_name(first.name + ".parked")
    os.rename(first, parked)
    os.rename(second, first)
    os.rename(parked, second)


def test_a_load_that_overlaps_a_save_reads_one_save(tmp_path, monkeypatch):
    """A save swaps the folder after the loader verified it and read the masks, before the weights: the load
    must not return old masks with new weights (mutant: no re-check of the save id after the read -> mixed)."""
    from hf_chts.checkpointing import loading

    references = {"old": build(0), "new": _pruned_copy(0)}
    save_sparse(references["old"], tmp_path / "ckpt")
    save_sparse(references["new"], tmp_path / "incoming")
    real_read_masks, swaps = loading.read_masks, []

    def read_masks_then_a_save_lands(folder):
        masks = real_read_masks(folder)
        if not swaps:
            _swap_folders(tmp_path / "ckpt", tmp_path / "incoming")
            swaps.append(folder)
        return masks

    monkeypatch.setattr(loading, "read_masks", read_masks_then_a_save_lands)
    assert identify(tmp_path / "ckpt", references) == "new" and swaps


def test_a_load_that_loses_every_race_fails_with_one_line(tmp_path, monkeypatch):
    from hf_chts.checkpointing import loading

    save_sparse(build(0), tmp_path / "ckpt")
    save_sparse(_pruned_copy(0), tmp_path / "incoming")
    real_read_masks = loading.read_masks

    def read_masks_then_a_save_lands(folder):
        masks = real_read_masks(folder)
        _swap_folders(tmp_path / "ckpt", tmp_path / "incoming")
        return masks

    monkeypatch.setattr(loading, "read_masks", read_masks_then_a_save_lands)
    with pytest.raises(ValueError, match=r"a save replaced this checkpoint during each of \d+ attempts") as caught:
        load_sparse(tmp_path / "ckpt")
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_loads_during_a_loop_of_saves_are_never_mixed(tmp_path):
    """One process saves two checkpoints in turn into one folder as fast as it can; this one loads it meanwhile.
    Every load is one of the two saves (identify fails on a mixed model) and none is refused: the saves wait for
    each load before swapping (before that lock: 33 of 49 loads refused as lost races; before this round: mixed
    models and false "mixes files" refusals)."""
    references = {"a": build(0, hidden=128, layers=4), "b": build(1, hidden=128, layers=4)}
    folder = tmp_path / "ckpt"
    save_sparse(references["a"], folder)
    child = run_child(folder, [0, 1], hidden=128, layers=4, repeats=400)
    assert child.stdout.readline().strip() == "ready"
    outcomes, reasons = [], set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            try:
                outcomes.append(identify_model(load_sparse(folder), references, folder))
            except ValueError as error:
                outcomes.append("race")
                reasons.add(str(error).split(": ", 1)[1])
    finally:
        child.kill()
        child.communicate(timeout=60)
    print(f"{len(outcomes)} loads: {outcomes.count('a')} a, {outcomes.count('b')} b, "
          f"{outcomes.count('race')} refused as a lost race")
    assert not reasons, reasons
    assert len(outcomes) >= 20 and {"a", "b"} <= set(outcomes), outcomes


def test_a_save_waits_for_a_load_under_way(tmp_path):
    """The swap of a save waits while a reader holds the shared swap lock (mutant: no swap_lock around the swap ->
    the folder changes under the reader)."""
    import threading

    references = {"old": build(0), "new": build(1)}
    folder = tmp_path / "ckpt"
    save_sparse(references["old"], folder)
    saver = threading.Thread(target=save_sparse, args=(references["new"], folder))
    with commit.readers_lock(folder):
        saver.start()
        time.sleep(1.5)  # the new save is written by now, and waits for this reader before swapping
        assert saver.is_alive() and identify(folder, references) == "old"
    saver.join(timeout=60)
    assert identify(folder, references) == "new"


# ------------------------------------------------------------ verification cost (issue 19 item 8)
class HashCounter:
    def __init__(self, monkeypatch):
        import hashlib

        from hf_chts.checkpointing import manifest

        self.calls, real = 0, hashlib.sha256

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(manifest, "_SETTLE_NS", 0)  # the files were just written: remember them at once
        monkeypatch.setattr(hashlib, "sha256", counting)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def test_each_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    """Mutant: no digest cache in file_digest -> the second load (and inspect) hash every file again."""
    model = build(0)
    folder = tmp_path / "ckpt"
    save_sparse(model, folder)
    listed = len(json.loads((folder / CONFIG_FILE).read_text())["manifest"])
    counter = HashCounter(monkeypatch)
    assert identify(folder, {"saved": model}) == "saved" and counter.take() == listed
    assert identify(folder, {"saved": model}) == "saved" and counter.take() == 0
    inspect_checkpoint(folder)
    read_engine_state(folder)
    assert counter.take() == 0
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # an in-place edit of the last byte: same size, new mtime/ctime
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: SHA-256 differs"):
        load_sparse(folder)
    assert counter.take() == 1


def test_fast_verification_checks_sizes_headers_and_save_ids_only(tmp_path, monkeypatch):
    """verify='fast' (or HF_CHTS_VERIFY=fast) hashes no safetensors file, and still refuses a file of another
    size, a broken header and a masks file of another save (mutant: fast mode hashing too -> hash count > 0)."""
    model = build(0)
    folder = tmp_path / "ckpt"
    save_sparse(model, folder)
    save_sparse(build(1), tmp_path / "other")
    safetensors = [n for n in json.loads((folder / CONFIG_FILE).read_text())["manifest"] if n.endswith(".safetensors")]
    counter = HashCounter(monkeypatch)
    assert identify_model(load_sparse(folder, verify="fast"), {"saved": model}, folder) == "saved"
    assert counter.take() == len(json.loads((folder / CONFIG_FILE).read_text())["manifest"]) - len(safetensors)
    monkeypatch.setenv("HF_CHTS_VERIFY", "fast")
    inspect_checkpoint(folder)
    assert counter.take() == 0  # the JSON files were hashed by the first load already
    shutil.copy(tmp_path / "other" / SPARSITY_FILE, folder / SPARSITY_FILE)
    with pytest.raises(ValueError, match=rf"{SPARSITY_FILE}: save id"):
        load_sparse(folder)
    save_sparse(model, folder)
    with open(folder / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match=r"model.safetensors: \d+ bytes, the save wrote"):
        load_sparse(folder)
    save_sparse(model, folder)
    with open(folder / "model.safetensors", "r+b") as handle:  # same size, the header's first byte broken
        handle.seek(8)
        handle.write(b"X")
    with pytest.raises(ValueError, match="model.safetensors: .*not a readable safetensors file"):
        load_sparse(folder)
    monkeypatch.setenv("HF_CHTS_VERIFY", "quick")
    with pytest.raises(ValueError, match="HF_CHTS_VERIFY='quick' is not a verification mode"):
        load_sparse(folder)
