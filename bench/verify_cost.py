"""Cost of checkpoint verification on this machine: SHA-256 (``verify="full"``) vs the header check
(``verify="fast"``) per GiB, and ``load_sparse`` of a ~0.6 GiB LLaMA-shaped checkpoint in both modes
(docs/checkpoint-format.md#71-save-id-and-manifest).

    python bench/verify_cost.py [--folder /tmp/verify-cost] [--repeats 3]

Writes a 1 GiB safetensors file and a checkpoint into ``--folder`` and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers
    from safetensors.torch import save_file

    from hf_chts import SparsifyConfig, load_sparse, save_sparse, sparsify
    from hf_chts.checkpointing import manifest
    from hf_chts.checkpointing.format import read_safetensors_metadata

    root = Path(args.folder or tempfile.mkdtemp(prefix="verify-cost-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        big = root / "one-gib.safetensors"
        save_file({"w": torch.zeros(2**28, dtype=torch.float32)}, str(big))
        gib = big.stat().st_size / 2**30
        for _ in range(args.repeats):
            manifest.clear_digest_cache()  # measure the hash, not the per-process cache
            start = time.perf_counter()
            manifest.file_digest(big)
            full = time.perf_counter() - start
            start = time.perf_counter()
            read_safetensors_metadata(big)
            fast = time.perf_counter() - start
            print(f"SHA-256 {full / gib:.2f} s/GiB   header check {fast * 1000:.1f} ms per file")
        big.unlink()

        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                          num_attention_heads=16, num_key_value_heads=8, vocab_size=32000)
        model = sparsify(transformers.AutoModelForCausalLM.from_config(config),
                         SparsifyConfig(method="chts", target_density=0.3))
        folder = root / "checkpoint"
        save_sparse(model, folder)
        del model
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**30
        for _ in range(args.repeats):
            for mode in ("full", "fast"):
                manifest.clear_digest_cache()
                start = time.perf_counter()
                load_sparse(folder, verify=mode)
                took = time.perf_counter() - start
                print(f"load_sparse of a {size:.2f} GiB checkpoint, verify={mode}: {took:.2f} s")
    finally:
        if args.folder is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
