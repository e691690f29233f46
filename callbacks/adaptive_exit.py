"""``AdaptiveExit``: accuracy against mean loops when each test sequence stops once its answer settles.

At test, the one forward per batch with ``loops=max_eval_loops`` that ``LoopedLM`` shares with
every loop reader gives every loop's prediction (``looped.evaluation.loop_readout``); every rule and
parameter then picks each sample's exit loop from it. Logged per rule: ``test/adaptive/<rule>_<param>/exact_match``
and ``.../mean_loops`` over all test sets, and with the data module's ``eval_names``
also per set (``.../exact_match_<name>``, ``.../mean_loops_<name>``); printed as a
table next to fixed loop counts; drawn as a Pareto plot (``test/adaptive/pareto``)
with a ``TensorBoardLogger``. A model with a Mixture-of-Recursions router is also scored by the depths its
router gave each sample's labelled tokens (rules ``router_top_k`` and ``router_causal``, ``routed_exits``):
the known-depth table's "does the router send deeper problems deeper?".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from looped.callbacks.per_loop import log_figure
from looped.errors import InputError
from looped.evaluation.exits import (
    ROUTER_RULES,
    Point,
    adaptive_exits,
    correct_at_exit,
    format_adaptive_table,
    routed_exits,
    rule_name,
)
from looped.evaluation.loop_readout import loop_predictions
from looped.tools.plots import pareto_figure


class AdaptiveExit(L.Callback):
    """Score the exit rules of ``looped.evaluation.exits`` on the test set (``gate`` when the model has an exit gate).

    Args:
        max_eval_loops: most loops a sequence may run (default: twice the trained L).
        patience: values of m for rule ``stable`` (argmax unchanged for m consecutive loops).
        kl_thresholds: values of τ for rule ``kl`` (``KL(p_n ‖ p_{n-1}) < τ`` at every labelled position).
        entropy_thresholds: values of τ for rule ``entropy`` (``H(p_n) < τ`` nats at every labelled position).
        gate_quantiles: values of q for rule ``gate`` (the learned cumulative exit probability reaches q).
        gate_sample: also score rule ``gate_sample``, each sample's exit loop drawn from the gate's exit
            distribution (PonderNet's sampling; seeded, so a test run is reproducible).
    """

    def __init__(
        self,
        max_eval_loops: int | None = None,
        patience: Sequence[int] = (1, 2, 3),
        kl_thresholds: Sequence[float] = (1e-1, 1e-2, 1e-3),
        entropy_thresholds: Sequence[float] = (1e-1, 1e-2),
        gate_quantiles: Sequence[float] = (0.5, 0.9),
        gate_sample: bool = True,
    ) -> None:
        if any(m < 1 for m in patience):
            raise InputError(f"AdaptiveExit.patience: every m must be >= 1, got {list(patience)}")
        for name, values in (("kl_thresholds", kl_thresholds), ("entropy_thresholds", entropy_thresholds)):
            if any(t <= 0 for t in values):
                raise InputError(f"AdaptiveExit.{name}: every threshold must be > 0, got {list(values)}")
        if any(not 0 < q <= 1 for q in gate_quantiles):
            raise InputError(f"AdaptiveExit.gate_quantiles: every q must lie in (0, 1], got {list(gate_quantiles)}")
        self.max_eval_loops = max_eval_loops
        self.patience = tuple(patience)
        self.kl_thresholds = tuple(kl_thresholds)
        self.entropy_thresholds = tuple(entropy_thresholds)
        self.gate_quantiles = tuple(gate_quantiles)
        self.gate_sample = gate_sample
        self._draws: torch.Generator | None = None  # gate_sample's draws, reseeded at every test start
        self._gate = False  # whether the model under test has a learned exit gate (set at test start)
        self._router = False  # whether it has a Mixture-of-Recursions router (its depths: rules router_*)
        # Per test dataloader: [right at each fixed loop count..., samples, (right, loops used) per rule...].
        self._counts: dict[int, Tensor] = {}

    def loops_to_eval(self, pl_module: L.LightningModule) -> int:
        return self.max_eval_loops or 2 * pl_module.config.loops

    def loops_to_read(self, pl_module: L.LightningModule, stage: str) -> int:
        return self.loops_to_eval(pl_module) if stage == "test" else 0

    @property
    def rules(self) -> list[str]:
        """Every rule and parameter, in the order ``adaptive_exits`` returns them."""
        return (
            [rule_name("stable", m) for m in self.patience]
            + [rule_name("kl", t) for t in self.kl_thresholds]
            + [rule_name("entropy", t) for t in self.entropy_thresholds]
            + [rule_name("gate", q) for q in self.gate_quantiles if self._gate]
            + (["gate_sample"] if self._gate and self.gate_sample else [])
            + (list(ROUTER_RULES) if self._router else [])
        )

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._counts = {}
        self._gate = getattr(pl_module.model, "exit_gate", None) is not None
        self._router = getattr(pl_module.model, "router", None) is not None
        self._draws = torch.Generator().manual_seed(0) if self._gate and self.gate_sample else None

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx, dataloader_idx=0) -> None:
        pred = loop_predictions(pl_module, batch, self.loops_to_eval(pl_module))
        gates = self.gate_quantiles if self._gate else ()
        exits = adaptive_exits(pred, self.patience, self.kl_thresholds, self.entropy_thresholds, gates, self._draws)
        scored = {r: (correct_at_exit(pred, e), e) for r, e in exits.items()}
        if self._router:  # the router's own depths, from forwards of their own
            scored |= routed_exits(pl_module.model, batch["input_ids"], batch["labels"])
        per_rule = [torch.stack([scored[r][0].sum(), scored[r][1].sum()]).float() for r in self.rules]
        samples = torch.tensor([float(pred.batch_size)], device=pred.correct.device)
        row = torch.cat([pred.correct.sum(dim=1).float(), samples, *per_rule])
        self._counts[dataloader_idx] = self._counts.get(dataloader_idx, 0) + row

    def _points(self, counts: Tensor, loops: int) -> tuple[list[float], list[Point]]:
        """Accuracy at each fixed loop count, and each rule's point, from summed count rows ``[sets, ...]``."""
        counts = counts.sum(0)
        total = counts[loops].clamp(min=1)
        fixed = (counts[:loops] / total).tolist()
        per_rule = (counts[loops + 1 :].view(len(self.rules), 2) / total).tolist()
        return fixed, [Point(name, loops_used, right) for name, (right, loops_used) in zip(self.rules, per_rule)]

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        names = pl_module.eval_names
        loops = self.loops_to_eval(pl_module)
        # One row per test set, the same shape on every rank whatever batches it saw; one reduce for all.
        counts = torch.zeros(max(len(names), 1), loops + 1 + 2 * len(self.rules), device=pl_module.device)
        for i, row in self._counts.items():
            counts[i] = row
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        fixed, points = self._points(counts, loops)  # all sets together
        for p in points:
            pl_module.log(f"test/adaptive/{p.name}/exact_match", p.accuracy, sync_dist=False)
            pl_module.log(f"test/adaptive/{p.name}/mean_loops", p.mean_loops, sync_dist=False)
        for i, name in enumerate(names):  # and each named set on its own
            for p in self._points(counts[i : i + 1], loops)[1]:
                pl_module.log(f"test/adaptive/{p.name}/exact_match_{name}", p.accuracy, sync_dist=False)
                pl_module.log(f"test/adaptive/{p.name}/mean_loops_{name}", p.mean_loops, sync_dist=False)
        trained = pl_module.config.loops
        rank_zero_info(format_adaptive_table(fixed, points, trained_loops=trained))
        if trainer.is_global_zero:
            log_figure(trainer, "test/adaptive/pareto", lambda: pareto_figure(fixed, points, trained_loops=trained))
