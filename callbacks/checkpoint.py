"""``Checkpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the last state, every save crash-safe.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when it also writes a top-k
checkpoint: after the 1,500-step quickstart it held step 750 (the best validation), so resuming from it after
a SIGKILL, an OOM or a lost node silently threw away every step since the last improvement. Here
``save_last=True`` means what the recipes' comments say: ``last.ckpt`` is written every
``last_every_n_steps`` steps, at every validation (whatever the metric did) and when training ends.

Every save this callback makes — best, periodic and last — goes through ``looped.training.saving``: written
under a temporary name, published by a rename once every rank has written its part, the previous checkpoint
kept until then. ``keep_last=K`` keeps the K most recent last states (the older ones renamed
``last-step=NNNNNNN.ckpt``, which costs a rename, not a write). Everything else is ``ModelCheckpoint``'s: the
monitored top-k, ``dirpath``, ``filename``, and ``--ckpt_path last`` finding ``last.ckpt``.
"""

from __future__ import annotations

from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from looped.training.checkpoint import read_checkpoint
from looped.training.saving import KEPT, LAST, checkpoint_files, is_partial, kept_name, remove, save_checkpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with a ``last.ckpt`` that is the last state, and crash-safe saves.

    Args:
        last_every_n_steps: write ``last.ckpt`` every this many optimiser steps (and at every validation and at
            the end, when ``save_last`` is true). A kill loses at most this many steps.
        keep_last: how many last states to keep (``last.ckpt`` and the ``K - 1`` before it; ``-1``: all of them).
        fsync: sync every checkpoint to the disk before publishing it, so that it survives a power loss or a
            kernel crash as well as a kill (a kill leaves the page cache to the operating system). Costs a
            disk flush per save: up to 1.7x Lightning's save time for a single file here (docs/benchmarks.md).
        **kwargs: ``ModelCheckpoint``'s arguments (``monitor``, ``mode``, ``save_top_k``, ``every_n_train_steps``,
            ``dirpath``...); ``save_last`` defaults to true.
    """

    def __init__(
        self,
        *args,
        last_every_n_steps: int = 100,
        keep_last: int = 1,
        fsync: bool = False,
        save_last: bool = True,
        **kwargs,
    ):
        if last_every_n_steps < 1:
            raise ValueError(f"last_every_n_steps must be at least 1, got {last_every_n_steps}")
        if keep_last == 0 or keep_last < -1:
            raise ValueError(f"keep_last must be at least 1 (or -1: keep every last state), got {keep_last}")
        super().__init__(*args, save_last=save_last, **kwargs)
        self.last_every_n_steps = last_every_n_steps
        self.keep_last = keep_last
        self.fsync = fsync
        self._last_state_step: int | None = None

    # -- every save, crash-safe -------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        save_checkpoint(trainer, filepath, self.save_weights_only, fsync=self.fsync)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for path in Path(self.dirpath).iterdir():
                if is_partial(path):  # a save a kill interrupted: never published, never resumed
                    remove(path)

    # -- the last state ---------------------------------------------------------------------------------
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates) -> None:
        """Lightning's "last.ckpt after a top-k save": replaced by ``save_last_state``, which runs more often."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if trainer.global_step % self.last_every_n_steps == 0:
            self.save_last_state(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.save_last_state(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_last_state(trainer)

    def save_last_state(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (once per step), keeping the previous one as ``last-step=N.ckpt`` if asked to."""
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or trainer.global_step == 0
            or self._last_state_step == trainer.global_step
        ):
            return
        path = Path(self.dirpath) / LAST
        keep_as = None
        if self.keep_last != 1 and trainer.is_global_zero and path.exists():  # only rank 0 renames
            keep_as = path.with_name(kept_name(int(read_checkpoint(path).get("global_step", 0))))
        self.last_model_path = str(path)  # before the save: it is part of the state saved
        save_checkpoint(trainer, path, self.save_weights_only, keep_as=keep_as, fsync=self.fsync)
        self._last_state_step = trainer.global_step
        if trainer.is_global_zero and self.keep_last > 1:
            kept = sorted((p for p in checkpoint_files(path.parent) if KEPT.match(p.name)), reverse=True)
            for old in kept[self.keep_last - 1 :]:
                remove(old)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint) -> None:
        self._last_state_step = checkpoint.get("global_step")  # that state is on disk already
