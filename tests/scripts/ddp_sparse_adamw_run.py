"""A hand-written Accelerate loop under DDP, once with torch.optim.AdamW and once with hf_chts.SparseAdamW;
launched by tests/test_sparse_adamw.py with 2 processes. Writes <output>/weights-rank<r>.pt."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from hf_chts import SparseAdamW, SparsifyConfig, sparsify  # noqa: E402
from hf_chts.engine import SparseTrainingEngine  # noqa: E402


def train(accelerator: Accelerator, optimizer_cls) -> dict:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=32, bos_token_id=0, eos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    sparsify(model, SparsifyConfig(method="chtss", target_density=0.3, update_interval=3, seed=0))
    model, optimizer = accelerator.prepare(model, optimizer_cls(model.parameters(), lr=1e-2, weight_decay=0.1,
                                                                foreach=False))
    engine = SparseTrainingEngine(model, total_steps=12, optimizer=optimizer)
    for step in range(12):  # each rank its own half of the batch
        ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(step))
        ids = ids[accelerator.process_index::accelerator.num_processes]
        accelerator.backward(model(ids, labels=ids).loss)
        accelerator.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        engine.step()
    engine.verify_masks_across_ranks()
    assert len(engine.history) >= 3
    return {name: param.detach().clone() for name, param in accelerator.unwrap_model(model).named_parameters()}


def main(output_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    weights = {"adamw": train(accelerator, torch.optim.AdamW), "sparse_adamw": train(accelerator, SparseAdamW)}
    torch.save({**weights, "world_size": accelerator.num_processes},
               os.path.join(output_dir, f"weights-rank{accelerator.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
