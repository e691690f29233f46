"""Recursive reasoners in the report: puzzles solved after every supervision step, a row per run.

``DeepSupervision`` tests from fresh states for ``eval_steps`` supervision steps and logs
``test/exact_match_step{s}`` (puzzles solved after step s) and ``test/cell_accuracy_step{s}``. This
module reads them back into the comparison issue 32 asks for — TRM, HRM, ``(k⊗L)`` and ``(kL⊗1)``, each
with and without deep supervision — with each run's parameters, counted training FLOPs and wall time,
and a figure of exact match against supervision steps (a line per run). Steps beyond the trained N_sup
are test-time depth the model never trained for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from looped.tools.plots import pyplot, save

STEP = re.compile(r"^test/exact_match_step(\d+)$")


@dataclass
class Reasoner:
    """One deep-supervision run as the table shows it."""

    label: str
    model: str  # ``architecture``'s words, and the mixer when it is not attention
    supervision_steps: int  # N_sup in training (1: no deep supervision)
    halting: str
    parameters: int | None
    step_flops: float | None  # forward FLOPs of one example's supervision step: the matched-compute axis
    training_flops: float | None
    minutes: float | None
    solved: dict[int, float]  # supervision step -> test exact match (fraction)


def solved_by_step(scalars: dict[str, list[tuple[int, float]]]) -> dict[int, float]:
    """``{s: test exact match after supervision step s}`` (last values); {} for a run without them."""
    found = {int(m[1]): points[-1][1] for tag, points in scalars.items() if (m := STEP.match(tag)) and points}
    return dict(sorted(found.items()))


def reasoners_table(rows: list[Reasoner]) -> str:
    """A row per run: its model, N_sup, size and cost, and test exact match (%) at steps 1, 2, N_sup and the
    last evaluated, with the best step."""
    header = "| run | model | N_sup (halting) | parameters | MFLOP / step | training TFLOP | minutes | step 1 | "
    header += "step 2 | step N_sup | last step | best (step) |\n|" + "---|" * 12
    lines = [header]
    for r in rows:
        pct = _percent(r.solved)
        last = max(r.solved)
        best = max(r.solved, key=lambda s: (r.solved[s], -s))

        params = "—" if r.parameters is None else f"{r.parameters / 1e3:.1f}K"
        step = "—" if r.step_flops is None else f"{r.step_flops / 1e6:.1f}"
        flops = "—" if r.training_flops is None else f"{r.training_flops / 1e12:.1f}"
        minutes = "—" if r.minutes is None else f"{r.minutes:.0f}"
        ds = "1 (no deep supervision)" if r.supervision_steps == 1 else f"{r.supervision_steps} ({r.halting})"
        cells = [f"`{r.label}`", r.model, ds, params, step, flops, minutes, pct(1), pct(2), pct(r.supervision_steps)]
        cells += [f"{pct(last)} (step {last})", f"{pct(best)} ({best})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(solved: dict[int, float]):
    return lambda step: "—" if step not in solved else f"{100 * solved[step]:.1f}"


def plot_reasoners(rows: list[Reasoner], path: Path, title: str = "") -> Path:
    """Test exact match against supervision steps at test time, a line per run; a marker at its N_sup."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        steps = list(r.solved)
        (line,) = axes.plot(steps, [100 * r.solved[s] for s in steps], marker=".", label=r.label)
        if r.supervision_steps in r.solved:
            axes.plot([r.supervision_steps], [100 * r.solved[r.supervision_steps]], "o", color=line.get_color())
    axes.set_xlabel("supervision steps at test (circle: N_sup in training)")
    axes.set_ylabel("test exact match (%)")
    axes.set_title(title or "Puzzles solved after each supervision step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return save(figure, path)
