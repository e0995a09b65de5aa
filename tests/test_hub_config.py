"""``SparsifyConfig`` like a PEFT config: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (docs/hub.md)."""

from __future__ import annotations

import json
import math

import pytest

from hf_chts import SparsifyConfig
from hf_chts.checkpointing.format import CONFIG_FILE

from hub_stub import fake_hub  # noqa: F401  (fixture)

CONFIGS = [
    SparsifyConfig(),
    SparsifyConfig(method="chts", target_density=0.1, init="bsw", init_beta=0.5, target_modules=["q_proj", "up_proj"],
                   removal_delta_end=1.0, regrowth_temperature=math.inf, seed=7),
    SparsifyConfig(method="cht", target_density=0.05, parity=True, exclude_modules=r".*\.0\..*", update_interval=3),
    SparsifyConfig(method="gmp", target_density=0.2, decay_start_fraction=0.1, update_end_fraction=0.5),
    SparsifyConfig(method="dense"),
]


def test_file_name_is_the_checkpoint_formats():
    assert SparsifyConfig.config_file_name == CONFIG_FILE
    assert "config_file_name" not in SparsifyConfig().to_dict()  # a class attribute, not a field


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_save_pretrained_round_trips_exactly(tmp_path, config):
    folder = config.save_pretrained(tmp_path / "cfg")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE]
    again = SparsifyConfig.from_pretrained(folder)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert json.loads((folder / CONFIG_FILE).read_text()) == json.loads(config.to_json_string())


def test_save_and_load_stay_file_level_aliases(tmp_path):
    config = CONFIGS[1]
    config.save(tmp_path / "x.json")
    assert SparsifyConfig.load(tmp_path / "x.json") == config
    assert SparsifyConfig.from_pretrained(tmp_path / "x.json") == config


def test_from_pretrained_reads_the_config_of_a_sparse_checkpoint(tmp_path):
    config = CONFIGS[2]
    record = {"format_version": 1, "config": config.to_dict(), "summary": {}, "engine": None}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    assert SparsifyConfig.from_pretrained(tmp_path) == config


@pytest.mark.parametrize("content, message", [
    ('{"method": "chtss", "target_dens', "not valid JSON"),
    ('[1, 2]', "expected a JSON object of SparsifyConfig fields, got list"),
    ('{"target_density": "0.3"}', "SparsifyConfig.target_density='0.3' is invalid"),
    ('{"update_intervall": 10}', "unknown SparsifyConfig field.*did you mean 'update_interval'"),
    ('{"format_version": 1, "config": 3}', "field 'config' must be an object"),
    ('{"format_version": 1, "config": {"seed": -1}}', "SparsifyConfig.seed=-1 is invalid"),
])
def test_from_pretrained_validates_and_names_file_and_field(tmp_path, content, message):
    (tmp_path / CONFIG_FILE).write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        SparsifyConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(error.value)


def test_from_pretrained_missing_folder_file_or_repo(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_FILE}"):
        SparsifyConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparsifyConfig.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=f"could not get {CONFIG_FILE} of 'org/missing'"):
        SparsifyConfig.from_pretrained("org/missing")


def test_save_pretrained_refuses_to_replace_a_checkpoint_record(tmp_path):
    (tmp_path / "sparsity.safetensors").write_bytes(b"masks")
    record = '{"format_version": 1, "config": {}, "engine": {"completed_steps": 5}}'
    (tmp_path / CONFIG_FILE).write_text(record)
    with pytest.raises(ValueError, match="belongs to the sparse checkpoint"):
        SparsifyConfig().save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_FILE).read_text() == record


def test_push_to_hub_and_from_pretrained_through_the_hub(tmp_path, fake_hub):
    config = CONFIGS[1]
    config.push_to_hub("me/sparse-config")
    assert fake_hub.files("me/sparse-config") == {CONFIG_FILE}
    assert fake_hub.commits[-1]["message"] == "Upload SparsifyConfig"
    assert SparsifyConfig.from_pretrained("me/sparse-config", revision="main") == config
    config.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/other")
    assert SparsifyConfig.from_pretrained("me/other") == config


def test_push_to_hub_refuses_a_repo_holding_a_checkpoint(fake_hub):
    fake_hub.repos["me/model"] = {"sparsity.safetensors": b"", CONFIG_FILE: b"{}"}
    with pytest.raises(ValueError, match="holds a sparse checkpoint"):
        SparsifyConfig().push_to_hub("me/model")
    assert fake_hub.repos["me/model"][CONFIG_FILE] == b"{}"
