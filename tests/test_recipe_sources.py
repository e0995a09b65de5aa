"""Recipes take any model and any data (issue 19 item 5): ``model.name_or_path`` (a config folder of any
registered family) with overrides, ``data.data_files`` (jsonl / parquet / text), ``save_to_disk`` folders,
and packing through ``datasets.map`` (batched, file-backed, cached by fingerprint). All files are made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hf_chts import recipe as R
from hf_chts.model import select_modules, sparsify

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda river stone cloud light".split()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """``datasets``' cache in the test's folder (load_dataset / map write there, never the user's cache)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    return tmp_path / "hf_datasets_cache"


def documents(count: int, start: int = 0) -> list[str]:
    return [f"Document {n}: " + " ".join(WORDS[(n * 7 + i) % len(WORDS)] for i in range(10 + n % 5)) + "."
            for n in range(start, start + count)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for n, doc in enumerate(docs):
            handle.write(json.dumps({"id": n, "content": doc}) + "\n")
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"content": docs, "id": list(range(len(docs)))}).to_parquet(str(path))
    return path


def recipe_dict(tmp_path: Path, data: dict, model: dict | None = None) -> dict:
    return {
        "run": {"output_dir": str(tmp_path / "run")},
        "data": {"block_size": 16, "validation_fraction": 0.2, **data},
        "tokenizer": {"train_bpe": {"vocab_size": 300}, "cache_dir": str(tmp_path / "tokcache")},
        "model": model or {"preset": "llama-tiny", "hidden_size": 32, "intermediate_size": 64},
        "sparsify": {"method": "chtss", "target_density": 0.5, "update_interval": 2},
        "training": {"max_steps": 4, "per_device_train_batch_size": 2},
    }


def load(tmp_path: Path, raw: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return R.load_recipe(path)


def config_folder(tmp_path: Path, model_type: str) -> Path:
    """A small transformers config folder (config.json only) of a family hf_chts registers."""
    from transformers import AutoConfig

    small = {"gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=400),
             "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=400, max_position_embeddings=64),
             "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=400, max_position_embeddings=64),
             "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=400)}
    folder = tmp_path / f"{model_type}-config"
    AutoConfig.for_model(model_type, **small[model_type]).save_pretrained(str(folder))
    return folder


# --------------------------------------------------------------------------- data
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_data_files_jsonl_and_parquet_load_split_and_pack(tmp_path, fmt):
    docs = documents(60)
    write = write_jsonl if fmt == "jsonl" else write_parquet
    write(tmp_path / "data" / f"a.{fmt}", docs[:30])
    write(tmp_path / "data" / f"b.{fmt}", docs[30:])
    recipe = load(tmp_path, recipe_dict(tmp_path, {"data_files": [str(tmp_path / "data" / f"*.{fmt}")],
                                                   "text_column": "content"}))
    assert len(recipe.data.data_files) == 2  # the glob resolved
    corpus = R.load_corpus(recipe)
    train, validation = list(corpus.train["text"]), list(corpus.validation["text"])
    assert sorted(train + validation) == sorted(docs) and not set(train) & set(validation)
    assert corpus.train.column_names == ["text"]
    tokenizer = R.build_tokenizer(recipe, corpus)
    data = R.build_lm_datasets(recipe, tokenizer, corpus)
    stream = [t for text in train for t in tokenizer(text, add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id]]
    blocks = [row["input_ids"] for row in data.train]
    assert blocks and all(len(block) == 16 for block in blocks)
    assert [t for block in blocks for t in block] == stream[: len(blocks) * 16]
    assert data.stats["train_tokens"] == len(stream)
    assert data.train.cache_files, "the packed blocks are an in-memory array, not datasets' on-disk cache"


def test_text_data_files_split_by_paragraph(tmp_path):
    docs = documents(20)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    recipe = load(tmp_path, recipe_dict(tmp_path, {"data_files": [str(tmp_path / "data" / "corpus.txt")]}))
    corpus = R.load_corpus(recipe)
    assert sorted(list(corpus.train["text"]) + list(corpus.validation["text"])) == sorted(docs)


def test_save_to_disk_folder_with_its_splits(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": documents(40)}),
        "validation": datasets.Dataset.from_dict({"content": documents(8, start=100)}),
    }).save_to_disk(str(saved))
    raw = recipe_dict(tmp_path, {"dataset": str(saved), "text_column": "content", "validation_split": "validation"})
    corpus = R.load_corpus(load(tmp_path, raw))
    assert sorted(corpus.train["text"]) == sorted(documents(40))
    assert sorted(corpus.validation["text"]) == sorted(documents(8, start=100))
    raw["data"]["validation_split"] = "valid"
    with pytest.raises(ValueError, match=r"recipe.yaml: data.validation_split = 'valid' is not a split .*validation"):
        R.load_corpus(load(tmp_path, raw))


def test_a_missing_text_column_names_the_file_the_field_and_the_columns(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", documents(10))
    recipe = load(tmp_path, recipe_dict(tmp_path, {"data_files": [str(tmp_path / "corpus.jsonl")],
                                                   "text_column": "contents"}))
    with pytest.raises(ValueError, match=r"recipe.yaml: data.text_column = 'contents' is not a column of .*"
                                         r"one of the columns: id, content.*did you mean 'content'"):
        R.load_corpus(recipe)
    with pytest.raises(FileNotFoundError, match=r"recipe.yaml: data.data_files: .*nothing.*\.jsonl.*matches no file"):
        load(tmp_path, recipe_dict(tmp_path, {"data_files": [str(tmp_path / "nothing*.jsonl")]}))


def test_packing_is_batched_file_backed_and_cached_by_fingerprint(tmp_path, monkeypatch):
    """Memory holds one batch of documents at a time, and a second build reads the packed blocks from the cache."""
    write_jsonl(tmp_path / "data" / "corpus.jsonl", documents(120))
    recipe = load(tmp_path, recipe_dict(tmp_path, {"data_files": [str(tmp_path / "data" / "corpus.jsonl")],
                                                   "text_column": "content"}))
    corpus = R.load_corpus(recipe)
    tokenizer = R.build_tokenizer(recipe, corpus)
    data = R.build_lm_datasets(recipe, tokenizer, corpus)
    files = [entry["filename"] for entry in data.train.cache_files]
    assert files and all(Path(name).is_file() for name in files), "the packed blocks are not in datasets' cache"
    stamps = {name: Path(name).stat().st_mtime_ns for name in files}
    again = R.build_lm_datasets(recipe, tokenizer, R.load_corpus(recipe))
    assert [entry["filename"] for entry in again.train.cache_files] == files  # the same fingerprint
    assert {name: Path(name).stat().st_mtime_ns for name in files} == stamps  # read back, not rewritten
    assert [row["input_ids"] for row in again.train] == [row["input_ids"] for row in data.train]

    seen = []
    real_pack = R.data.pack_blocks

    def recording_pack(token_lists, block_size):
        seen.append(len(token_lists))
        return real_pack(token_lists, block_size)

    monkeypatch.setattr(R.data, "PACK_BATCH_DOCUMENTS", 10)
    monkeypatch.setattr(R.data, "pack_blocks", recording_pack)  # another function: packed afresh
    small_batches = R.build_lm_datasets(recipe, tokenizer, corpus)
    assert seen and max(seen) <= 10, f"packing saw {max(seen)} documents at once"
    assert all(len(row["input_ids"]) == 16 for row in small_batches.train)


@pytest.mark.parametrize(("data", "message"), [
    ({"data_files": ["corpus.xlsx"]}, r"data.data_files: 'corpus.xlsx' has no known data file extension"),
    ({"data_files": ["a.jsonl", "b.parquet"]}, r"data.data_files mixes formats: json \('a.jsonl'\), parquet"),
    ({"data_files": ["a.jsonl"], "validation_split": "test"}, r"data.validation_split = 'test' names a split"),
    ({"data_files": ["a.jsonl"], "builtin": "pydoc_topics"}, r"exactly one of .*data.data_files.* \(got builtin, "
                                                             r"data_files\)"),
])
def test_bad_data_values_name_the_file_and_field(tmp_path, data, message):
    raw = recipe_dict(tmp_path, data)
    with pytest.raises(ValueError, match=message) as error:
        load(tmp_path, raw)
    assert str(tmp_path / "recipe.yaml") in str(error.value)


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("model_type", ["gpt2", "qwen2", "mistral"])
def test_name_or_path_config_folder_of_a_registered_family(tmp_path, model_type):
    (tmp_path / "corpus.jsonl").parent.mkdir(exist_ok=True)
    write_jsonl(tmp_path / "corpus.jsonl", documents(40))
    folder = config_folder(tmp_path, model_type)
    overrides = {"n_inner": 48} if model_type == "gpt2" else {"rms_norm_eps": 1e-5}
    model_section = {"name_or_path": str(folder), "num_hidden_layers": 1, "config_overrides": overrides}
    recipe = load(tmp_path, recipe_dict(tmp_path, {"data_files": [str(tmp_path / "corpus.jsonl")],
                                                   "text_column": "content"}, model_section))
    assert recipe.model.preset is None
    tokenizer = R.build_tokenizer(recipe, R.load_corpus(recipe))
    model = R.build_model(recipe, tokenizer)
    assert model.config.model_type == model_type and model.config.num_hidden_layers == 1
    assert model.config.vocab_size == 400 and model.config.eos_token_id == tokenizer.eos_token_id
    for key, value in overrides.items():
        assert getattr(model.config, key) == value
    sparsify(model, R.sparsify_config(recipe))
    assert select_modules(model, R.sparsify_config(recipe))  # the family's decoder linears are sparsified


def test_model_values_are_checked_with_the_file_field_and_fix(tmp_path):
    folder = config_folder(tmp_path, "gpt2")
    data = {"builtin": "pydoc_topics"}
    recipe_file = str(tmp_path / "recipe.yaml")
    cases = [
        ({"name_or_path": str(folder), "config_overrides": {"n_innr": 64}},
         ValueError, r"model.config_overrides.n_innr: the gpt2 config has no setting 'n_innr'.*n_inner"),
        ({"name_or_path": str(folder), "intermediate_size": 64},
         ValueError, r"model.intermediate_size: the gpt2 config has no setting .*model.config_overrides"),
        ({"name_or_path": str(folder), "preset": "llama-tiny"}, ValueError,
         r"set exactly one of model.preset .* and model.name_or_path"),
        ({"name_or_path": str(tmp_path / "no-such-config")}, FileNotFoundError,
         r"model.name_or_path = .*no-such-config': no such folder"),
        ({"name_or_path": str(tmp_path)}, FileNotFoundError, r"is a folder without a config.json"),
        ({"name_or_path": str(config_folder(tmp_path, "opt"))}, ValueError,
         r"is a 'opt' model, a family hf_chts does not register; use one of .*gpt2.*llama"),
        ({"name_or_path": str(folder), "config_overrides": {"n_head": 5}}, ValueError,
         r"section 'model': the gpt2 model cannot be built"),
        ({"preset": "llama-tiny", "config_overrides": {"rope_thetaa": 1.0}}, ValueError,
         r"model.config_overrides.rope_thetaa: the llama config has no setting"),
        ({"name_or_path": str(folder), "max_position_embeddings": 8}, ValueError,
         r"model.max_position_embeddings = 8 .* is below data.block_size = 16; raise it or lower"),
    ]
    for model, kind, message in cases:
        with pytest.raises(kind, match=message) as error:
            load(tmp_path, recipe_dict(tmp_path, data, model))
        assert recipe_file in str(error.value), str(error.value)


def test_config_overrides_from_the_command_line_are_json(tmp_path):
    folder = config_folder(tmp_path, "gpt2")
    path = tmp_path / "recipe.yaml"
    raw = recipe_dict(tmp_path, {"builtin": "pydoc_topics"}, {"preset": "llama-tiny"})
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    recipe = R.load_recipe(path, ["--model.preset", "null", "--model.name_or_path", str(folder),
                                  "--model.config_overrides", '{"n_inner": 40}'])
    assert recipe.model.config_overrides == {"n_inner": 40}
    with pytest.raises(ValueError, match=r"model.config_overrides = '\{n_inner' has the wrong type"):
        R.load_recipe(path, ["--model.config_overrides", "{n_inner"])


@pytest.mark.slow  # a few training steps end to end
def test_gpt2_config_folder_on_parquet_trains_end_to_end(tmp_path):
    from hf_chts import load_sparse, sparsity_report

    write_parquet(tmp_path / "data" / "corpus.parquet", documents(80))
    model_section = {"name_or_path": str(config_folder(tmp_path, "gpt2"))}
    raw = recipe_dict(tmp_path, {"data_files": [str(tmp_path / "data" / "corpus.parquet")],
                                 "text_column": "content"}, model_section)
    raw["eval"] = {"check_reload": True}
    summary = R.run_recipe(load(tmp_path, raw))
    assert summary["steps"] == 4 and summary["reload_check"]["match"] is True
    model = load_sparse(str(tmp_path / "run" / R.FINAL_DIR))
    assert model.config.model_type == "gpt2"
    assert sparsity_report(model).density == pytest.approx(summary["final_density"], abs=1e-9)
