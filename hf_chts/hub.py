"""Hub I/O for configs: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (docs/hub.md).

:class:`ConfigHubMixin` gives a JSON-serialisable config class (one with
``to_dict`` / ``from_dict`` and a ``config_file_name``) the methods PEFT's
``PeftConfig`` has, built on ``huggingface_hub`` (``hf_hub_download``,
``HfApi.create_repo`` / ``upload_folder``). It does not subclass
``huggingface_hub.ModelHubMixin`` because that mixin's ``save_pretrained``
deletes the folder's ``config.json`` and writes a generic ``README.md`` —
wrong for a config saved beside a model — nor ``transformers.utils.PushToHubMixin``
because its ``push_to_hub`` writes a generic transformers model card into the repo.

This module imports only :mod:`hf_chts.io_utils` (``config.py`` imports it) and
``huggingface_hub`` only when a method runs, so ``import hf_chts`` stays light.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .io_utils import atomic_write_text, looks_like_local_path

# A file of the sparse checkpoint format (docs/checkpoint-format.md); a folder holding it is a checkpoint.
MASKS_FILE_NAME = "sparsity.safetensors"


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None) -> Any:
    """Create the Hub repo if needed and upload ``folder`` in one commit (``HfApi.upload_folder``).

    Returns the ``CommitInfo`` of the upload. Hidden files (``.*``: staging folders,
    temp files) are never uploaded.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision, create_pr=create_pr,
        commit_message=commit_message or "Upload with hf_chts", allow_patterns=allow_patterns,
        ignore_patterns=[".*", ".*/**", *(ignore_patterns or [])],
    )


class ConfigHubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a JSON config class.

    The subclass provides ``config_file_name`` (class attribute), ``to_dict()``
    and ``from_dict(data)`` (which validates and raises ``ValueError`` naming the field).
    """

    config_file_name: str = "config.json"

    # ------------------------------------------------------------------ save
    def save_pretrained(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                        repo_id: str | None = None, **push_to_hub_kwargs) -> Path:
        """Write ``<save_directory>/<config_file_name>`` (JSON, atomically); optionally push the folder.

        Refuses to replace the config record of a sparse checkpoint (a folder
        holding ``sparsity.safetensors``): that file also carries the checkpoint's
        engine state and summary (docs/checkpoint-format.md).
        """
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file; save_pretrained needs a folder")
        file = folder / self.config_file_name
        if (folder / MASKS_FILE_NAME).exists() and file.exists():
            raise ValueError(
                f"{file} belongs to the sparse checkpoint in {folder} (it also records the engine state); "
                "save the config into another folder, or save the model with hf_chts.save_sparse"
            )
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        if push_to_hub:
            self.push_to_hub(repo_id or folder.resolve().name, **push_to_hub_kwargs)
        return folder

    # ------------------------------------------------------------------ load
    @classmethod
    def from_file(cls, file: str | os.PathLike):
        """Read and validate a config file; errors name the file and the field.

        Accepts the plain config written by :meth:`save_pretrained` and the
        ``sparsify_config.json`` record of a sparse checkpoint (its ``"config"`` object).
        """
        file = Path(file)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not valid JSON ({error}); the file may be truncated or corrupted") from error
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object of {cls.__name__} fields, got {type(data).__name__}")
        if "format_version" in data or "config" in data:  # the record of a sparse checkpoint
            if not isinstance(data.get("config"), dict):
                raise ValueError(f"{file}: field 'config' must be an object of {cls.__name__} fields; "
                                 "the checkpoint record is corrupted — re-save the checkpoint")
            data = data["config"]
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{file}: {error}") from error

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, force_download: bool = False, subfolder: str | None = None):
        """Load the config from a folder (a config or a sparse checkpoint) or a Hub repo id.

        A repo id downloads only ``<config_file_name>`` (``hf_hub_download``, honouring
        ``HF_HUB_OFFLINE`` and the cache); ``revision`` is a branch, tag or commit.
        """
        local = Path(name_or_path).expanduser()
        if subfolder:
            local = local / subfolder
        if local.is_dir():
            file = local / cls.config_file_name
            if not file.is_file():
                raise FileNotFoundError(f"{local} has no {cls.config_file_name}; save one with save_pretrained")
            return cls.from_file(file)
        if local.exists():
            return cls.from_file(local)  # a path to the file itself
        text = str(name_or_path)
        if looks_like_local_path(text):
            raise FileNotFoundError(f"no such folder {text!r}: it does not exist (a Hub repo id is 'org/name')")
        from huggingface_hub import hf_hub_download

        try:
            file = hf_hub_download(repo_id=text, filename=cls.config_file_name, subfolder=subfolder,
                                   revision=revision, token=token, cache_dir=cache_dir,
                                   local_files_only=local_files_only, force_download=force_download)
        except Exception as error:  # huggingface_hub raises many kinds (not found, offline, auth)
            raise FileNotFoundError(
                f"could not get {cls.config_file_name} of {text!r}"
                f"{f' at revision {revision!r}' if revision else ''} from the Hugging Face Hub or its cache: "
                f"{type(error).__name__}: {error}"
            ) from error
        return cls.from_file(file)

    # ------------------------------------------------------------------ push
    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    revision: str | None = None, commit_message: str | None = None, create_pr: bool = False) -> Any:
        """Upload ``<config_file_name>`` alone to the Hub repo ``repo_id`` (created if needed).

        Refuses a repo holding a sparse checkpoint, whose config file is part of the checkpoint.
        """
        from huggingface_hub import HfApi

        if HfApi(token=token).file_exists(repo_id, MASKS_FILE_NAME, revision=revision):
            raise ValueError(
                f"the Hub repo {repo_id!r} holds a sparse checkpoint ({MASKS_FILE_NAME}); its "
                f"{self.config_file_name} is part of it: push the model with hf_chts.save_sparse(..., push_to_hub=True)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                               commit_message=commit_message or f"Upload {type(self).__name__}",
                               allow_patterns=[self.config_file_name])
