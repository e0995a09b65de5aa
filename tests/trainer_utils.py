"""Tiny Trainer runs shared by the callback tests (CPU, deterministic, offline)."""

import torch
from transformers import Trainer, TrainingArguments

from hf_chts import CHTssTrainerCallback, SparsifyConfig


class PatternDataset(torch.utils.data.Dataset):
    """Deterministic token sequences with a learnable pattern."""

    def __init__(self, size=256, length=16, vocab=128, seed=0):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (size, 1), generator=generator)
        steps = torch.arange(length).view(1, -1)
        self.ids = (start * 3 ** (steps % 4) + steps) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def training_args(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant",
    )
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(model, output_dir, config: SparsifyConfig, dataset=None, eval_dataset=None, **overrides):
    callback = CHTssTrainerCallback(config)
    trainer = Trainer(model=model, args=training_args(output_dir, **overrides),
                      train_dataset=dataset if dataset is not None else PatternDataset(),
                      eval_dataset=eval_dataset, callbacks=[callback])
    return trainer, callback
