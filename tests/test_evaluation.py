"""lm-eval on sparse checkpoints: local tasks, `hf-chts eval`, and the stock `lm_eval` CLI."""

import glob
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_chts import SparsifyConfig, sparsify, sparsity_report
from hf_chts.checkpoint import load_sparse, save_sparse
from hf_chts.cli import main as cli_main
from hf_chts.evaluation import evaluate_model, finite_metrics, write_local_tasks

PREFIX = "hfchts_test"
CHOICE, PERPLEXITY = f"{PREFIX}_choice", f"{PREFIX}_perplexity"
LIMIT = "8"


def heldout_texts(count=24, words=40):
    from pydoc_data.topics import topics

    texts = [" ".join(text.split()[:words]) for _, text in sorted(topics.items())]
    return [text for text in texts if len(text.split()) == words][:count]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A sparse tiny LLaMA (byte-level tokenizer) saved dense and compact, plus local tasks."""
    import transformers

    root = tmp_path_factory.mktemp("evaluation")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=384, max_position_embeddings=512)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    sparsify(model, SparsifyConfig(method="chts", target_density=0.3))
    layer = model.model.layers[0].mlp.down_proj  # some dead neurons so ANP < 1 is visible
    layer.set_mask(layer.mask & (torch.arange(layer.mask.shape[1]) >= 10)[None, :])
    tokenizer = transformers.ByT5Tokenizer()
    save_sparse(model, root / "dense", tokenizer=tokenizer)
    save_sparse(model, root / "compact", tokenizer=tokenizer, compact=True)
    names = write_local_tasks(root / "tasks", heldout_texts(), prefix=PREFIX)
    return {"root": root, "model": model, "tokenizer": tokenizer, "tasks": root / "tasks", "names": names}


def run_hf_chts_eval(workspace, checkpoint, output, tasks=(CHOICE, PERPLEXITY), extra=()):
    """`hf-chts eval ... --output-path <name>.json`: lm-eval's EvaluationTracker writes <name>_<time>.json."""
    output = Path(output)
    before = set(output.parent.glob(f"{output.stem}_*.json"))
    code = cli_main(["eval", str(checkpoint), "--tasks", ",".join(tasks), "--include-path", str(workspace["tasks"]),
                     "--output-path", str(output), "--batch-size", "4", "--limit", LIMIT, *extra])
    assert code == 0
    (written,) = set(output.parent.glob(f"{output.stem}_*.json")) - before
    return json.loads(written.read_text())


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def hf_chts_results(workspace):
    before = folder_bytes(workspace["root"] / "dense")
    results = run_hf_chts_eval(workspace, workspace["root"] / "dense", workspace["root"] / "dense_results.json")
    workspace["dense_unchanged"] = folder_bytes(workspace["root"] / "dense") == before
    return results


def check_scores(results):
    choice, perplexity = results["results"][CHOICE], results["results"][PERPLEXITY]
    assert 0.0 <= choice["acc,none"] <= 1.0 and 0.0 <= choice["acc_norm,none"] <= 1.0
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(perplexity[metric]) and perplexity[metric] > 0, metric
    assert results["n-samples"][CHOICE]["effective"] == int(LIMIT)


def test_write_local_tasks(workspace):
    names = workspace["names"]
    assert names == [CHOICE, PERPLEXITY]
    choice = yaml.safe_load((workspace["tasks"] / f"{CHOICE}.yaml").read_text())
    perplexity = yaml.safe_load((workspace["tasks"] / f"{PERPLEXITY}.yaml").read_text())
    assert choice["output_type"] == "multiple_choice" and perplexity["output_type"] == "loglikelihood_rolling"
    for config in (choice, perplexity):
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert config["dataset_path"] == "json" and data.is_absolute() and data.exists()
    documents = [json.loads(line) for line in Path(choice["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    texts = heldout_texts()
    assert len(documents) == len(texts)
    for document, text in zip(documents, texts):
        assert len(document["choices"]) == 4 and len(set(document["choices"])) == 4
        assert text.startswith(document["context"] + document["choices"][document["label"]])
    with pytest.raises(ValueError, match="needs at least 4"):
        write_local_tasks(workspace["root"] / "few", texts[:3], prefix="few")


def test_hf_chts_eval_reports_scores_density_and_anp(workspace, hf_chts_results, capsys):
    check_scores(hf_chts_results)
    report = sparsity_report(load_sparse(workspace["root"] / "dense"))
    summary = hf_chts_results["hf_chts"]
    assert summary["density"] == pytest.approx(report.density) and summary["anp"] == pytest.approx(report.anp)
    assert summary["anp"] < 1.0 and summary["method"] == "chts"
    assert CHOICE in hf_chts_results["configs"] and "versions" in hf_chts_results
    assert workspace["dense_unchanged"], "hf-chts eval without --update-card modified the checkpoint"
    card = (workspace["root"] / "dense" / "README.md").read_text()
    assert f"| {CHOICE} | acc |" not in card

    compact = run_hf_chts_eval(workspace, workspace["root"] / "compact", workspace["root"] / "compact.json", (CHOICE,))
    assert compact["results"][CHOICE]["acc,none"] == hf_chts_results["results"][CHOICE]["acc,none"]
    assert compact["hf_chts"]["density"] == pytest.approx(report.density)
    table = capsys.readouterr().out
    assert "acc" in table and f"density {report.density:.4f}" in table and f"ANP {report.anp:.4f}" in table
    assert "|Tasks|Version|Filter|n-shot|Metric|" in table.replace(" ", "")  # lm-eval's own table
    assert hf_chts_results["hf_chts"]["device"] == "cpu" and hf_chts_results["hf_chts"]["dtype"] == "torch.float32"
    assert hf_chts_results["model_name"] == str(workspace["root"] / "dense")  # lm-eval's tracker fields


def test_eval_model_args_like_lm_eval(workspace, hf_chts_results, tmp_path, capsys):
    bf16 = run_hf_chts_eval(workspace, workspace["root"] / "dense", tmp_path / "bf16.json", (CHOICE,),
                            extra=("--model-args", "dtype=bfloat16,device=cpu"))
    assert bf16["hf_chts"]["dtype"] == "torch.bfloat16" and bf16["hf_chts"]["device"] == "cpu"
    assert bf16["config"]["model_args"].endswith("dtype=bfloat16,device=cpu")
    assert 0.0 <= bf16["results"][CHOICE]["acc,none"] <= 1.0
    for bad, message in (("dtype=float99", "is not a torch dtype"), ("precision=16", "unknown key(s) precision")):
        assert cli_main(["eval", str(workspace["root"] / "dense"), "--tasks", CHOICE, "--model-args", bad]) == 2
        assert message in capsys.readouterr().err


def test_best_device_prefers_a_gpu(monkeypatch):
    import hf_chts.evaluation as evaluation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert evaluation.best_device() == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert evaluation.best_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation.best_device() == "cuda"


def test_hf_chts_eval_inference_scores_like_the_masked_model(workspace, hf_chts_results):
    results = run_hf_chts_eval(workspace, workspace["root"] / "compact", workspace["root"] / "inference.json",
                               extra=("--inference", "--kernel", "csr"))
    for task in (CHOICE, PERPLEXITY):
        for metric, value in finite_metrics(hf_chts_results)[task].items():
            assert finite_metrics(results)[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    summary, expected = results["hf_chts"], hf_chts_results["hf_chts"]
    assert summary["inference_kernel"] == "csr" and summary["csr_layers"] == summary["layers"] > 0
    for key in ("density", "anp", "live_links", "total_links", "method"):
        assert summary[key] == pytest.approx(expected[key]) if key != "method" else summary[key] == expected[key]


def test_evaluate_model_in_memory_and_off_main(workspace, hf_chts_results, monkeypatch):
    import hf_chts.checkpointing.saving as checkpoint

    results = evaluate_model(workspace["model"], workspace["tokenizer"], [CHOICE], include_path=workspace["tasks"],
                             batch_size=4, limit=int(LIMIT))
    assert results["results"][CHOICE]["acc,none"] == hf_chts_results["results"][CHOICE]["acc,none"]
    assert results["hf_chts"]["density"] == pytest.approx(hf_chts_results["hf_chts"]["density"])
    monkeypatch.setattr(checkpoint, "is_main_process", lambda: False)
    assert evaluate_model(workspace["model"], workspace["tokenizer"], [CHOICE]) is None


@pytest.mark.slow
def test_stock_lm_eval_cli_on_sparse_checkpoint(workspace, hf_chts_results, tmp_path):
    lm_eval = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval), "run", "--model", "hf", "--model_args",
               f"pretrained={workspace['root'] / 'dense'},dtype=float32", "--tasks", f"{CHOICE},{PERPLEXITY}",
               "--include_path", str(workspace["tasks"]), "--device", "cpu", "--batch_size", "4", "--limit", LIMIT,
               "--output_path", str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    files = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    assert len(files) == 1, done.stdout[-2000:]
    results = json.loads(Path(files[0]).read_text())
    check_scores(results)
    # same model, same documents: the stock harness and hf-chts eval agree
    for task in (CHOICE, PERPLEXITY):
        for metric, value in results["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert value == pytest.approx(hf_chts_results["results"][task][metric], rel=1e-4), (task, metric)


def test_eval_default_output_is_outside_the_checkpoint_and_update_card_commits(workspace, tmp_path, monkeypatch,
                                                                              caplog):
    import logging
    import shutil

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(workspace["root"] / "dense", checkpoint)
    monkeypatch.chdir(tmp_path)
    args = ["eval", str(checkpoint), "--tasks", CHOICE, "--include-path", str(workspace["tasks"]), "--batch-size", "4",
            "--limit", LIMIT]
    assert cli_main([*args, "--output-path", str(checkpoint / "results.json")]) == 2  # never into the checkpoint
    assert cli_main([*args, "--update-card"]) == 0
    (written,) = (tmp_path / "eval_results").rglob("results_*.json")  # the default: ./eval_results
    acc = json.loads(written.read_text())["results"][CHOICE]["acc,none"]
    assert not list(checkpoint.glob("results*"))
    card = (checkpoint / "README.md").read_text()
    assert f"| {CHOICE} | acc | {acc:.4f} |" in card
    with caplog.at_level(logging.WARNING):  # the card is part of a save: loading verifies it without a warning
        load_sparse(checkpoint)
    assert not [r for r in caplog.records if "README" in r.getMessage()], caplog.text


def test_local_task_yaml_loads_without_lm_eval_warnings(workspace, caplog):
    import logging

    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(workspace["tasks"]), include_defaults=False)
    with caplog.at_level(logging.WARNING, logger="lm_eval"):
        tasks = manager.load([CHOICE, PERPLEXITY])
    assert tasks
    lm_eval_warnings = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")
                        and r.levelno >= logging.WARNING]
    assert not lm_eval_warnings, lm_eval_warnings


@pytest.mark.slow
def test_eval_refuses_an_unknown_task_before_loading_the_model(workspace, monkeypatch, capsys):
    import hf_chts.checkpoint as checkpoint

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(checkpoint, "load_sparse", must_not_load)  # what `hf-chts eval` loads with
    code = cli_main(["eval", str(workspace["root"] / "dense"), "--tasks", f"{CHOICE},hfchts_no_such_task",
                     "--include-path", str(workspace["tasks"])])
    assert code == 2
    assert "unknown lm-eval task(s) ['hfchts_no_such_task']" in capsys.readouterr().err
