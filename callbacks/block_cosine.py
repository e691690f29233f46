"""``BlockCosineSimilarity``: Figure 5 of Saunshi et al. 2025, logged while training.

For an unshared stack (``model.block``, ``loops: 1``) viewed as blocks of k,
the cosine between every layer ``l`` and the same layer of the next block,
``cos(θ_G^(l), θ_G^(l+k))``, per parameter group ``G``. The block regulariser
(``looped.training.regularizer``) drives these towards 1; the figure shows every group
≥ 0.98 after training with it.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from looped.errors import InputError
from looped.tools.plots import cosine_heatmap
from looped.training.regularizer import PARAMETER_GROUPS, layer_parameter, neighbour_cosines

DEFAULT_GROUPS = ["q", "k", "v", "o", "w1", "w2", "attn_norm", "ffn_norm"]


def full_parameter(p: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a collective for a DTensor."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor):
            return p.full_tensor()
    return p


class BlockCosineSimilarity(L.Callback):
    """Log ``block_cosine/{group}/layer{l}`` and ``block_cosine/{group}/mean`` every N steps and at the end of fit.

    With a ``TensorBoardLogger`` the values are also drawn as a heatmap
    (``block_cosine/heatmap``, see ``cosine_heatmap``).

    FSDP: under FSDP2 (``fully_shard``) the parameters are DTensors; each is
    gathered with ``full_tensor()``, which is a collective, so ``compute`` runs
    on every rank (Lightning calls the hooks on all of them) and only global
    rank 0 writes to the logger. One parameter is gathered at a time, so the
    extra memory is one layer's weight of one group, not the model.

    Args:
        block_layers: k, the distance between the compared layers.
        groups: parameter groups to compare (names of ``looped.training.regularizer.PARAMETER_GROUPS``).
        every_n_steps: log after every N optimiser steps (and always when training ends).
    """

    def __init__(self, block_layers: int, groups: list[str] | None = None, every_n_steps: int = 100) -> None:
        if block_layers < 1:
            raise InputError(f"BlockCosineSimilarity.block_layers must be >= 1, got {block_layers}")
        if every_n_steps < 1:
            raise InputError(f"BlockCosineSimilarity.every_n_steps must be >= 1, got {every_n_steps}")
        self.block_layers = block_layers
        self.groups = list(DEFAULT_GROUPS if groups is None else groups)
        unknown = sorted(set(self.groups) - set(PARAMETER_GROUPS))
        if unknown:
            raise InputError(f"BlockCosineSimilarity.groups: unknown {unknown}; choose from {sorted(PARAMETER_GROUPS)}")
        self.every_n_steps = every_n_steps
        self.last: dict[str, list[float]] | None = None  # the values most recently computed
        self._logged_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        n = len(pl_module.model.block)
        if n <= self.block_layers:
            raise InputError(
                f"BlockCosineSimilarity.block_layers={self.block_layers} needs more layers than that in model.block, "
                f"which has {n}; compare an unshared model (model.init_args.config.loops: 1, block_layers: kL)"
            )
        missing = [g for g in self.groups if not _has_parameter(pl_module.model.block[0], g)]
        if missing:
            raise InputError(f"BlockCosineSimilarity.groups: the model's layers have no {missing} parameters")

    @torch.no_grad()
    def compute(self, pl_module: L.LightningModule) -> dict[str, list[float]]:
        """``{group: [cos(θ^(l), θ^(l+k)) for l]}``; a collective under FSDP (call on every rank)."""
        layers = pl_module.model.block
        values = {}
        for group in self.groups:
            weights = [full_parameter(layer_parameter(layer, group)).float() for layer in layers]
            values[group] = neighbour_cosines(weights, self.block_layers).tolist()
        return values

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._logged_step == step:
            return
        self._logged_step = step
        self.last = self.compute(pl_module)
        if not trainer.is_global_zero:
            return
        metrics = {}
        for group, cosines in self.last.items():
            metrics.update({f"block_cosine/{group}/layer{i}": c for i, c in enumerate(cosines)})
            metrics[f"block_cosine/{group}/mean"] = sum(cosines) / len(cosines)
        # The loggers directly, not pl_module.log: Lightning forbids self.log in on_train_end.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                import matplotlib.pyplot as plt

                figure = cosine_heatmap(self.last, self.block_layers)
                logger.experiment.add_figure("block_cosine/heatmap", figure, global_step=step, close=True)
                plt.close(figure)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # The end of fitting, but before the strategy's teardown moves the model to the CPU
        # (on_fit_end comes after it, too late for an NCCL gather); the loggers flush after this.
        self._log(trainer, pl_module)


def _has_parameter(layer: torch.nn.Module, group: str) -> bool:
    try:
        layer_parameter(layer, group)
    except AttributeError:
        return False
    return True
