"""``GradualStacking``: grow an unshared model during training by copying its middle block (MidAS).

Saunshi et al. (2024, "On the inductive bias of stacking towards improving
reasoning") grow depth in stages, each new stage initialised by duplicating the
*middle* block of the current model; the looped-transformer paper (§3.3) links
this to looping, since a freshly stacked model is a looped model at the moment
of growth. At each step in ``grow_at_steps`` the middle ``block_layers`` layers
of ``model.block`` are copied and inserted after themselves, and the optimiser
is rebuilt: surviving parameters keep their optimiser state, and the
warmup-cosine schedule continues from ``global_step``.
"""

from __future__ import annotations

import copy

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from looped.errors import InputError


def grow_middle(layers: nn.ModuleList, block_layers: int) -> nn.ModuleList:
    """``[.., m_1..m_b, ..]`` → ``[.., m_1..m_b, copy(m_1..m_b), ..]`` with ``m`` the middle block."""
    n = len(layers)
    if block_layers > n:
        raise InputError(f"GradualStacking.block_layers={block_layers} exceeds the {n} layers the model has")
    start = (n - block_layers) // 2
    end = start + block_layers
    copies = [copy.deepcopy(layer) for layer in layers[start:end]]
    return nn.ModuleList([*layers[:end], *copies, *layers[end:]])


class GradualStacking(L.Callback):
    """Grow ``pl_module.model.block`` by ``block_layers`` at each step in ``grow_at_steps``.

    Args:
        grow_at_steps: optimiser steps at which to grow (e.g. ``[2000, 4000]``).
        block_layers: layers copied per growth (the middle block's size).

    Meant for unshared models (``loops: 1``); single-device or DDP training
    (an FSDP-sharded model would have to be re-sharded after growing).
    """

    def __init__(self, grow_at_steps: list[int], block_layers: int = 1) -> None:
        if block_layers < 1:
            raise InputError(f"GradualStacking.block_layers must be >= 1, got {block_layers}")
        self.grow_at_steps = sorted(grow_at_steps)
        self.block_layers = block_layers
        self._grown: set[int] = set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step not in self.grow_at_steps or step in self._grown:
            return
        self._grown.add(step)
        model = pl_module.model
        old_optimizers = list(trainer.optimizers)
        model.block = grow_middle(model.block, self.block_layers).to(pl_module.device)
        model.config.block_layers = len(model.block)
        pl_module.hparams["config"]["block_layers"] = len(model.block)  # so the checkpoint reloads
        trainer.strategy.setup_optimizers(trainer)
        for old, new in zip(old_optimizers, trainer.optimizers):
            for param, state in old.state.items():
                new.state[param] = state
        rank_zero_info(f"GradualStacking: step {step}, model.block now has {len(model.block)} layers")

    def state_dict(self) -> dict:
        return {"grown": sorted(self._grown)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._grown = set(state_dict["grown"])
