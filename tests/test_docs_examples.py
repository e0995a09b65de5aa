"""The Python examples of docs/ run as written, on a checkpoint made here (no download)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import transformers

import hf_chts
from hf_chts import SparsifyConfig, sparsify
from hf_chts.recipe import train_bpe_tokenizer

DOCS = Path(__file__).resolve().parents[1] / "docs"


def first_python_block(page: str) -> str:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S)[0]


def test_inference_page_example_runs(tmp_path):
    """docs/inference.md's first example defines everything it uses (it once called generate on an
    undefined ``input_ids``)."""
    texts = [f"The for statement number {n} loops over the items of a sequence in order." for n in range(200)]
    tokenizer, _, _ = train_bpe_tokenizer(lambda: iter(texts), 300, 2, tmp_path / "tok")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=len(tokenizer),
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config)
    sparsify(model, SparsifyConfig(method="chts", target_density=0.1, init="er"))
    folder = tmp_path / "final"
    hf_chts.save_sparse(model, folder, tokenizer=tokenizer)

    code = first_python_block("inference.md")
    assert '"runs/tiny-llama-cpu/final"' in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace('"runs/tiny-llama-cpu/final"', repr(str(folder))), "inference.md", "exec"), {})
    assert printed.getvalue().startswith("The for statement")


def test_bench_readme_has_no_internal_references_and_numbers_its_sections_in_order():
    """bench/README.md is for readers of the repository: no internal issue numbers or paths of the machine
    it ran on, one transformers version, sections numbered in the order they appear, no stale line numbers."""
    text = (DOCS.parent / "bench" / "README.md").read_text(encoding="utf-8")
    assert not re.findall(r"\bissues? \d+", text)
    assert not re.findall(r"(?<![\w.])/(?:work|tmp|home|root)/", text)
    assert len(set(re.findall(r"transformers (\d+\.\d+(?:\.\d+)?)", text))) == 1
    assert not re.findall(r"\bl\.\d+", text)  # line numbers of code that has moved on
    numbers = [int(n) for n in re.findall(r"^## (\d+)\.", text, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1))
