"""``InterruptCheckpoint``: Ctrl-C, SIGTERM or a crash never loses the steps since the last checkpoint.

When fitting stops on an exception (``KeyboardInterrupt``, the SIGTERM a
scheduler sends before preemption, an error) this saves ``interrupted.ckpt``
beside the run's ``last.ckpt``. Resuming from it (``--ckpt_path
.../interrupted.ckpt``) continues at the exact step and data position (the
synthetic streams restart from ``global_step``). The non-finite-loss check
raises *before* the backward pass, so the weights saved then are still finite.

Lightning's ``OnExceptionCheckpoint`` does the saving but needs its directory
when the recipe is parsed — before the run's versioned directory exists — and
its presence turns ``fit(ckpt_path=None)`` into ``fit(ckpt_path="last")``.
This callback finds the directory at train start instead and changes nothing else.

The save is crash-safe (``looped.training.saving``): a second kill during it leaves the checkpoints
before it intact. After a full disk (``CheckpointWriteError``) it does not try to write again.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from looped.errors import exception_chain
from looped.training.saving import CheckpointWriteError, save_checkpoint


class InterruptCheckpoint(L.Callback):
    """Save ``<dirpath>/<filename>.ckpt`` when fitting stops on an exception.

    Args:
        dirpath: where to write; default: the ``ModelCheckpoint``'s directory
            (``<log_dir>/checkpoints``).
        filename: file name without extension.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        self.dirpath = dirpath
        self.filename = filename

    @property
    def ckpt_path(self) -> str | None:
        return os.path.join(self.dirpath, f"{self.filename}.ckpt") if self.dirpath else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in setup: Lightning runs ModelCheckpoint's setup (which picks its directory) last.
        if self.dirpath is not None:
            return
        checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
        if checkpoint is not None and checkpoint.dirpath:
            self.dirpath = checkpoint.dirpath
        else:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or self.ckpt_path is None or trainer.global_step == 0:
            return
        if any(isinstance(e, CheckpointWriteError) for e in exception_chain(exception)):
            return  # the disk is full: a second write would fail too, and hide the first error
        save_checkpoint(trainer, self.ckpt_path)
        rank_zero_info(
            f"Training stopped ({type(exception).__name__}) at step {trainer.global_step}; saved {self.ckpt_path}. "
            f"Resume with --ckpt_path {self.ckpt_path}"
        )
