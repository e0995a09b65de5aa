"""Kill a training run during the save of its second checkpoint; launched by tests/test_run_edge_cases.py.

    python kill_during_checkpoint_save.py trainer OUTPUT STEP      # a tiny Trainer: save_steps 2, max_steps 6
    python kill_during_checkpoint_save.py recipe RECIPE.yaml STEP  # ``hf-chts train RECIPE.yaml`` (save_steps set)

The first checkpoint is saved normally; then ``STEP`` is armed: a commit step of the hf_chts save
(``HF_CHTS_FAULT_AT``, hf_chts/checkpointing/commit.py) or ``trainer-state`` (after the hf_chts commit, before
the Trainer writes ``trainer_state.json``). The process exits with status 86 at that point, like a SIGKILL.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import TrainerCallback, TrainerState  # noqa: E402

from hf_chts.checkpointing.commit import FAULT_ENV, FAULT_EXIT_CODE  # noqa: E402


class ArmAfterFirstSave(TrainerCallback):
    """After the first checkpoint is complete, arm the kill for the next save."""

    def __init__(self, step: str):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if self.step == "trainer-state":
            original = TrainerState.save_to_json

            def killed(state_self, path):
                if os.path.basename(path) == "trainer_state.json":
                    os._exit(FAULT_EXIT_CODE)
                return original(state_self, path)

            TrainerState.save_to_json = killed
        else:
            os.environ[FAULT_ENV] = self.step


def run_trainer(output: str, step: str) -> int:
    from transformers import Trainer

    from conftest import tiny_model
    from hf_chts import CHTssTrainerCallback, SparsifyConfig
    from trainer_utils import PatternDataset, training_args

    config = SparsifyConfig(method="chtss", target_density=0.5, update_interval=2, seed=0)
    trainer = Trainer(model=tiny_model("llama"), train_dataset=PatternDataset(size=64),
                      args=training_args(output, max_steps=6, save_strategy="steps", save_steps=2),
                      callbacks=[CHTssTrainerCallback(config), ArmAfterFirstSave(step)])
    trainer.train()
    return 0


def run_recipe(recipe: str, step: str) -> int:
    from hf_chts.cli import main
    from hf_chts.recipe import run as recipe_run

    build = recipe_run.build_trainer

    def build_with_kill(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(ArmAfterFirstSave(step))
        return trainer

    recipe_run.build_trainer = build_with_kill
    return main(["train", recipe])


if __name__ == "__main__":
    mode, target, fault_step = sys.argv[1:4]
    sys.exit(run_trainer(target, fault_step) if mode == "trainer" else run_recipe(target, fault_step))
