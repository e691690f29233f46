"""``ArcScore``: the official ARC-AGI score of a model's evaluation answers, and ARC Prize's submission file.

``DeepSupervision`` leaves each evaluation batch's answer at step N_sup in ``eval_answer`` (the predicted
token canvases and the Q-head's halt logit). This callback collects them with each row's index in the
set (``set_index`` in an ARC batch), gathers them from every rank, puts them back in the set's order and calls the
data module's ``score`` (``looped.datamodules.Arc.score``: each view's prediction cropped and mapped back by
its inverse, the views of a test input voting for two attempts, ties broken by the mean of σ(q_halt), TRM's
confidence). It logs ``{stage}/arc_score`` (the mean over evaluation tasks of the fraction of their test
outputs one of the two attempts equals), and after a test writes the attempts as ``submission.json``
(``{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}``) into the run's log directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from looped.datamodules.arc_scoring import submission
from looped.errors import InputError


class ArcScore(L.Callback):
    """Score ARC's validation and test sets as ARC Prize does (module docstring).

    Args:
        filename: the submission file written after a test, in the run's log directory.
    """

    def __init__(self, filename: str = "submission.json") -> None:
        self.filename = filename
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.submission_path: Path | None = None  # the last file written

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if data is None or not callable(getattr(data, "score", None)):
            raise InputError(
                "trainer.callbacks: ArcScore scores a data module that has score() (looped.datamodules.Arc); "
                "remove it for this data"
            )
        if not hasattr(pl_module, "eval_answer"):
            raise InputError(
                "trainer.callbacks: ArcScore reads DeepSupervision's eval_answer; set model.class_path: "
                "looped.DeepSupervision or remove the callback"
            )

    # -- collect --------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.parts = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        preds, q_halt = pl_module.eval_answer
        # uint8: ARC's 12 tokens; the papers' test set (400 tasks × 1,001 views × 900 cells) stays ~0.4 GB
        self.parts.append((batch["set_index"], preds.to(torch.uint8), q_halt))

    on_test_batch_end = on_validation_batch_end

    # -- score ----------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # the sanity check's two batches are not the set
            self.finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = self.finish(trainer, pl_module, "test")
        if result is not None and trainer.is_global_zero:
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.submission_path = folder / self.filename
            self.submission_path.write_text(json.dumps(submission(result["attempts"])))

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict | None:
        """Every rank's answers in the set's order, scored and logged; None when part of the set was not run."""
        parts, self.parts = self.parts, []
        if not parts:
            return None
        rows = torch.cat([r for r, _, _ in parts])
        preds = torch.cat([p for _, p, _ in parts])
        confident = parts[0][2] is not None
        # TRM's confidence is σ(q_halt) (evaluators/arc.py); without a Q-head the vote's ties go to the first seen.
        q = torch.cat([c.double().sigmoid() if confident else rows.new_zeros(len(r)) for r, _, c in parts])
        if trainer.world_size > 1:  # DistributedSampler gives every rank as many rows (padding repeats some)
            rows, preds, q = (pl_module.all_gather(t).flatten(0, 1) for t in (rows, preds, q))
        data = trainer.datamodule
        n = data.eval_rows(stage)
        rows = rows.cpu().numpy()
        seen = np.zeros(n, bool)
        seen[rows] = True
        if not seen.all():
            rank_zero_warn(f"ArcScore: {stage} ran {seen.sum()} of the set's {n} rows (limit_*_batches?); not scored")
            return None
        predictions = np.zeros((n, preds.shape[1]), np.int64)
        predictions[rows] = preds.cpu().numpy()
        confidence = np.zeros(n)
        confidence[rows] = q.cpu().numpy()
        result = data.score(predictions, confidence if confident else None, split=stage)
        pl_module.log(f"{stage}/arc_score", float(result["score"]), rank_zero_only=False)
        return result
