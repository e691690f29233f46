"""``PerLoopAccuracy``: what each loop adds, measured from one forward pass per batch.

At validation and test the callback runs the model once with
``loops=max_eval_loops`` and ``return_loop_states=True`` and reads every loop's
hidden state through the head, so the accuracy of an early exit after loop
``n`` (and of running *more* loops than trained, ``n > L``) costs one forward,
not ``max_eval_loops`` of them. Only labelled positions are read out.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

IGNORE = -100


def exact_match_per_loop(model, input_ids: Tensor, labels: Tensor, loops: int) -> Tensor:
    """Bool ``[loops b]``: sample b is fully right when read out after loop n+1."""
    _, states = model(input_ids, loops=loops, return_loop_states=True)
    mask = labels != IGNORE
    sample = mask.nonzero()[:, 0]
    target = labels[mask]
    rows = []
    for state in states:
        wrong = (model.readout(state, positions=mask).argmax(-1) != target).float()
        errors = torch.zeros(len(labels), device=labels.device).index_add_(0, sample, wrong)
        rows.append(errors == 0)
    return torch.stack(rows)


class PerLoopAccuracy(L.Callback):
    """Log ``{stage}/exact_match_loop{n}`` for n = 1..max_eval_loops and print the curve after testing.

    Args:
        max_eval_loops: deepest loop count to read (default: twice the trained L,
            to show extrapolation beyond the loops seen in training).
    """

    def __init__(self, max_eval_loops: Optional[int] = None) -> None:
        self.max_eval_loops = max_eval_loops
        self._correct: Optional[Tensor] = None
        self._total: Optional[Tensor] = None

    def loops_to_eval(self, pl_module: L.LightningModule) -> int:
        return self.max_eval_loops or 2 * pl_module.config.loops

    def _reset(self, pl_module: L.LightningModule) -> None:
        n = self.loops_to_eval(pl_module)
        self._correct = torch.zeros(n, device=pl_module.device)
        self._total = torch.zeros((), device=pl_module.device)

    def _update(self, pl_module: L.LightningModule, batch: dict[str, Tensor]) -> None:
        with torch.no_grad():
            right = exact_match_per_loop(
                pl_module.model, batch["input_ids"], batch["labels"], self.loops_to_eval(pl_module)
            )
        self._correct += right.sum(dim=1)
        self._total += right.shape[1]

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[float]:
        correct = trainer.strategy.reduce(self._correct, reduce_op="sum")
        total = trainer.strategy.reduce(self._total, reduce_op="sum")
        accuracy = (correct / total.clamp(min=1)).tolist()
        for n, value in enumerate(accuracy, start=1):
            pl_module.log(f"{stage}/exact_match_loop{n}", value, sync_dist=False)
        return accuracy

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        accuracy = self._finish(trainer, pl_module, "test")
        rank_zero_info(format_loop_table(accuracy, trained_loops=pl_module.config.loops))


def format_loop_table(accuracy: list[float], trained_loops: int) -> str:
    """Plain-text table of exact match per loop; the trained loop count is starred."""
    lines = [f"Test exact match per loop (trained with L={trained_loops}; * = trained L, beyond it = extrapolation)"]
    lines.append("  loops  " + " ".join(f"{n}{'*' if n == trained_loops else ' ':<5}" for n in range(1, len(accuracy) + 1)))
    lines.append("  acc %  " + " ".join(f"{100 * a:<6.1f}" for a in accuracy))
    return "\n".join(lines)
