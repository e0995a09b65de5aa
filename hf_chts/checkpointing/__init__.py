"""Sparse checkpoints, split by job: ``format`` (files, encoding, validation), ``saving``
(``save_sparse``, the ``save_pretrained`` hook), ``compact`` (live values only), ``loading``
(the masked model, the Hub, reading one save), ``manifest`` (save id, manifest, verification),
``commit`` (the crash-safe swap and its locks), ``keeping`` (what a save keeps of the old folder) and
``tools`` (``hf-chts inspect`` / ``export``).

The public API is re-exported by :mod:`hf_chts.checkpoint`. This package's
``__init__`` imports nothing, so :mod:`hf_chts.model` can import
:mod:`hf_chts.checkpointing.saving` (for the save hook) while
:mod:`hf_chts.checkpointing.loading` imports :mod:`hf_chts.model` without a loop.
"""
