"""How many loops a training step runs, and how many of them get gradients.

The paper trains with a fixed L. Training with a random loop count (uniform,
or the log-normal Poisson of Geiping et al. 2025, "Huginn") and backpropagating
through the last loops only teaches the block to be a stable iteration, so the
model keeps (or improves) its accuracy when run for more loops than trained.

The count is drawn from a generator seeded by ``(seed, global_step)``: every
rank runs the same number of loops (sharded collectives must match), and a
resumed run draws the same counts as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from looped.errors import InputError


@dataclass
class LoopSchedule:
    """Loop count per training step.

    Args:
        distribution: ``fixed`` (always L, the paper), ``uniform`` on
            ``[min_loops, max_loops]``, or ``lognormal_poisson`` with mean ``mean_loops``.
        min_loops: smallest count (uniform; floor for lognormal_poisson).
        max_loops: largest count (uniform: default 2L; lognormal_poisson: a cap, default 4L).
        mean_loops: mean of lognormal_poisson (default L).
        sigma: log-normal spread of lognormal_poisson.
        grad_loops: truncated backpropagation: only the last ``grad_loops`` loops get
            gradients (None: all). Pair it with ``input_injection: add`` so the embedding
            still gets a gradient through the re-injected input.
        per_loop_loss_weight: weight of an auxiliary loss on every loop's readout
            (0: only the last loop is trained, as in the paper).
        seed: seed of the count sequence (the same on every rank).
        curriculum: retrofitted recurrence's ramp (McLeish et al. 2025) of the mean loop count, from
            ``curriculum_start`` at step 0 to the target (``mean_loops``, default L) at ``curriculum_steps``:
            ``linear``, fraction f = step / curriculum_steps of the way, or ``one_minus_sqrt``, 1 − √(1 − f) of
            the way (fast at first). ``fixed`` then runs round(mean) loops, ``lognormal_poisson`` draws around
            the mean. With ``grad_loops`` the backprop depth ramps alike from 1 to ``grad_loops`` (rounded up).
        curriculum_steps: the steps the ramp takes (then the target holds).
        curriculum_start: the mean loop count at step 0.
    """

    distribution: Literal["fixed", "uniform", "lognormal_poisson"] = "fixed"
    min_loops: int = 1
    max_loops: int | None = None
    mean_loops: float | None = None
    sigma: float = 0.5
    grad_loops: int | None = None
    per_loop_loss_weight: float = 0.0
    seed: int = 0
    curriculum: Literal["none", "linear", "one_minus_sqrt"] = "none"
    curriculum_steps: int = 0
    curriculum_start: float = 1.0

    def __post_init__(self) -> None:
        if self.curriculum != "none":
            if self.curriculum_steps < 1:
                raise InputError(
                    f"model.init_args.loop_schedule.curriculum_steps must be >= 1 with curriculum {self.curriculum}, "
                    f"got {self.curriculum_steps}"
                )
            if self.distribution == "uniform":
                raise InputError(
                    "model.init_args.loop_schedule.curriculum ramps a mean: use distribution fixed or "
                    "lognormal_poisson, not uniform"
                )
            if self.curriculum_start < 1:
                raise InputError(
                    f"model.init_args.loop_schedule.curriculum_start must be >= 1, got {self.curriculum_start}"
                )
        if self.min_loops < 1:
            raise InputError(f"model.init_args.loop_schedule.min_loops must be >= 1, got {self.min_loops}")
        if self.grad_loops is not None and self.grad_loops < 1:
            raise InputError(f"model.init_args.loop_schedule.grad_loops must be >= 1 or null, got {self.grad_loops}")
        if self.max_loops is not None and self.max_loops < self.min_loops:
            raise InputError(
                f"model.init_args.loop_schedule.max_loops={self.max_loops} is below min_loops={self.min_loops}; "
                "raise max_loops or lower min_loops"
            )

    def progress(self, step: int) -> float:
        """How far along the curriculum step ``step`` is, in [0, 1] (1 without one)."""
        if self.curriculum == "none":
            return 1.0
        f = min(max(step, 0) / self.curriculum_steps, 1.0)
        return f if self.curriculum == "linear" else 1.0 - math.sqrt(1.0 - f)

    def mean_at(self, trained_loops: int, step: int) -> float:
        """The mean loop count at step ``step``: the curriculum's ramp, or the target."""
        target = self.mean_loops or trained_loops
        return self.curriculum_start + (target - self.curriculum_start) * self.progress(step)

    def grad_loops_at(self, step: int) -> int | None:
        """The backprop depth at step ``step``: ``grad_loops`` ramped from 1 along the curriculum (None: all)."""
        if self.grad_loops is None or self.curriculum == "none":
            return self.grad_loops
        return math.ceil(1 + (self.grad_loops - 1) * self.progress(step))

    def sample(self, trained_loops: int, step: int) -> int:
        """The loop count of training step ``step``."""
        if self.distribution == "fixed":
            return trained_loops if self.curriculum == "none" else max(1, round(self.mean_at(trained_loops, step)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.distribution == "uniform":
            high = self.max_loops or 2 * trained_loops
            return int(torch.randint(self.min_loops, high + 1, (), generator=generator))
        mean = self.mean_at(trained_loops, step)
        tau = torch.normal(math.log(mean) - self.sigma**2 / 2, self.sigma, (), generator=generator)
        count = int(torch.poisson(tau.exp().reshape(1), generator=generator)) + 1
        return max(self.min_loops, min(count, self.max_loops or 4 * trained_loops))
