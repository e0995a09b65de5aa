"""The CLI never shows a traceback for bad input: one line, exit status 2 (in-process ``cli.main``)."""

from __future__ import annotations

import shutil

import pytest
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_chts import SparsifyConfig, save_sparse, sparsify
from hf_chts import checkpoint as checkpoint_module
from hf_chts.cli import main as cli_main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A good sparse checkpoint and broken copies of it."""
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("checkpoints")
    model = tiny_model("llama")
    sparsify(model, SparsifyConfig(method="chts", target_density=0.5))
    save_sparse(model, root / "good")
    truncated = root / "truncated"
    shutil.copytree(root / "good", truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    word_level = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))  # eval reads it before the weights
    PreTrainedTokenizerFast(tokenizer_object=word_level).save_pretrained(truncated)
    broken_json = root / "broken-json"
    shutil.copytree(root / "good", broken_json)
    (broken_json / "sparsify_config.json").write_text("{", encoding="utf-8")
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "notes.txt").write_text("hi", encoding="utf-8")
    (root / "a-file.json").write_text("{}", encoding="utf-8")
    return root


def assert_one_line_error(capsys, argv, status=2, *, contains=()):
    code = cli_main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == status, (argv, captured.err)
    assert len(lines) == 1, (argv, captured.err)
    assert "error:" in lines[0] and "Traceback" not in captured.err + captured.out, (argv, captured.err)
    for text in contains:
        assert text in lines[0], (argv, lines[0])
    return lines[0]


def test_train_bad_inputs(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("run: [1\n", encoding="utf-8")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"data": {"builtin": "pydoc_topics"}, "run": {"output_dir": str(tmp_path / "o")}}),
                    encoding="utf-8")
    cases = [
        (["train", tmp_path / "missing.yaml"], ["missing.yaml", "does not exist"]),
        (["train", tmp_path / "broken.yaml"], ["broken.yaml", "not valid YAML"]),  # YAML errors span lines
        (["train", tmp_path / "binary.yaml"], ["binary.yaml", "not valid YAML"]),  # the file was not named
        (["train", tmp_path / "folder.yaml"], ["folder.yaml", "is a folder"]),
        (["train", tmp_path / "list.yaml"], ["list.yaml", "mapping"]),
        (["train", good, "--sparsify.densty", "0.1"], ["densty", "did you mean"]),
        (["train", good, "-x"], ["'-x'"]),
        (["train"], ["hf-chts train: error:", "recipe", "--help"]),  # argparse: usage + error, raised SystemExit
    ]
    for argv, contains in cases:
        assert_one_line_error(capsys, argv, contains=contains)
    assert not (tmp_path / "o").exists()


def test_inspect_bad_inputs(checkpoints, capsys):
    cases = [
        (["inspect", checkpoints / "not-a-checkpoint"], ["not a sparse checkpoint"]),
        (["inspect", checkpoints / "a-file.json"], ["is a file"]),
        (["inspect", checkpoints / "broken-json"], ["sparsify_config.json", "not valid JSON"]),
        (["inspect", checkpoints / "good", "--jsn"], ["unrecognized arguments: --jsn"]),
        (["inspect"], ["hf-chts inspect: error:", "checkpoint"]),
    ]
    for argv, contains in cases:
        assert_one_line_error(capsys, argv, contains=contains)


def test_export_bad_inputs(checkpoints, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep", encoding="utf-8")
    cases = [
        (["export", checkpoints / "not-a-checkpoint", tmp_path / "a"], ["sparsity.safetensors"]),
        (["export", checkpoints / "good", tmp_path / "b", "--format", "zip"], ["invalid choice: 'zip'"]),
        (["export", checkpoints / "truncated", tmp_path / "c"], ["model.safetensors", "bytes, the save wrote"]),
        (["export", checkpoints / "good"], ["output"]),
    ]
    for argv, contains in cases:
        assert_one_line_error(capsys, argv, contains=contains)
    assert (tmp_path / "full" / "keep.txt").read_text(encoding="utf-8") == "keep"


def test_eval_bad_inputs(checkpoints, tmp_path, capsys):
    cases = [
        (["eval", checkpoints / "good"], ["--tasks"]),
        (["eval", checkpoints / "good", "--tasks", "x", "--batch-size", "many"], ["--batch-size", "'many'"]),
        (["eval", tmp_path / "nowhere", "--tasks", "x"], ["nowhere"]),
        (["eval", checkpoints / "truncated", "--tasks", "x"], ["model.safetensors", "bytes, the save wrote"]),
        (["eval", checkpoints / "good", "--tasks", "x", "--device", "cpu"],  # save_sparse without tokenizer=
         [str(checkpoints / "good"), "no loadable tokenizer", "tokenizer.save_pretrained"]),
        (["eval", checkpoints / "good", "--tasks", "x", "--device", "gpu0"], ["'gpu0' is not a torch device"]),
        (["eval", checkpoints / "good", "--tasks", "x", "--model-args", "device=cpu:x"], ["'cpu:x'"]),
    ]
    for argv, contains in cases:
        assert_one_line_error(capsys, argv, contains=contains)


def test_eval_refuses_a_device_this_machine_lacks(checkpoints, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever the test runs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:1"):
        assert_one_line_error(capsys, ["eval", checkpoints / "good", "--tasks", "x", "--device", device],
                              contains=[f"device={device!r}", "0 CUDA device", "--device cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU: cuda:1 is still absent
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_one_line_error(capsys, ["eval", checkpoints / "good", "--tasks", "x", "--device", "cuda:1"],
                          contains=["'cuda:1'", "1 CUDA device"])
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert_one_line_error(capsys, ["eval", checkpoints / "good", "--tasks", "x", "--device", "mps"],
                          contains=["'mps'", "MPS is not available"])


def test_top_level_bad_inputs(capsys):
    assert_one_line_error(capsys, [], contains=["hf-chts: error:", "required"])
    assert_one_line_error(capsys, ["frob"], contains=["invalid choice: 'frob'"])
    assert cli_main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out


def test_debug_shows_the_traceback_of_a_user_error(checkpoints, capsys):
    for argv in (["--debug", "inspect", checkpoints / "not-a-checkpoint"],
                 ["inspect", checkpoints / "not-a-checkpoint", "--debug"]):
        assert cli_main([str(arg) for arg in argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("hf-chts inspect: error:")


def test_internal_error_shows_the_traceback_and_asks_for_a_report(checkpoints, monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(checkpoint_module, "inspect_command", broken)
    assert cli_main(["inspect", str(checkpoints / "good")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert "internal error" in err and "please report it" in err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "inspect_command", interrupted)
    assert cli_main(["inspect", str(checkpoints / "good")]) == 130
    assert capsys.readouterr().err.strip() == "hf-chts inspect: interrupted"
