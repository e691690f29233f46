"""The adaptive-depth comparison across runs: accuracy against mean loops per method, and the loops each
method needs to reach 99% of its own fixed-L accuracy.

Every run tested with ``PerLoopAccuracy`` and ``AdaptiveExit`` has operating points: a fixed loop count n
(``test/exact_match_loop{n}``, mean loops n) and every exit rule (``test/adaptive/<rule>/exact_match`` at
``.../mean_loops``). A run is a method (fixed L, random loops with the KL or stable rule, a learned gate
trained by Ouro's or PonderNet's objective: one recipe each); runs are grouped by task. Per task,
``looped report`` draws each method's Pareto front (accuracy against mean loops, one curve per run) and
tabulates the fewest mean loops at which any of its operating points reaches 99% of the accuracy of its
fixed trained L.
"""

from __future__ import annotations

import re
from pathlib import Path

from looped.adaptive import Point, pareto
from looped.tools.plots import pyplot, save

RULE = re.compile(r"^test/adaptive/(?P<rule>[^/]+)/(?P<metric>exact_match|mean_loops)$")
FIXED = re.compile(r"^test/exact_match_loop(?P<loops>\d+)$")
SHARE = 0.99
"""A method's target: this share of the accuracy of the same run at its fixed trained L."""


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


def loops_to_reach(points: list[Point], trained_loops: int) -> tuple[float, Point | None]:
    """The target (99% of the fixed-L accuracy) and the cheapest point reaching it (None: none does)."""
    fixed_l = next((p.accuracy for p in points if p.name == f"fixed_{trained_loops}"), None)
    if fixed_l is None:
        return float("nan"), None
    target = SHARE * fixed_l
    reaching = [p for p in points if p.accuracy >= target]
    return target, min(reaching, key=lambda p: (p.mean_loops, -p.accuracy), default=None)


def comparison_table(methods: dict[str, tuple[list[Point], int]]) -> str:
    """Markdown, a row per method: fixed-L accuracy, the cheapest point at 99% of it, its loops / L."""
    lines = [
        "| method | L | fixed-L exact match % | fewest mean loops at ≥ 99% of it | by | loops / L |",
        "|---|---|---|---|---|---|",
    ]
    for name, (points, trained) in methods.items():
        target, best = loops_to_reach(points, trained)
        if best is None:
            lines.append(f"| {name} | {trained} | — | — | — | — |")
            continue
        fixed_l = 100 * target / SHARE
        lines.append(
            f"| {name} | {trained} | {fixed_l:.1f} | {best.mean_loops:.2f} ({100 * best.accuracy:.1f}%) | "
            f"{best.name} | {best.mean_loops / trained:.2f} |"
        )
    return "\n".join(lines)


def plot_comparison(methods: dict[str, tuple[list[Point], int]], path: Path, title: str = "") -> Path:
    """Accuracy against mean loops: each method's Pareto front as a line, its other points faint."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (points, _) in methods.items():
        front = pareto(points)
        (line,) = ax.plot([p.mean_loops for p in front], [100 * p.accuracy for p in front], marker="o", label=name)
        rest = [p for p in points if p not in front]
        ax.scatter([p.mean_loops for p in rest], [100 * p.accuracy for p in rest], color=line.get_color(), alpha=0.3)
    ax.set_xlabel("mean loops used")
    ax.set_ylabel("exact match %")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return save(fig, path)
