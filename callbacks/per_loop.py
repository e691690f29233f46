"""``PerLoopAccuracy``: what each loop adds, measured from one forward pass per batch.

With ``perplexity=True`` it also logs the perplexity of the labelled tokens after every loop
(``{stage}/perplexity_loop{n}``), for language models, from the same forward.

At validation and test the callback reads every loop's hidden state through the head, from the
one forward ``LoopedLM``'s evaluation step runs to ``max_eval_loops`` loops for every loop reader
(``looped.evaluation.loop_readout``), so the accuracy of an early exit after loop ``n`` (and of running *more*
loops than trained, ``n > L``) costs no forward of its own. Only labelled positions are read out.

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

from looped.evaluation.loop_readout import loop_predictions, per_loop_predictions
from looped.tools.plots import per_loop_figure


def exact_match_per_loop(model, input_ids: Tensor, labels: Tensor, loops: int) -> Tensor:
    """Bool ``[loops b]``: sample b is fully right when read out after loop n+1."""
    return per_loop_predictions(model, input_ids, labels, loops).correct


def perplexity_per_loop(model, input_ids: Tensor, labels: Tensor, loops: int) -> Tensor:
    """``[loops]`` perplexity of the labelled tokens read out after loop n+1 (inference-time scaling for LMs)."""
    loss = per_loop_predictions(model, input_ids, labels, loops).loss
    return torch.exp(loss.sum(1) / max(1, loss.shape[1]))


class PerLoopAccuracy(L.Callback):
    """Log ``{stage}/exact_match_loop{n}`` for n = 1..max_eval_loops (per named set too) and draw the curve.

    Args:
        max_eval_loops: deepest loop count to read (default: twice the trained L,
            to show extrapolation beyond the loops seen in training).
        perplexity: also log ``{stage}/perplexity_loop{n}`` (and per named set): the perplexity of the
            labelled tokens after every loop, from the same forward. For language models, where a
            whole sequence is rarely an exact match: does perplexity keep falling past the trained L?
    """

    def __init__(self, max_eval_loops: int | None = None, perplexity: bool = False) -> None:
        self.max_eval_loops = max_eval_loops
        self.perplexity = perplexity
        # Per evaluation dataloader: exact matches after each loop [n], samples seen, and (with
        # ``perplexity``) summed cross-entropy after each loop [n] and labelled tokens.
        self._correct: dict[int, Tensor] = {}
        self._total: dict[int, Tensor] = {}
        self._loss: dict[int, Tensor] = {}
        self._tokens: dict[int, Tensor] = {}

    def loops_to_eval(self, pl_module: L.LightningModule) -> int:
        return self.max_eval_loops or 2 * pl_module.config.loops

    def _reset(self, pl_module: L.LightningModule) -> None:
        self._correct, self._total, self._loss, self._tokens = {}, {}, {}, {}

    def loops_to_read(self, pl_module: L.LightningModule, stage: str) -> int:
        return self.loops_to_eval(pl_module)  # at validation and test alike

    def _update(self, pl_module: L.LightningModule, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        readout = loop_predictions(pl_module, batch, self.loops_to_eval(pl_module))
        right, i = readout.correct, dataloader_idx
        if i not in self._correct:
            self._correct[i] = torch.zeros(right.shape[0], device=right.device)
            self._total[i] = torch.zeros((), device=right.device)
            self._loss[i] = torch.zeros(right.shape[0], device=right.device)
            self._tokens[i] = torch.zeros((), device=right.device)
        self._correct[i] += right.sum(dim=1)
        self._total[i] += right.shape[1]
        if self.perplexity:
            self._loss[i] += readout.loss.sum(1)
            self._tokens[i] += readout.loss.shape[1]

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[float]:
        names = pl_module.eval_names
        # One row per evaluation set, known alike on every rank (not from the batches this rank saw, which
        # could differ and leave ranks waiting on different collectives); one reduce for all of them.
        loops = self.loops_to_eval(pl_module)
        # Columns: exact matches [n], samples, summed cross-entropy [n], labelled tokens.
        counts = torch.zeros(max(len(names), 1), 2 * loops + 2, device=pl_module.device)
        for i, right in self._correct.items():
            counts[i, :loops], counts[i, loops] = right, self._total[i]
            counts[i, loops + 1 : 2 * loops + 1], counts[i, -1] = self._loss[i], self._tokens[i]
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        correct, total = counts[:, :loops], counts[:, loops]
        loss, tokens = counts[:, loops + 1 : 2 * loops + 1], counts[:, -1]
        accuracy = (correct.sum(0) / total.sum().clamp(min=1)).tolist()
        for n, value in enumerate(accuracy, start=1):
            pl_module.log(f"{stage}/exact_match_loop{n}", value, sync_dist=False)
        for i, name in enumerate(names):
            for n, value in enumerate((correct[i] / total[i].clamp(min=1)).tolist(), start=1):
                pl_module.log(f"{stage}/exact_match_loop{n}_{name}", value, sync_dist=False)
        if self.perplexity:
            pooled = torch.exp(loss.sum(0) / tokens.sum().clamp(min=1)).tolist()
            for n, value in enumerate(pooled, start=1):
                pl_module.log(f"{stage}/perplexity_loop{n}", value, sync_dist=False)
            for i, name in enumerate(names):
                for n, value in enumerate(torch.exp(loss[i] / tokens[i].clamp(min=1)).tolist(), start=1):
                    pl_module.log(f"{stage}/perplexity_loop{n}_{name}", value, sync_dist=False)
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
