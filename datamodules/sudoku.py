"""Sudoku, the recursive reasoners' puzzle (TRM: Jolicoeur-Martineau 2025; HRM: Wang et al. 2025).

An N×N grid of boxes r×c (N = r·c: 2×2 → 4×4, 2×3 → 6×6, 3×3 → 9×9) is filled with the digits
1..N, each once per row, column and box. A puzzle keeps ``givens`` cells of a solution, chosen so
that the solution is the only one.

Tokens: ``.`` (a blank, id 0) and the digits ``1``..``N`` (id = the digit). A sample is the
puzzle read whole, row by row: ``input_ids`` ``[N·N]`` are the givens (0 where blank), and
``labels`` are the solution's digit at every cell, givens included (as TRM and HRM score: a
puzzle counts as solved when every cell is right, ``exact_match``).

Generation is serial: a random solution by randomised depth-first search, then cells removed in
random order while the solution stays unique (each removal is checked by a search for another
solution). It runs at tens to thousands of puzzles a second (9×9 to 4×4, ``docs/puzzles.md``),
too slow to feed training fresh ones, so each split is a pool drawn once per seed: the
validation and test sets, and a small training set of ``train_puzzles`` (the papers train on
1,000). Training samples are drawn from that pool with TRM's augmentations applied on the fly,
vectorised over the batch: the digits relabelled, the bands and the rows within each band
shuffled, the stacks and the columns within each stack shuffled, and (square boxes only: a 2×3
box transposed is a 3×2 one) the grid transposed — each maps a puzzle and its unique solution to
another such pair. The splits are disjoint as puzzles (no givens grid is in two of them); an
augmented training puzzle that equals a validation or test one is redrawn (``SyntheticTask``).
"""

from __future__ import annotations

import random

import numpy as np

from looped.datamodules.base import SyntheticTask, rows_as_keys
from looped.datamodules.train_set import _TEST, _TRAIN_SET, _VAL
from looped.errors import InputError

BOXES = {4: (2, 2), 6: (2, 3), 8: (2, 4), 9: (3, 3)}
"""The default box shape (rows, columns) of each grid size."""

FEWEST_GIVENS = {4: 4, 6: 8, 9: 17}
"""The fewest givens of any puzzle with a unique solution (9×9: McGuire et al. 2012), for the usual boxes."""

SPLITS = {"val": _VAL, "test": _TEST, "train": _TRAIN_SET}
TRIES = 200  # fresh solutions dug per puzzle kept, at worst, before ``givens`` is called impractical


class SudokuSolver:
    """Depth-first search over bitmasks, the most constrained blank cell first.

    ``search`` counts solutions up to a limit and the *guesses* it made: values tried at a cell
    that had two or more candidates. A cell with one candidate is forced (no guess), so a puzzle
    that single-candidate propagation solves needs 0 guesses; the count over a full uniqueness
    check (``limit=2``) is the puzzle's hardness (``Sudoku.hardness``).
    """

    def __init__(self, size: int, box: tuple[int, int]) -> None:
        r, c = box
        self.size, self.full = size, (1 << size) - 1
        cells = range(size * size)
        self.row = [i // size for i in cells]
        self.col = [i % size for i in cells]
        self.box = [(i // size) // r * (size // c) + (i % size) // c for i in cells]

    def search(
        self,
        cells: list[int],
        limit: int = 2,
        exclude: tuple[int, int] | None = None,
        shuffle: random.Random | None = None,
    ) -> tuple[int, int, list[int] | None]:
        """``(solutions found up to limit, guesses, the first solution)`` of ``cells`` (0 = blank).

        ``exclude=(cell, digit)`` forbids one digit at one cell; ``shuffle`` tries candidates in a random order.
        """
        rows, cols, boxes = [0] * self.size, [0] * self.size, [0] * self.size
        for i, v in enumerate(cells):
            if v:
                bit = 1 << (v - 1)
                if (rows[self.row[i]] | cols[self.col[i]] | boxes[self.box[i]]) & bit:
                    return 0, 0, None  # the givens contradict each other
                rows[self.row[i]] |= bit
                cols[self.col[i]] |= bit
                boxes[self.box[i]] |= bit
        grid, blanks = list(cells), [i for i, v in enumerate(cells) if not v]
        found, guesses, first = 0, 0, None
        banned = {exclude[0]: 1 << (exclude[1] - 1)} if exclude else {}
        R, C, B, full = self.row, self.col, self.box, self.full

        def step() -> None:
            nonlocal found, guesses, first
            if not blanks:
                found += 1
                first = first or list(grid)
                return
            best, best_mask, best_count = 0, 0, 99
            for k, i in enumerate(blanks):
                mask = full & ~(rows[R[i]] | cols[C[i]] | boxes[B[i]]) & ~banned.get(i, 0)
                count = mask.bit_count()
                if count < best_count:
                    best, best_mask, best_count = k, mask, count
                    if count <= 1:
                        break
            if best_count == 0:
                return
            blanks[best], blanks[-1] = blanks[-1], blanks[best]
            i = blanks.pop()
            digits = [d for d in range(self.size) if best_mask >> d & 1]
            if shuffle is not None:
                shuffle.shuffle(digits)
            for d in digits:
                bit = 1 << d
                guesses += best_count > 1
                rows[R[i]] |= bit
                cols[C[i]] |= bit
                boxes[B[i]] |= bit
                grid[i] = d + 1
                step()
                rows[R[i]] &= ~bit
                cols[C[i]] &= ~bit
                boxes[B[i]] &= ~bit
                if found >= limit:
                    break
            grid[i] = 0
            blanks.append(i)
            blanks[best], blanks[-1] = blanks[-1], blanks[best]

        step()
        return found, guesses, first

    def dig(self, givens: int, shuffle: random.Random) -> tuple[list[int], list[int]] | None:
        """A random solution and a puzzle of it with ``givens`` cells and a unique solution; None if stuck above."""
        _, _, solution = self.search([0] * self.size**2, limit=1, shuffle=shuffle)
        puzzle, left = list(solution), self.size**2
        order = list(range(self.size**2))
        shuffle.shuffle(order)
        for i in order:
            if left == givens:
                break
            digit, puzzle[i] = puzzle[i], 0
            # The solution stays unique iff no solution puts another digit at the removed cell.
            if self.search(puzzle, limit=1, exclude=(i, digit))[0]:
                puzzle[i] = digit
            else:
                left -= 1
        return (puzzle, solution) if left == givens else None


def band_permutation(rng: np.random.Generator, n: int, bands: int, width: int) -> np.ndarray:
    """``[n bands·width]``: per sample, the bands of ``width`` lines in a random order, each band's lines shuffled."""
    band_order = np.argsort(rng.random((n, bands)), axis=1)
    within = np.argsort(rng.random((n, bands, width)), axis=2)
    return (band_order[:, :, None] * width + within).reshape(n, bands * width)


def augment(
    givens: np.ndarray, solutions: np.ndarray, box: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """TRM's augmentations of ``[n N N]`` puzzles and solutions, one random draw per sample, both moved alike.

    Digits relabelled (blank stays blank), bands (rows in groups of r) and the rows within each
    shuffled, stacks (columns in groups of c) and the columns within each shuffled, and for square
    boxes a transposition half the time (with r ≠ c it would turn r×c boxes into c×r ones).
    """
    n, size, _ = givens.shape
    r, c = box
    relabel = np.concatenate([np.zeros((n, 1), np.int64), np.argsort(rng.random((n, size)), axis=1) + 1], axis=1)
    rows = band_permutation(rng, n, size // r, r)[:, :, None]
    cols = band_permutation(rng, n, size // c, c)[:, None, :]
    flip = rng.random(n) < 0.5 if r == c else np.zeros(n, bool)
    out = []
    for grid in (givens, solutions):
        grid = np.take_along_axis(relabel, grid.reshape(n, -1), axis=1).reshape(n, size, size)
        grid = grid[np.arange(n)[:, None, None], rows, cols]
        out.append(np.where(flip[:, None, None], grid.transpose(0, 2, 1), grid))
    return out[0], out[1]


class Sudoku(SyntheticTask):
    """Sudoku puzzles with a unique solution, read whole; the label at every cell is its solution digit.

    Args:
        size: N, the grid's side and the number of digits: 4, 6, 8 or 9.
        box: the box shape ``[rows, columns]``; its product must be N (default: 2×2, 2×3, 2×4, 3×3).
        givens: cells kept in each puzzle, the difficulty knob (fewer is harder; default ~40% of the
            cells). Random digging stalls above the proven minimum (9×9: about 22 and below is slow).
        min_guesses: hard mode, keep only puzzles whose hardness (``SudokuSolver``'s guesses over a
            uniqueness check) is at least this; 0 keeps every puzzle.
        train_puzzles: the small training set's size (the papers: 1,000); each training sample is
            one of them, augmented on the fly when ``augment``.
        augment: apply TRM's augmentations to training samples (never to validation and test).
        val_size: puzzles in the validation set (fewer than other tasks' 1,024: pools are drawn serially).
        test_size: puzzles in the test set.
        **kwargs: batch sizes, seed, workers (see ``SyntheticTask``). ``train_size`` would freeze a
            set of augmented samples; the papers' mode is ``train_puzzles``.
    """

    def __init__(
        self,
        size: int = 9,
        box: list[int] | None = None,
        givens: int | None = None,
        min_guesses: int = 0,
        train_puzzles: int = 1000,
        augment: bool = True,
        val_size: int = 256,
        test_size: int = 256,
        **kwargs,
    ) -> None:
        super().__init__(val_size=val_size, test_size=test_size, **kwargs)
        if size not in BOXES:
            raise InputError(f"data.size must be one of {sorted(BOXES)} (an N×N grid of r×c boxes), got {size}")
        r, c = BOXES[size] if box is None else (tuple(box) + (0, 0))[:2]
        if box is not None and len(box) != 2 or r < 2 or c < 2 or r * c != size:
            raise InputError(
                f"data.box {list(box)} does not tile a {size}×{size} grid: rows × columns must be {size}, "
                f"each >= 2 (e.g. data.box: {list(BOXES[size])})"
            )
        cells = size * size
        givens = round(0.4 * cells) if givens is None else givens
        if givens > cells:
            raise InputError(f"data.givens={givens} is more than the {cells} cells of a {size}×{size} grid; lower it")
        fewest = FEWEST_GIVENS.get(size, 1)  # r×c or c×r boxes alike: the transposed grid
        if givens < fewest:
            raise InputError(
                f"data.givens={givens}: no {size}×{size} sudoku with fewer than {fewest} givens has a unique "
                "solution; raise it"
            )
        if min_guesses < 0:
            raise InputError(f"data.min_guesses must be >= 0, got {min_guesses}")
        if train_puzzles < 1:
            raise InputError(f"data.train_puzzles must be >= 1, got {train_puzzles}")
        self.size, self.box, self.givens, self.min_guesses = size, (r, c), givens, min_guesses
        self.train_puzzles, self.augment = train_puzzles, augment
        self.solver = SudokuSolver(size, (r, c))
        self._pools: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def vocab(self) -> list[str]:
        return ["."] + [str(d) for d in range(1, self.size + 1)]

    @property
    def seq_len(self) -> int:
        return self.size * self.size

    def decode(self, ids) -> str:
        """The grid, a line per row: ``12.4/..3./...``."""
        text = super().decode(ids)
        return "/".join(text[i : i + self.size] for i in range(0, len(text), self.size))

    def hardness(self, givens: np.ndarray) -> np.ndarray:
        """Guesses a uniqueness check of each puzzle ``[n N N]`` needs (``SudokuSolver``; 0: propagation solves it).

        The search breaks ties between equally constrained cells in reading order, so an augmented
        copy of a puzzle may count a few guesses more or less.
        """
        return np.array([self.solver.search(g.ravel().tolist(), limit=2)[1] for g in givens], dtype=np.int64)

    def draw_puzzles(self, rng: np.random.Generator, n: int, exclude: set[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """``n`` new puzzles and solutions ``[n N N]`` (serial), none of whose givens are in ``exclude`` (updated)."""
        shuffle = random.Random(int(rng.integers(2**63)))
        givens, solutions, tries = [], [], 0
        while len(givens) < n:
            tries += 1
            if tries >= TRIES and len(givens) * TRIES < tries:  # under one puzzle per TRIES digs
                raise InputError(
                    f"data.givens={self.givens} (data.min_guesses={self.min_guesses}): too few puzzles of "
                    f"{self.size}×{self.size} come out of random digging; raise data.givens or lower data.min_guesses"
                )
            dug = self.solver.dig(self.givens, shuffle)
            if dug is None or self.min_guesses and self.solver.search(dug[0], limit=2)[1] < self.min_guesses:
                continue
            key = np.asarray(dug[0], dtype=np.int64).tobytes()
            if key in exclude:
                continue
            exclude.add(key)
            givens.append(dug[0])
            solutions.append(dug[1])
        shape = (n, self.size, self.size)
        return np.array(givens, np.int64).reshape(shape), np.array(solutions, np.int64).reshape(shape)

    def puzzles(self, split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(givens, solutions)`` of ``split`` (``train``, ``val`` or ``test``), int64 ``[n N N]``, 0 for a blank.

        The first ``n`` of the split's pool (default: all of it, ``train_puzzles``, ``val_size``,
        ``test_size``), drawn once per seed in the order val, test, train, each excluding the puzzles before it.
        """
        sizes = {"val": self.val_size, "test": self.test_size, "train": self.train_puzzles}
        if split not in sizes:
            raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if n is not None and not 0 <= n <= sizes[split]:
            key = {"val": "data.val_size", "test": "data.test_size", "train": "data.train_puzzles"}[split]
            raise InputError(f"the {split} split holds {sizes[split]} puzzles, asked for {n}; raise {key}")
        if split not in self._pools:
            seen: set[bytes] = set()
            for name in sizes:  # the earlier splits first: each excludes them
                if name not in self._pools:
                    self._pools[name] = self.draw_puzzles(self.rng(SPLITS[name], 0, 0), sizes[name], seen)
                seen.update(rows_as_keys(self._pools[name][0].reshape(sizes[name], -1)))
                if name == split:
                    break
        givens, solutions = self._pools[split]
        return givens[:n], solutions[:n]

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` training samples: puzzles of the training pool, uniformly with replacement, augmented."""
        givens, solutions = self.puzzles("train")
        rows = rng.integers(0, len(givens), size=n)
        givens, solutions = givens[rows], solutions[rows]
        if self.augment:
            givens, solutions = augment(givens, solutions, self.box, rng)
        return givens.reshape(n, -1), solutions.reshape(n, -1)

    def _build_eval_sets(self) -> None:
        if self._eval_sets:
            return
        for purpose, split in ((_VAL, "val"), (_TEST, "test")):
            givens, solutions = self.puzzles(split)
            self._eval_sets[purpose, None] = (givens.reshape(len(givens), -1), solutions.reshape(len(givens), -1))
        self._eval_keys = {key for x, _ in self._eval_sets.values() for key in rows_as_keys(x)}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit"):
            self.puzzles("train")  # once, before dataloader workers fork
