"""Where hf_chts's messages go: every one is a record of a logger under ``logging.getLogger("hf_chts")``
(one per module, e.g. ``hf_chts.recipe.finish``), never a ``print``.

A library user controls them like any Python logger, e.g.
``logging.getLogger("hf_chts").setLevel(logging.ERROR)`` silences everything but errors. The
``hf-chts`` commands and ``recipes/pretrain.py`` call :func:`enable_command_line_messages`, which shows
them (``INFO`` and above) on stderr; a recipe's ``training.log_level`` / ``log_level_replica`` (the
Trainer's own verbosity settings) then apply to hf_chts's messages too (:func:`follow_trainer_log_level`).
What a command outputs as its result (a table, a summary, JSON) still goes to stdout.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "hf_chts"


class _CommandLineHandler(logging.StreamHandler):
    """The stderr handler :func:`enable_command_line_messages` adds (recognised so it is added once). It writes
    to the current ``sys.stderr``, whatever replaced it since (a test's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream assign it: always sys.stderr
        pass


def enable_command_line_messages(level: int = logging.INFO) -> logging.Logger:
    """Show hf_chts's messages of ``level`` and above on stderr, as they are written (``"hf_chts: ..."``).

    Adds one handler to the ``hf_chts`` logger (once per process) and sets its level when none is set,
    so a level the user chose before is kept. Returns the logger.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, _CommandLineHandler) for handler in logger.handlers):
        handler = _CommandLineHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    return logger


def follow_trainer_log_level(args) -> None:
    """Apply ``TrainingArguments.log_level`` (main process) / ``log_level_replica`` (other processes) to the
    ``hf_chts`` logger, as the Trainer does to transformers' own; ``"passive"`` on the main process keeps
    the current level."""
    if args.should_log and args.log_level == "passive":
        return
    logging.getLogger(LOGGER_NAME).setLevel(args.get_process_log_level())
