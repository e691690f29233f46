"""``IsoplotRecorder``: the points of the paper's isoplots (downstream accuracy vs log-perplexity).

Saunshi et al. 2025 compare looped and deep models at *equal validation
perplexity*: the looped model sits higher on reasoning tasks. This callback logs,
at the same global step, ``isoplot/log_perplexity`` (``val/loss``, the mean
cross-entropy) and ``isoplot/<metric>`` for each downstream metric, so
``looped report`` can draw ``isoplot.png`` from the event files.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from looped.errors import InputError


class IsoplotRecorder(L.Callback):
    """Record ``(val/loss, metrics)`` after validation as ``isoplot/*`` scalars and in ``.points``.

    Args:
        prefixes: a metric in ``trainer.callback_metrics`` is recorded when its name equals a
            prefix or continues it with ``/`` (``val/exact_match`` matches
            ``val/exact_match/dataloader_idx_0`` but not ``val/exact_match_loop3``).
        loss_key: the validation log-perplexity.
        every_n_steps: record only when ``global_step`` is a multiple of N; None: every validation.
    """

    def __init__(
        self,
        prefixes: Sequence[str] = ("val/exact_match",),
        loss_key: str = "val/loss",
        every_n_steps: int | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise InputError(f"IsoplotRecorder.every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.prefixes = list(prefixes)
        self.loss_key = loss_key
        self.every_n_steps = every_n_steps
        self.points: list[dict[str, float]] = []  # {"step", "log_perplexity", <metric>: value}

    def _matches(self, name: str) -> bool:
        return any(name == p or name.startswith(p + "/") for p in self.prefixes)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: only now are the epoch's
        # metrics in callback_metrics. Lightning forbids self.log here, so the
        # loggers are written to directly.
        step = trainer.global_step
        if trainer.sanity_checking or (self.every_n_steps and step % self.every_n_steps):
            return
        if self.points and self.points[-1]["step"] == step:
            return
        metrics = trainer.callback_metrics
        if self.loss_key not in metrics:
            return
        point = {"step": step, "log_perplexity": float(metrics[self.loss_key])}
        point.update({name: float(value) for name, value in metrics.items() if self._matches(name)})
        self.points.append(point)
        if trainer.is_global_zero:
            scalars = {f"isoplot/{k}": v for k, v in point.items() if k != "step"}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
