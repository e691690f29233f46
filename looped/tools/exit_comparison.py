"""The adaptive-depth comparison across runs: accuracy against mean loops per method, and the loops each
method needs to reach 99% of the fixed-L model's accuracy.

Every run tested with ``PerLoopAccuracy`` and ``AdaptiveExit`` has operating points: a fixed loop count n
(``test/exact_match_loop{n}``, mean loops n) and every exit rule (``test/adaptive/<rule>/exact_match`` at
``.../mean_loops``). A run is a method (fixed L, random loops with the KL or stable rule, a learned gate
trained by Ouro's or PonderNet's objective: one recipe each); runs are grouped by task. Per task,
``looped report`` draws each method's Pareto front (accuracy against mean loops, one curve per run) and
tabulates the fewest mean loops at which any of its operating points reaches 99% of the *fixed-L model's*
accuracy: the best accuracy at its trained L of the task's plainly looped runs (no random loop counts, no
exit objective). A method that trains for adaptive depth and loses accuracy doing so never reaches it; its
own accuracy at L and the loops it needs for 99% of *that* are tabulated beside, so both costs show.
"""

from __future__ import annotations

import re
from pathlib import Path

from looped.evaluation.exits import Point, pareto
from looped.tools.plots import pyplot, save

RULE = re.compile(r"^test/adaptive/(?P<rule>[^/]+)/(?P<metric>exact_match|mean_loops)$")
FIXED = re.compile(r"^test/exact_match_loop(?P<loops>\d+)$")
SHARE = 0.99
"""A method's target: this share of the fixed-L model's accuracy (and, beside it, of its own at L)."""


def operating_points(scalars: dict[str, list[tuple[int, float]]]) -> list[Point]:
    """Fixed loop counts and every exit rule of one run (last logged values); [] without AdaptiveExit."""
    rules: dict[str, dict[str, float]] = {}
    fixed = []
    for tag, series in scalars.items():
        if not series:
            continue
        if match := RULE.match(tag):
            rules.setdefault(match["rule"], {})[match["metric"]] = series[-1][1]
        elif match := FIXED.match(tag):
            fixed.append(Point(f"fixed_{match['loops']}", float(match["loops"]), series[-1][1]))
    if not rules:
        return []
    adaptive = [Point(name, v["mean_loops"], v["exact_match"]) for name, v in rules.items() if len(v) == 2]
    return sorted(fixed, key=lambda p: p.mean_loops) + adaptive


def accuracy_at(points: list[Point], loops: int) -> float | None:
    """The accuracy of the fixed loop count ``loops`` among ``points`` (None: not tested)."""
    return next((p.accuracy for p in points if p.name == f"fixed_{loops}"), None)


def cheapest_reaching(points: list[Point], target: float) -> Point | None:
    """The operating point with the fewest mean loops at ``target`` accuracy or above (None: none reaches it)."""
    reaching = [p for p in points if p.accuracy >= target]
    return min(reaching, key=lambda p: (p.mean_loops, -p.accuracy), default=None)


def comparison_table(methods: dict[str, tuple[list[Point], int, bool]]) -> str:
    """Markdown, a row per method ``{name: (points, trained L, plainly looped)}``: the loops it needs for 99% of
    the fixed-L model's accuracy (the best plainly looped run's at its L), and for 99% of its own at L."""
    plain = [accuracy_at(points, loops) for points, loops, is_plain in methods.values() if is_plain]
    reference = max((acc for acc in plain if acc is not None), default=None)

    def cell(best: Point | None, trained: int) -> str:
        if best is None:
            return "never | — | —"
        return f"{best.mean_loops:.2f} ({100 * best.accuracy:.1f}%) | {best.name} | {best.mean_loops / trained:.2f}"

    head = (
        f"≥ 99% of the fixed-L model's {100 * reference:.1f}%: fewest mean loops | by | loops / L"
        if reference is not None
        else "(no plainly looped run of this task) | by | loops / L"
    )
    lines = [
        f"| method | L | exact match % at L | {head} | ≥ 99% of its own: fewest mean loops | loops / L |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (points, trained, _) in methods.items():
        own = accuracy_at(points, trained)
        if own is None:
            lines.append(f"| {name} | {trained} | — | — | — | — | — | — |")
            continue
        against_fixed = (
            "— | — | —" if reference is None else cell(cheapest_reaching(points, SHARE * reference), trained)
        )
        mine = cheapest_reaching(points, SHARE * own)
        lines.append(
            f"| {name} | {trained} | {100 * own:.1f} | {against_fixed} | {mine.mean_loops:.2f} ({mine.name}) | "
            f"{mine.mean_loops / trained:.2f} |"
        )
    return "\n".join(lines)


def plot_comparison(methods: dict[str, tuple[list[Point], int, bool]], path: Path, title: str = "") -> Path:
    """Accuracy against mean loops: each method's Pareto front as a line, its other points faint."""
    plt = pyplot()
    # The legend goes under the axes, a line per method (their names are long): the figure grows with it.
    legend_height = 0.155 * len(methods)  # inches: one line per method
    fig, ax = plt.subplots(figsize=(5.5, 3.4 + legend_height))
    for name, (points, *_) in methods.items():
        front = pareto(points)
        (line,) = ax.plot([p.mean_loops for p in front], [100 * p.accuracy for p in front], marker="o", label=name)
        rest = [p for p in points if p not in front]
        ax.scatter([p.mean_loops for p in rest], [100 * p.accuracy for p in rest], color=line.get_color(), alpha=0.3)
    ax.set_xlabel("mean loops used")
    ax.set_ylabel("exact match %")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="lower center", fontsize=7, ncol=1, frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    return save(fig, path)
