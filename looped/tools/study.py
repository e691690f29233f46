"""The width × problem-size study: which (mixer, width, size) cells a sweep solved.

``looped sweep`` leaves a ``cell.json`` beside each cell's runs (its task, size and one
label per axis, the metric and the "solved" threshold). This module turns the finished
runs into the study's table and heatmap: per task a row of panels, one panel per mixer
(every axis but ``width``), width on the y axis, problem size on the x axis, each cell
coloured and labelled by its final-answer accuracy, marked solved (✓) at ``accuracy ≥ solved_at``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CELL_FILE = "cell.json"
WIDTH = "width"


@dataclass(frozen=True)
class StudyPoint:
    task: str
    panel: str  # the labels of every axis but width, e.g. "mixer=linear"
    width: str
    size: str
    accuracy: float
    solved_at: float

    @property
    def solved(self) -> bool:
        return self.accuracy >= self.solved_at


def cell_record(version_dir: Path) -> dict | None:
    """The ``cell.json`` of a run made by ``looped sweep`` (in its version dir or a parent), else None."""
    for folder in (version_dir, *version_dir.parents[:2]):
        path = folder / CELL_FILE
        if path.exists():
            return json.loads(path.read_text())
    return None


def study_points(runs: Sequence) -> list[StudyPoint]:
    """One point per sweep cell with a test result (the best version, when a cell ran twice)."""
    best: dict[tuple, StudyPoint] = {}
    for run in runs:
        record = cell_record(run.path)
        if record is None:
            continue
        value = run.last(record["metric"])
        if value is None:
            continue
        cell = dict(record["cell"])
        task, size, width = cell.pop("task"), cell.pop("size"), cell.pop(WIDTH, "")
        panel = ", ".join(f"{axis}={label}" for axis, label in cell.items())
        point = StudyPoint(task, panel, str(width), str(size), float(value), float(record["solved_at"]))
        key = (task, panel, point.width, point.size)
        if key not in best or best[key].accuracy < point.accuracy:
            best[key] = point
    return list(best.values())


def _sorted(values) -> list[str]:
    """Numbers in numeric order, other labels alphabetically after them."""

    def key(v: str):
        try:
            return (0, float(v), "")
        except ValueError:
            return (1, 0.0, v)

    return sorted(set(values), key=key)


def study_table(points: Sequence[StudyPoint]) -> str:
    """Markdown: per task and panel, accuracy (%) by width (rows) and size (columns), ✓ = solved."""
    parts = []
    for task in sorted({p.task for p in points}):
        for panel in sorted({p.panel for p in points if p.task == task}):
            mine = {(p.width, p.size): p for p in points if p.task == task and p.panel == panel}
            sizes = _sorted(s for _, s in mine)
            header = [f"{task} ({panel}) width \\ size", *sizes]
            rows = []
            for width in _sorted(w for w, _ in mine):
                cells = []
                for size in sizes:
                    p = mine.get((width, size))
                    cells.append("—" if p is None else f"{100 * p.accuracy:.1f}{' ✓' if p.solved else ''}")
                rows.append([width, *cells])
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            parts.append("\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]))
    return "\n\n".join(parts)


def plot_study(points: Sequence[StudyPoint], path: Path):
    """The heatmap PNG: rows = tasks, columns = panels (mixers); returns the path, or None without points."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({p.task for p in points})
    panels = sorted({p.panel for p in points})
    fig, axes = plt.subplots(
        len(tasks),
        len(panels),
        figsize=(2.6 * len(panels) + 1.2, 2.4 * len(tasks) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for row, task in enumerate(tasks):
        widths = _sorted(p.width for p in points if p.task == task)
        sizes = _sorted(p.size for p in points if p.task == task)
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            grid = np.full((len(widths), len(sizes)), np.nan)
            for p in points:
                if p.task == task and p.panel == panel:
                    grid[widths.index(p.width), sizes.index(p.size)] = 100 * p.accuracy
                    label = f"{100 * p.accuracy:.0f}" + (" ✓" if p.solved else "")
                    ax.text(
                        sizes.index(p.size),
                        widths.index(p.width),
                        label,
                        ha="center",
                        va="center",
                        color="black" if p.accuracy > 0.6 else "white",
                        fontsize=8,
                    )
            image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(sizes)), sizes)
            ax.set_yticks(range(len(widths)), widths)
            ax.set_title(f"{task}: {panel}" if panel else task, fontsize=8)
            if row == len(tasks) - 1:
                ax.set_xlabel("problem size")
            if col == 0:
                ax.set_ylabel("width")
    fig.colorbar(image, ax=axes, shrink=0.9, label="final-answer accuracy %")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
