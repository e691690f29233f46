"""``PerLoopAccuracy``: what each loop adds, measured from one forward pass per batch.

At validation and test the callback runs the model once with
``loops=max_eval_loops`` and ``return_loop_states=True`` and reads every loop's
hidden state through the head, so the accuracy of an early exit after loop
``n`` (and of running *more* loops than trained, ``n > L``) costs one forward,
not ``max_eval_loops`` of them. Only labelled positions are read out.

With a ``TensorBoardLogger`` the curve is also drawn (``{stage}/exact_match_per_loop``,
see ``per_loop_figure``). With several named evaluation sets (the data module's
``eval_names``) the curve is over all of them, and each set also gets its own
``{stage}/exact_match_loop{n}_{name}``. ``looped validate|test|run`` show them as the columns
``loop1 … loopN`` of their evaluation table (``looped.tools.eval_table``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from looped.contract import IGNORE
from looped.tools.plots import per_loop_figure


def exact_match_per_loop(model, input_ids: Tensor, labels: Tensor, loops: int) -> Tensor:
    """Bool ``[loops b]``: sample b is fully right when read out after loop n+1."""
    _, states = model(input_ids, loops=loops, return_loop_states=True)
    mask = labels != IGNORE
    sample = mask.nonzero()[:, 0]
    target = labels[mask]
    if len(model.coda) == 0:
        # All loops through the head at once, ``[n m d]``: the labelled positions are few,
        # so n small readouts would cost n times the launches (on a busy CPU, n times the
        # thread-pool wake-ups) for the same arithmetic.
        preds = model.readout(torch.stack([state[mask] for state in states])).argmax(-1)
    else:  # the coda attends over every position, so each loop needs its own readout
        preds = torch.stack([model.readout(state, positions=mask).argmax(-1) for state in states])
    wrong = (preds != target).float()
    errors = torch.zeros(len(states), len(labels), device=labels.device).index_add_(1, sample, wrong)
    return errors == 0


class PerLoopAccuracy(L.Callback):
    """Log ``{stage}/exact_match_loop{n}`` for n = 1..max_eval_loops (per named set too) and draw the curve.

    Args:
        max_eval_loops: deepest loop count to read (default: twice the trained L,
            to show extrapolation beyond the loops seen in training).
    """

    def __init__(self, max_eval_loops: int | None = None) -> None:
        self.max_eval_loops = max_eval_loops
        # Per evaluation dataloader: exact matches after each loop [n], and samples seen.
        self._correct: dict[int, Tensor] = {}
        self._total: dict[int, Tensor] = {}

    def loops_to_eval(self, pl_module: L.LightningModule) -> int:
        return self.max_eval_loops or 2 * pl_module.config.loops

    def _reset(self, pl_module: L.LightningModule) -> None:
        self._correct, self._total = {}, {}

    def _update(self, pl_module: L.LightningModule, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        with torch.no_grad():
            right = exact_match_per_loop(
                pl_module.model, batch["input_ids"], batch["labels"], self.loops_to_eval(pl_module)
            )
        if dataloader_idx not in self._correct:
            self._correct[dataloader_idx] = torch.zeros(right.shape[0], device=right.device)
            self._total[dataloader_idx] = torch.zeros((), device=right.device)
        self._correct[dataloader_idx] += right.sum(dim=1)
        self._total[dataloader_idx] += right.shape[1]

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[float]:
        names = pl_module.eval_names
        # One row per evaluation set, known alike on every rank (not from the batches this rank saw, which
        # could differ and leave ranks waiting on different collectives); one reduce for all of them.
        loops = self.loops_to_eval(pl_module)
        counts = torch.zeros(max(len(names), 1), loops + 1, device=pl_module.device)
        for i, right in self._correct.items():
            counts[i, :loops], counts[i, loops] = right, self._total[i]
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        correct, total = counts[:, :loops], counts[:, loops]
        accuracy = (correct.sum(0) / total.sum().clamp(min=1)).tolist()
        for n, value in enumerate(accuracy, start=1):
            pl_module.log(f"{stage}/exact_match_loop{n}", value, sync_dist=False)
        for i, name in enumerate(names):
            for n, value in enumerate((correct[i] / total[i].clamp(min=1)).tolist(), start=1):
                pl_module.log(f"{stage}/exact_match_loop{n}_{name}", value, sync_dist=False)
        if trainer.is_global_zero and not trainer.sanity_checking:
            draw = lambda: per_loop_figure(accuracy, trained_loops=pl_module.config.loops)  # noqa: E731
            log_figure(trainer, f"{stage}/exact_match_per_loop", draw)
        return accuracy

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")


def log_figure(trainer: L.Trainer, tag: str, draw) -> None:
    """Draw with ``draw()`` and hand the figure to every TensorBoard logger; nothing is drawn without one."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers:
        return
    import matplotlib.pyplot as plt

    figure = draw()
    for logger in loggers:
        logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
    plt.close(figure)
