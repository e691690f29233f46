"""``LoopDynamics``: what happens inside the loop, read from the same forward as ``PerLoopAccuracy``.

After every loop n, over the labelled positions of the evaluation set:

* ``{stage}/dynamics/residual_loop{n}`` — the fixed-point residual ``‖h_n − h_{n−1}‖ / ‖h_{n−1}‖``
  (n ≥ 2): does the loop converge to a fixed point, and does it keep moving past the trained L?
* ``{stage}/dynamics/top_prob_loop{n}`` — the logit lens: the readout's probability of its own argmax;
* ``{stage}/dynamics/flip_rate_loop{n}`` — the share of positions whose argmax changed since loop
  n − 1 (n ≥ 2): how often the answer flips.

With a ``TensorBoardLogger`` it draws the three curves (``{stage}/dynamics``) and writes the logit
lens of the first sample as text (``{stage}/logit_lens``: the top token and its probability after
every loop, at its first labelled positions). ``looped report`` draws the curves from the logged
scalars. All of it comes from ``LoopedLM``'s one evaluation pass per batch (``looped.evaluation.loop_readout``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from looped.callbacks.per_loop import log_figure
from looped.evaluation.loop_readout import LoopPredictions, loop_predictions
from looped.tools.plots import dynamics_figure

QUANTITIES = ("residual", "top_prob", "flip_rate")
LENS_POSITIONS = 8
"""Labelled positions of the first sample shown in the logit-lens text."""


class LoopDynamics(L.Callback):
    """Log the fixed-point residual, the logit lens and the answer-flip rate after every loop.

    Args:
        max_eval_loops: deepest loop to read (default: twice the trained L).
    """

    def __init__(self, max_eval_loops: int | None = None) -> None:
        self.max_eval_loops = max_eval_loops
        self._sums: Tensor | None = None  # [3 n] summed residual, top probability, flips
        self._positions = 0
        self._lens: str | None = None

    def loops_to_eval(self, pl_module: L.LightningModule) -> int:
        return self.max_eval_loops or 2 * pl_module.config.loops

    def loops_to_read(self, pl_module: L.LightningModule, stage: str) -> int:
        return self.loops_to_eval(pl_module)

    def _reset(self) -> None:
        self._sums, self._positions, self._lens = None, 0, None

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor]) -> None:
        pred = loop_predictions(pl_module, batch, self.loops_to_eval(pl_module))
        flips = torch.zeros_like(pred.top_prob)
        flips[1:] = (pred.preds[1:] != pred.preds[:-1]).float()
        sums = torch.stack([pred.residual.nan_to_num(0.0), pred.top_prob, flips]).sum(-1)  # [3 n]
        self._sums = sums if self._sums is None else self._sums + sums
        self._positions += pred.preds.shape[1]
        if self._lens is None:
            self._lens = logit_lens(pred, getattr(trainer.datamodule, "decode", None) if trainer.datamodule else None)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loops = self.loops_to_eval(pl_module)
        sums = self._sums if self._sums is not None else torch.zeros(3, loops, device=pl_module.device)
        counts = torch.cat([sums.flatten(), torch.tensor([float(self._positions)], device=sums.device)])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")  # every rank's positions
        means = (counts[:-1] / counts[-1].clamp(min=1)).view(3, loops).tolist()
        curves = {}
        for name, values in zip(QUANTITIES, means):
            curves[name] = [math.nan if n == 1 and name != "top_prob" else v for n, v in enumerate(values, start=1)]
            for n, value in enumerate(curves[name], start=1):
                if not math.isnan(value):
                    pl_module.log(f"{stage}/dynamics/{name}_loop{n}", value, sync_dist=False)
        if trainer.is_global_zero and not trainer.sanity_checking:
            log_figure(trainer, f"{stage}/dynamics", lambda: dynamics_figure(curves, pl_module.config.loops))
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger) and self._lens:
                    logger.experiment.add_text(f"{stage}/logit_lens", self._lens, global_step=trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")


def logit_lens(pred: LoopPredictions, decode=None) -> str:
    """Markdown table: the first sample's first labelled positions (columns) × loops (rows), each cell
    the readout's top token and its probability after that loop."""
    columns = (pred.sample == 0).nonzero().squeeze(1)[:LENS_POSITIONS].tolist()
    if not columns:
        return ""
    show = (lambda i: repr(decode([i]))) if decode is not None else str
    header = "| loop | " + " | ".join(f"labelled token {c + 1}" for c in range(len(columns))) + " |"
    lines = [header, "|" + " --- |" * (len(columns) + 1)]
    for n in range(pred.max_loops):
        cells = [f"{show(int(pred.preds[n, m]))} ({float(pred.top_prob[n, m]):.2f})" for m in columns]
        lines.append(f"| {n + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
