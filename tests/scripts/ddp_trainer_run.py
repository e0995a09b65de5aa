"""Run a tiny sparse Trainer job; launched by tests/test_multiprocess.py with 1 or 2 processes.

Writes <output>/masks-rank<r>.pt (final masks) and <output>/checksums-rank<r>.json
(mask checksum after every update) so the test can compare ranks and runs.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_chts import CHTssTrainerCallback, SparsifyConfig  # noqa: E402
from trainer_utils import PatternDataset, training_args  # noqa: E402


class RecordChecksums(TrainerCallback):
    def __init__(self, sparse_callback):
        self.sparse_callback = sparse_callback
        self.checksums = {}

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.sparse_callback.engine
        if engine is not None and engine.history and engine.history[-1].step == state.global_step:
            self.checksums[state.global_step] = engine.mask_checksum()


def main(output_dir: str, per_device_batch: int) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    sparse = CHTssTrainerCallback(SparsifyConfig(method="chtss", target_density=0.3, update_interval=4, seed=0),
                                  check_ranks=True)
    recorder = RecordChecksums(sparse)  # runs after `sparse` (callbacks run in order)
    args = training_args(output_dir, max_steps=24, per_device_train_batch_size=per_device_batch,
                         learning_rate=3e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=PatternDataset(size=512),
                                   callbacks=[sparse, recorder])
    trainer.train()
    rank = trainer.args.process_index
    masks = {name: mask.clone() for name, mask in sparse.engine.masks().items()}
    torch.save({"masks": masks, "world_size": trainer.args.world_size}, os.path.join(output_dir, f"masks-rank{rank}.pt"))
    with open(os.path.join(output_dir, f"checksums-rank{rank}.json"), "w") as handle:
        json.dump(recorder.checksums, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
