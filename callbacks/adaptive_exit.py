"""``AdaptiveExit``: accuracy against mean loops when each test sequence stops once its answer settles.

At test, one forward per batch with ``loops=max_eval_loops`` gives every loop's
prediction (``looped.adaptive``); every rule and parameter then picks each
sample's exit loop from it. Logged per rule: ``test/adaptive/<rule>_<param>/exact_match``
and ``.../mean_loops``; printed as a table next to fixed loop counts; drawn as a
Pareto plot (``test/adaptive/pareto``) with a ``TensorBoardLogger``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from looped.adaptive import (
    Point,
    adaptive_exits,
    correct_at_exit,
    format_adaptive_table,
    pareto_figure,
    per_loop_predictions,
)
from looped.callbacks.per_loop import log_figure


class AdaptiveExit(L.Callback):
    """Score the ``stable`` and ``kl`` exit rules on the test set.

    Args:
        max_eval_loops: most loops a sequence may run (default: twice the trained L).
        patience: values of m for rule ``stable`` (argmax unchanged for m consecutive loops).
        kl_thresholds: values of τ for rule ``kl`` (``KL(p_n ‖ p_{n-1}) < τ`` at every labelled position).
    """

    def __init__(
        self,
        max_eval_loops: Optional[int] = None,
        patience: Sequence[int] = (1, 2, 3),
        kl_thresholds: Sequence[float] = (1e-1, 1e-2, 1e-3),
    ) -> None:
        if any(m < 1 for m in patience):
            raise ValueError(f"AdaptiveExit.patience: every m must be >= 1, got {list(patience)}")
        if any(t <= 0 for t in kl_thresholds):
            raise ValueError(f"AdaptiveExit.kl_thresholds: every threshold must be > 0, got {list(kl_thresholds)}")
        self.max_eval_loops = max_eval_loops
        self.patience = tuple(patience)
        self.kl_thresholds = tuple(kl_thresholds)
        self._fixed: Optional[Tensor] = None  # [n] right samples at each fixed loop count
        self._adaptive: dict[str, Tensor] = {}  # name -> [right samples, loops used]
        self._total: Optional[Tensor] = None

    def loops_to_eval(self, pl_module: L.LightningModule) -> int:
        return self.max_eval_loops or 2 * pl_module.config.loops

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._fixed = torch.zeros(self.loops_to_eval(pl_module), device=pl_module.device)
        self._adaptive = {}
        self._total = torch.zeros((), device=pl_module.device)

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        pred = per_loop_predictions(pl_module.model, batch["input_ids"], batch["labels"], self.loops_to_eval(pl_module))
        self._fixed += pred.correct.sum(dim=1)
        self._total += pred.batch_size
        for name, exits in adaptive_exits(pred, self.patience, self.kl_thresholds).items():
            sums = torch.stack([correct_at_exit(pred, exits).sum(), exits.sum()]).float()
            self._adaptive[name] = self._adaptive.get(name, 0) + sums

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        names = list(self._adaptive)
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        total = reduce(self._total).clamp(min=1)
        fixed = (reduce(self._fixed) / total).tolist()
        sums = reduce(torch.stack([self._adaptive[n] for n in names])) / total if names else []
        points = [Point(name, float(s[1]), float(s[0])) for name, s in zip(names, sums)]
        for p in points:
            pl_module.log(f"test/adaptive/{p.name}/exact_match", p.accuracy, sync_dist=False)
            pl_module.log(f"test/adaptive/{p.name}/mean_loops", p.mean_loops, sync_dist=False)
        trained = pl_module.config.loops
        rank_zero_info(format_adaptive_table(fixed, points, trained_loops=trained))
        if trainer.is_global_zero:
            log_figure(trainer, "test/adaptive/pareto", lambda: pareto_figure(fixed, points, trained_loops=trained))
