"""``CHTssTrainerCallback``: make any ``transformers.Trainer`` run sparse.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[CHTssTrainerCallback(SparsifyConfig(method="chtss", target_density=0.3))])
    trainer.train()

At ``on_train_begin`` (the optimizer exists by then) the callback sparsifies
the model if needed and builds a :class:`~hf_chts.engine.SparseTrainingEngine`
sized from ``state.max_steps`` (optimizer steps: gradient accumulation and the
number of processes are already accounted for by the Trainer; docs/distributed.md §3). After every
optimizer step it steps the engine, which runs the topology update when one
is due; statistics go through ``Trainer.log`` as ``sparsity/*`` so they reach
whatever ``report_to`` is set to. Checkpoints (``checkpoint-N/``) get the masks
and the engine state (``sparsity.safetensors``, ``sparsify_config.json``), and
a run resumed from a checkpoint continues its schedule where it stopped.

The callback is a transformers stateful callback (``ExportableState``): every
checkpoint's ``trainer_state.json`` keeps, under ``stateful_callbacks``, its
arguments and a fingerprint of the engine state saved beside it. On resume the
Trainer reads that record from the checkpoint it really loads, and the callback
accepts only the engine state that matches it; with
``TrainingArguments(restore_callback_states_from_checkpoint=True)`` the Trainer
rebuilds the callback from the record (``calibration_batch`` is not restored).

With ``TrainingArguments(load_best_model_at_end=True)`` the Trainer reloads the
best checkpoint's weights at the end; the callback then restores that
checkpoint's masks and engine state too, so the model (and ``final/``) is the
best checkpoint, never its weights under the last masks.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import SparsifyConfig
from .config_changes import check_allowed_changes
from .deepspeed_check import refuse_deepspeed
from .engine import SparseTrainingEngine
from .model import sparsify
from .state import find_state

logger = logging.getLogger(__name__)


def trainer_on_call_stack() -> tuple[object | None, str | None]:
    """The ``Trainer`` running the callback event, and the checkpoint folder ``train()`` resumes from.

    The one place hf_chts relies on transformers internals: the callback API passes
    neither (``Trainer.log`` is needed to put ``sparsity/*`` into the Trainer's logs
    and ``report_to``; the folder holds the masks and the engine state). Both are read
    from the calling frames: ``self`` of the Trainer's methods and the
    ``resume_from_checkpoint`` argument of ``Trainer._inner_training_loop``.
    ``tests/test_callback.py::test_trainer_on_call_stack_matches_this_transformers_release``
    fails if a transformers release changes this (supported range: pyproject.toml).
    """
    from transformers import Trainer

    trainer, resume_from = None, None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                trainer = trainer or candidate
                if frame.f_code.co_name == "_inner_training_loop":
                    path = frame.f_locals.get("resume_from_checkpoint")
                    resume_from = str(path) if isinstance(path, (str, os.PathLike)) else None
                    break
            frame = frame.f_back
    finally:
        del frame
    return trainer, resume_from


def engine_fingerprint(engine_state: dict) -> dict:
    """Identity of an engine state (``SparseTrainingEngine.state_dict()`` format): its step and a digest of its
    RNG state and update history (the per-layer densities, not kept in checkpoints, left out)."""
    history = [{k: v for k, v in stats.items() if k != "layer_density"} for stats in engine_state["history"]]
    digest = hashlib.sha256(engine_state["generator_state"].cpu().numpy().tobytes())
    digest.update(json.dumps(history, sort_keys=True, default=str).encode())
    return {"completed_steps": int(engine_state["completed_steps"]), "sha256": digest.hexdigest()}


class CHTssTrainerCallback(TrainerCallback, ExportableState):
    """Dynamic sparse training (CHTs / CHTss and the baselines) inside the HF ``Trainer``.

    Args:
        config: the :class:`SparsifyConfig` (or its ``to_dict()``); used to sparsify the model
            when ``sparsify()`` was not called yet (otherwise the model's own config wins).
        log_per_layer: also log each layer's density (``sparsity/layer/<name>``); off by default,
            as in a recipe (``run.log_per_layer_density``).
        check_ranks: compare a checksum of the masks across processes after
            every update and raise if they differ (default: env ``HF_CHTS_DEBUG=1``).
        calibration_batch: model inputs for ``init='csti'`` when the callback sparsifies.
        allow_config_change: config fields allowed to differ from the checkpoint's when
            resuming (only :data:`~hf_chts.config_changes.RESUME_SAFE_FIELDS`); any
            other difference is refused with the list of differing fields.
    """

    def __init__(self, config: SparsifyConfig | dict | None = None, *, log_per_layer: bool = False,
                 check_ranks: bool | None = None, calibration_batch=None, allow_config_change=None) -> None:
        if isinstance(config, dict):  # from trainer_state.json (ExportableState.from_state)
            config = SparsifyConfig.from_dict(config)
        if config is not None and not isinstance(config, SparsifyConfig):
            raise TypeError(f"CHTssTrainerCallback expects a SparsifyConfig, got {type(config).__name__}")
        self.config = config
        self.allow_config_change = check_allowed_changes(allow_config_change)
        self.log_per_layer = log_per_layer
        self.check_ranks = os.environ.get("HF_CHTS_DEBUG") == "1" if check_ranks is None else check_ranks
        self.calibration_batch = calibration_batch
        self.engine: SparseTrainingEngine | None = None
        self._trainer = None

    def state(self) -> dict:
        """The record transformers keeps in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``)."""
        saved = engine_fingerprint(self.engine.state_dict(include_masks=False)) if self.engine is not None else None
        return {"args": {"config": self.config.to_dict() if self.config is not None else None,
                         "log_per_layer": self.log_per_layer, "check_ranks": self.check_ranks,
                         "allow_config_change": list(self.allow_config_change)},
                "attributes": {"saved_engine": saved}}

    # ---------------------------------------------------------------- begin
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if model is None:
            raise ValueError("CHTssTrainerCallback needs the Trainer's model; it received none")
        self._trainer, resume_from = trainer_on_call_stack()
        refuse_deepspeed("CHTssTrainerCallback", training_args=args, model=model, optimizer=optimizer,
                         accelerator=getattr(self._trainer, "accelerator", None))
        if find_state(model) is None:
            sparsify(model, self.config or SparsifyConfig(), calibration_batch=self.calibration_batch)
            logger.info("hf_chts: model sparsified by CHTssTrainerCallback")
        if optimizer is None:
            raise ValueError("CHTssTrainerCallback found no optimizer at on_train_begin; use transformers.Trainer")
        if self.engine is not None:
            self.engine.close()
        self.engine = SparseTrainingEngine(model, total_steps=state.max_steps, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler)
        if state.global_step > 0:
            self._resume(args, state, resume_from)

    def _saved_engine_record(self, state) -> dict | None:
        """This callback's record in the resumed checkpoint's ``trainer_state.json`` (loaded by the Trainer)."""
        record = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(record, list):
            record = record[0] if record else None
        return (record or {}).get("attributes", {}).get("saved_engine") if isinstance(record, dict) else None

    def _resume(self, args, state, resume_from: str | None) -> None:
        from .checkpointing.loading import read_engine_state

        # the checkpoint Trainer.train(resume_from_checkpoint=...) really loaded comes first
        candidates = [path for path in (resume_from, args.resume_from_checkpoint) if isinstance(path, str)]
        if not candidates:  # Trainer's own naming of the folder it saved at this step
            candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        expected = self._saved_engine_record(state)
        foreign = []
        for folder in candidates:
            engine_state = read_engine_state(folder) if os.path.isdir(folder) else None
            if engine_state is not None and expected is not None and engine_fingerprint(engine_state) != expected:
                foreign.append(folder)  # another run's checkpoint (e.g. at the guessed path): never load it
                continue
            if engine_state is not None:
                if engine_state["completed_steps"] != state.global_step:
                    raise ValueError(
                        f"{folder}: engine state is at step {engine_state['completed_steps']} but the Trainer resumes "
                        f"at step {state.global_step}; the checkpoint folder is inconsistent"
                    )
                try:
                    self.engine.load_state_dict(engine_state, allow_config_change=self.allow_config_change)
                except ValueError as error:
                    raise ValueError(f"cannot resume from {folder}: {error}") from error
                logger.info("hf_chts: resumed sparse training state from %s", folder)
                return
        if foreign:
            raise ValueError(
                f"resuming at step {state.global_step}: the engine state in {foreign} is not the one the resumed "
                f"checkpoint's trainer_state.json recorded ({expected}); it belongs to another run. Pass the "
                "checkpoint folder to Trainer.train(resume_from_checkpoint=...) and TrainingArguments.resume_from_checkpoint"
            )
        raise ValueError(
            f"resuming at step {state.global_step} but no hf_chts engine state was found in {candidates}: "
            "the checkpoint was not written by a sparse run (sparsify_config.json / sparsity.safetensors missing)"
        )

    # ----------------------------------------------------------------- steps
    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is None:
            return
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        stats = self.engine.step(state.global_step, optimizer_step_skipped=skipped)
        if stats is None:
            return
        if self.check_ranks:
            self.engine.verify_masks_across_ranks()
        logs = stats.to_log(per_layer=self.log_per_layer)
        if self._trainer is not None:
            should_log = control.should_log  # Trainer.log's callbacks reset it; keep the loss log of this step
            self._trainer.log(logs)
            control.should_log = self._trainer.control.should_log = should_log
        else:  # not driven by transformers.Trainer: record in the state's history at least
            state.log_history.append({**logs, "step": state.global_step})

    def on_save(self, args, state, control, model=None, **kwargs):
        """Make sure ``checkpoint-N/`` holds the masks and the engine state (main process).

        The model's ``save_pretrained`` hook normally wrote them already; saving
        paths that bypass it (e.g. FSDP sharded state dicts) get them here.
        """
        if self.engine is None or not state.is_world_process_zero:
            return
        from .checkpointing.format import CONFIG_FILE, SPARSITY_FILE
        from .checkpointing.saving import write_sparsity_files

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        written = all(os.path.exists(os.path.join(folder, name)) for name in (SPARSITY_FILE, CONFIG_FILE))
        if os.path.isdir(folder) and not written:
            write_sparsity_files(model if model is not None else self.engine.model, folder)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        """Trainer pushes carry the masks, the config and the model card
        (docs/hub.md#3-pushes-carry-the-sparsity-files)."""
        from .hub_trainer import keep_sparse_card, prepare_trainer_push

        model = model if model is not None else getattr(self.engine, "model", None)
        prepare_trainer_push(args, state, model)
        keep_sparse_card(getattr(self, "_trainer", None), model)

    def on_train_end(self, args, state, control, **kwargs):
        """With ``load_best_model_at_end`` the Trainer has just reloaded the best checkpoint's weights: restore
        its masks and engine state too, so the model (and a save of it) is the best checkpoint, not its
        weights under the last topology. Then detach the engine from the optimizer."""
        if self.engine is None:
            return
        try:
            if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint:
                self.restore_checkpoint_topology(state.best_model_checkpoint)
        finally:
            self.engine.close()

    def restore_checkpoint_topology(self, folder: str) -> None:
        """Load the masks and engine state of the Trainer checkpoint ``folder`` into the running engine.

        The engine state must be the one the folder's ``trainer_state.json`` recorded for this callback
        (same step and fingerprint); anything else is refused (``ValueError`` naming the folder).
        """
        from transformers import TrainerState
        from transformers.trainer import TRAINER_STATE_NAME

        from .checkpointing.loading import read_engine_state

        engine_state = read_engine_state(folder) if os.path.isdir(folder) else None
        if engine_state is None:
            raise ValueError(f"load_best_model_at_end: the best checkpoint {folder} holds no hf_chts engine state "
                             "(sparsity.safetensors / sparsify_config.json), so its masks cannot be restored with "
                             "its weights; keep the sparsity files in every checkpoint or set "
                             "load_best_model_at_end=False")
        state_file = os.path.join(folder, TRAINER_STATE_NAME)
        recorded = self._saved_engine_record(TrainerState.load_from_json(state_file)) \
            if os.path.isfile(state_file) else None
        if recorded is not None and engine_fingerprint(engine_state) != recorded:
            raise ValueError(f"load_best_model_at_end: the engine state in {folder} is not the one its "
                             f"{TRAINER_STATE_NAME} recorded ({recorded}); the checkpoint folder is inconsistent")
        self.engine.load_state_dict(engine_state, allow_config_change=self.allow_config_change)
        logger.info("hf_chts: load_best_model_at_end: restored the masks and engine state of %s "
                    "(step %d) with its weights", folder, engine_state["completed_steps"])
