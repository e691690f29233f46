"""One table of evaluation results: a row per evaluation set (the pooled row last), a column per metric.

``trainer.validate``/``trainer.test`` return one dict per dataloader, and ``LoopedLM`` logs
every metric at epoch end (``test/exact_match`` over all sets, ``test/exact_match_<set>`` per
named set), so each dict holds all of them and Lightning's own printout repeats the lot once per
dataloader. ``LoopedCLI`` asks for no printout (``verbose=False``; the returned metrics and
what is logged are unchanged) and prints this table instead. ``PerLoopAccuracy``'s
``exact_match_loop{n}`` become the columns ``loop1 … loopN``, the trained L starred; ``DeepSupervision``'s
``exact_match_step{n}`` the columns ``step1 … stepN``, the trained N_sup starred (its ``cell_accuracy_step{n}``
stay in TensorBoard and the returned metrics).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

POOLED = "all"
"""The row of the metrics over every evaluation set together."""
COLUMNS = {  # metric -> header, in this order; other metrics follow in the order they were logged
    "exact_match": "exact match %",
    "token_accuracy": "token acc %",
    "loss": "loss",
    "perplexity": "perplexity",
    "answer_accuracy": "answer acc %",
}
LOOP = re.compile(r"^exact_match_loop(\d+)$")
OWN_TABLE = ("adaptive/", "dynamics/")
"""Metrics a callback shows on its own (``AdaptiveExit``: a table, a row per rule; ``LoopDynamics``: curves), kept
out of this one."""
STEP = re.compile(r"^exact_match_step(\d+)$")
"""``DeepSupervision``'s puzzles solved after each supervision step."""
CELL_STEP = re.compile(r"^cell_accuracy_step(\d+)$")
PERPLEXITY_LOOP = re.compile(r"^perplexity_loop(\d+)$")
"""``PerLoopAccuracy(perplexity=True)``'s per-loop perplexities: a second table, a column per loop."""


def merge_results(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The per-dataloader dicts ``trainer.test`` returns, as one (a key logged at epoch end is in all of them)."""
    merged: dict[str, float] = {}
    for result in results:
        merged.update({key: float(value) for key, value in result.items()})
    return merged


def eval_rows(
    metrics: Mapping[str, float], stage: str, eval_names: Sequence[str]
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """``(metric columns, {row: {metric: value}})`` from ``{stage}/{metric}[_{set}]`` keys; pooled row last.

    A key ends in ``_{set}`` for a named set only if the pooled ``{stage}/{metric}`` exists too,
    so a metric whose own name ends like a set's is not split.
    """
    prefix = f"{stage}/"
    rows: dict[str, dict[str, float]] = {name: {} for name in [*eval_names, POOLED]}
    by_length = sorted(eval_names, key=len, reverse=True)
    for key, value in metrics.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name.startswith(OWN_TABLE):
            continue
        row, metric = POOLED, name
        for set_name in by_length:
            base = name[: -len(set_name) - 1]
            if name.endswith(f"_{set_name}") and base and f"{prefix}{base}" in metrics:
                row, metric = set_name, base
                break
        rows[row][metric] = value
    rows = {row: values for row, values in rows.items() if values}
    seen = list(dict.fromkeys(metric for values in rows.values() for metric in values))
    loops = sorted((m for m in seen if LOOP.match(m)), key=lambda m: int(LOOP.match(m).group(1)))
    known = [m for m in COLUMNS if m in seen]
    steps = sorted((m for m in seen if STEP.match(m)), key=lambda m: int(STEP.match(m).group(1)))
    per_step = (PERPLEXITY_LOOP, STEP, CELL_STEP)
    others = [m for m in seen if m not in COLUMNS and m not in loops and not any(p.match(m) for p in per_step)]
    return [*known, *others, *loops, *steps], rows


def perplexity_loop_columns(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The ``perplexity_loop{n}`` metrics present, in loop order."""
    seen = {m for values in rows.values() for m in values if PERPLEXITY_LOOP.match(m)}
    return sorted(seen, key=lambda m: int(PERPLEXITY_LOOP.match(m).group(1)))


def header(metric: str, trained_loops: int | None, trained_steps: int | None = None) -> str:
    if match := LOOP.match(metric) or PERPLEXITY_LOOP.match(metric):
        n = int(match.group(1))
        return f"loop{n}" + ("*" if n == trained_loops else "")
    if match := STEP.match(metric):
        n = int(match.group(1))
        return f"step{n}" + ("*" if n == trained_steps else "")
    return COLUMNS.get(metric, metric)


def cell(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    if "accuracy" in metric or "exact_match" in metric:
        return f"{100 * value:.1f}"
    if metric == "loss":
        return f"{value:.4f}"
    if metric == "perplexity" or PERPLEXITY_LOOP.match(metric):
        return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"
    return f"{value:.4g}"


def eval_table(
    metrics: Mapping[str, float],
    stage: str,
    eval_names: Sequence[str] = (),
    trained_loops: int | None = None,
    title: str | None = None,
    trained_steps: int | None = None,
) -> Table:
    """The rich ``Table`` of ``metrics`` (``{stage}/...`` keys) by evaluation set."""
    columns, rows = eval_rows(metrics, stage, eval_names)
    captions = []
    if any(LOOP.match(c) for c in columns):
        captions.append("loopN: exact match % read out after N loops (* = trained L; beyond it, extrapolation)")
    if any(STEP.match(c) for c in columns):
        captions.append("stepN: exact match % after N supervision steps (* = trained N_sup)")
    return _table(rows, columns, trained_loops, title or stage, "; ".join(captions) or None, trained_steps)


def perplexity_loop_table(
    metrics: Mapping[str, float], stage: str, eval_names: Sequence[str] = (), trained_loops: int | None = None
) -> Table | None:
    """Perplexity after every loop by evaluation set (``PerLoopAccuracy(perplexity=True)``); None without it."""
    _, rows = eval_rows(metrics, stage, eval_names)
    columns = perplexity_loop_columns(rows)
    if not columns:
        return None
    rows = {row: values for row, values in rows.items() if any(c in values for c in columns)}
    caption = "loopN: perplexity of the labelled tokens read out after N loops (* = trained L)"
    return _table(rows, columns, trained_loops, f"{stage}: perplexity after every loop", caption)


def _table(rows, columns, trained_loops, title, caption, trained_steps=None) -> Table:
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left")
    # Columns never narrower than their widest entry: on a narrow terminal the table runs past the edge
    # instead of cutting every number to "0.…".
    cells = {metric: [cell(metric, values.get(metric)) for values in rows.values()] for metric in columns}
    table.add_column("set", style="bold", no_wrap=True, min_width=max(map(len, rows)))
    for metric in columns:
        label = header(metric, trained_loops, trained_steps)
        table.add_column(label, justify="right", no_wrap=True, min_width=max(len(label), *map(len, cells[metric])))
    for i, row in enumerate(rows):  # a rule above the pooled row when there are sets to pool
        table.add_row(row, *(cells[metric][i] for metric in columns), end_section=i == len(rows) - 2)
    return table


def print_eval_table(
    results: Sequence[Mapping[str, float]],
    stage: str,
    eval_names: Sequence[str] = (),
    trained_loops: int | None = None,
    title: str | None = None,
    trained_steps: int | None = None,
) -> None:
    """Print ``eval_table`` of what ``trainer.validate``/``trainer.test`` returned, to stdout."""
    metrics = merge_results(results)
    if not metrics:
        return
    tables = [eval_table(metrics, stage, eval_names, trained_loops, title, trained_steps)]
    tables += [t for t in [perplexity_loop_table(metrics, stage, eval_names, trained_loops)] if t is not None]
    for table in tables:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: as wide as the table needs, not rich's default 80
            console = Console(width=max(80, Console(width=1000).measure(table).maximum))
        console.print(table)
