"""Halting against known depth: the loop each exit rule stops at, against the depth a sample needs.

A run tested with one evaluation set per required depth (p-hop's ``data.eval_hops``: sets
``hops1``, ``hops2``, …; i-GSM's ``data.eval_depths``: ``depth2``, ``depth3``, … by the query's DAG
depth) and ``AdaptiveExit`` logs, per rule and set, ``test/adaptive/<rule>/mean_loops_hops<p>`` (or
``_depth<d>``) and ``.../exact_match_hops<p>``. This module reads them
back into a table (a row per rule: mean exit loop and accuracy at each depth) and a figure (mean exit
loop against depth, a line per rule). A rule *tracks depth* when its mean exit loop rises from the
shallowest to the deepest set and never falls on the way: it spends more loops on the problems that
need more — what adaptive computation promises.
"""

from __future__ import annotations

import re
from pathlib import Path

from looped.tools.plots import pyplot, save

PATTERN = re.compile(r"^test/adaptive/(?P<rule>[^/]+)/(?P<metric>mean_loops|exact_match)_(?:hops|depth)(?P<depth>\d+)$")


def known_depth(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, dict[int, tuple[float, float]]]:
    """``{rule: {depth: (mean exit loop, exact match)}}`` from a run's scalars (last values); {} without them."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for tag, points in scalars.items():
        if (match := PATTERN.match(tag)) and points:
            found.setdefault(match["rule"], {}).setdefault(int(match["depth"]), {})[match["metric"]] = points[-1][1]
    return {
        rule: {d: (v["mean_loops"], v.get("exact_match", float("nan"))) for d, v in sorted(depths.items())}
        for rule, depths in found.items()
        if all("mean_loops" in v for v in depths.values())
    }


def tracks_depth(mean_loops: list[float]) -> bool:
    """Rises from the shallowest to the deepest depth and never falls on the way (0.05-loop tolerance)."""
    steps = [b - a for a, b in zip(mean_loops, mean_loops[1:])]
    return len(steps) > 0 and mean_loops[-1] - mean_loops[0] > 0.05 and min(steps) > -0.05


def known_depth_table(results: dict[str, dict[int, tuple[float, float]]]) -> str:
    """Markdown: a row per rule, a column per depth (``mean exit loop (exact match %)``), whether it tracks depth."""
    depths = sorted({d for by_depth in results.values() for d in by_depth})
    lines = [
        "| rule | " + " | ".join(f"depth {d}" for d in depths) + " | tracks depth |",
        "|" + "---|" * (len(depths) + 2),
    ]
    for rule, by_depth in results.items():
        cells = [f"{by_depth[d][0]:.2f} ({100 * by_depth[d][1]:.1f}%)" if d in by_depth else "—" for d in depths]
        track = "yes" if tracks_depth([by_depth[d][0] for d in depths if d in by_depth]) else "no"
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {track} |")
    return "\n".join(lines)


def plot_known_depth(results: dict[str, dict[int, tuple[float, float]]], path: Path) -> Path:
    """Mean exit loop against the depth the samples need, a line per rule."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for rule, by_depth in results.items():
        depths = sorted(by_depth)
        ax.plot(depths, [by_depth[d][0] for d in depths], marker="o", label=rule)
    ax.set_xlabel("depth the sample needs (hops / query DAG depth)")
    ax.set_ylabel("mean exit loop")
    ax.set_xticks(sorted({d for by_depth in results.values() for d in by_depth}))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=6, ncol=2)
    fig.tight_layout()
    return save(fig, path)
