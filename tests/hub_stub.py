"""A local stand-in for the Hugging Face Hub API (no network), for the Hub tests.

Only the calls that would reach the network are replaced: ``HfApi.create_repo``,
``create_commit`` (the one call every upload ends in), ``create_branch``,
``file_exists``, ``_validate_yaml`` (checked locally with ``ModelCard``) and
``hf_hub_download``; ``upload_folder`` takes its single-commit path (no xet
pre-upload). ``upload_folder``'s own listing and allow/ignore filtering run for
real, so the stand-in sees exactly the files a real push would send.
Any socket connection attempted meanwhile fails the test.
"""

from __future__ import annotations

import socket
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl


class FakeHub:
    """Repos as ``{repo_id: {path_in_repo: bytes}}`` plus the list of commits made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []

    # the replaced HfApi methods (``api`` is the HfApi instance)
    def create_repo(self, api, repo_id, *args, **kwargs):
        self.repos.setdefault(repo_id, {})
        return RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

    def create_commit(self, api, repo_id, operations, *, commit_message, run_as_future=False, **kwargs):
        if repo_id not in self.repos:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found (fake hub)")
        added = {}
        for op in operations:
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                data = Path(source).read_bytes()
            elif isinstance(source, bytes):
                data = source
            else:
                data = source.read()
            added[op.path_in_repo] = data
        self.repos[repo_id].update(added)
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": sorted(added), "data": added})
        info = CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.commits):040x}",
                          commit_message=commit_message, commit_description="", oid=f"{len(self.commits):040x}")
        if run_as_future:
            future = Future()
            future.set_result(info)
            return future
        return info

    def file_exists(self, api, repo_id, filename, **kwargs):
        return filename in self.repos.get(repo_id, {})

    def hf_hub_download(self, repo_id, filename, *, subfolder=None, revision=None, **kwargs):
        path = f"{subfolder}/{filename}" if subfolder else filename
        files = self.repos.get(repo_id)
        if files is None:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found (fake hub)")
        if path not in files:
            raise huggingface_hub.errors.EntryNotFoundError(f"{path} not in {repo_id} (fake hub)")
        local = self.root / "downloads" / repo_id / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(files[path])
        return str(local)

    def files(self, repo_id: str) -> set[str]:
        return set(self.repos.get(repo_id, {}))

    def text(self, repo_id: str, path: str) -> str:
        return self.repos[repo_id][path].decode("utf-8")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub(tmp_path / "fake_hub")

    def method(name):
        return lambda api, *args, **kwargs: getattr(hub, name)(api, *args, **kwargs)

    for name in ("create_repo", "create_commit", "file_exists"):
        monkeypatch.setattr(HfApi, name, method(name))
    monkeypatch.setattr(HfApi, "create_branch", lambda api, *args, **kwargs: None)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda api, content, **kwargs: ModelCard(content))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    # upload_folder's single-commit path (the xet pipeline would pre-upload over HTTP before create_commit)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)

    def no_network(sock, address, *args, **kwargs):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return real_connect(sock, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return hub
