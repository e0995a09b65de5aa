"""A mistyped local path with one slash (``runs/fnal`` where ``runs/`` exists) says "no such folder" before
any Hub lookup (issue 19 item 9); a real ``org/name`` still goes to the Hub."""

from __future__ import annotations

import huggingface_hub
import pytest

import hf_chts
from hf_chts import SparsifyConfig
from hf_chts.cli import main as cli_main
from hf_chts.io_utils import looks_like_local_path


@pytest.fixture
def hub_calls(monkeypatch):
    """Every Hub download attempt, recorded (and failing: tests are offline)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(kwargs.get("repo_id", args[0] if args else None))
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    return calls


def test_one_slash_under_an_existing_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_local_path("runs/fnal") and looks_like_local_path("./x")
    assert not looks_like_local_path("org/name") and not looks_like_local_path("gpt2")


def test_mistyped_checkpoint_path_is_no_such_folder_without_a_hub_lookup(tmp_path, monkeypatch, hub_calls, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "final").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no such folder 'runs/fnal'"):
        hf_chts.load_sparse("runs/fnal")
    with pytest.raises(FileNotFoundError, match="no such folder 'runs/fnal'"):
        SparsifyConfig.from_pretrained("runs/fnal")
    assert cli_main(["inspect", "runs/fnal"]) == 2
    assert "no such folder 'runs/fnal'" in capsys.readouterr().err
    assert hub_calls == []
    with pytest.raises(FileNotFoundError):  # a Hub id (no folder 'org' here) is still looked up
        hf_chts.load_sparse("org/name")
    assert hub_calls == ["org/name"]
