"""Mazes (TRM's and HRM's Maze-Hard): mark the shortest path from the start to the goal.

An N×N grid of open cells and walls is a random perfect maze: the open cells at odd coordinates
are joined along a uniform random spanning tree (Aldous–Broder), so between any two cells there
is exactly one path, which is therefore the unique shortest one. An even N leaves its last row
and column wall. The start and the goal are two of those cells; the hard mode (``min_path``)
keeps only pairs whose path is long (the papers' Maze-Hard: paths longer than 110 cells on 30×30).

Tokens: ``.`` open (0), ``#`` wall (1), ``S`` start (2), ``G`` goal (3), ``o`` path (4). A sample
is the grid read whole, row by row: ``input_ids`` ``[N·N]`` are the grid, and ``labels`` the
same grid with the open cells of the shortest path written ``o``, at every cell (as TRM and HRM
score: a maze counts as solved when every cell is right, ``exact_match``).

Generation is vectorised: every maze of a batch takes its random-walk step at once, and the
distances from the start and from the goal are breadth-first searches over the whole batch
(one numpy step per distance). The path is the cells whose two distances add up to the start's
distance to the goal, one per distance exactly when it is unique (checked: a sample that fails
it is dropped).

Augmentation (``augment``, TRM's for Maze-Hard): each training maze and its labels moved by one
of the 8 symmetries of the square (``grids.py``); ``move(..., inverse=True)`` moves a prediction on
a moved maze back onto the maze itself.

``maze-dataset`` (PyPI), the field's maze library, is not used: it builds one Python object per
maze with a serial generator, 2.5× (its DFS) to 50× (Wilson's, uniform like this) slower than this
at 15×15 and 30×30 (``docs/puzzles.md``); its 1.4.2 fails to import with the newest ``muutils``
(0.9); and it brings jupyter, ipython and ~70 other packages with it.
"""

from __future__ import annotations

import numpy as np

from looped.datamodules.base import SyntheticTask, draw_kept, rows_as_keys
from looped.datamodules.grids import INVERSE, dihedral_batch
from looped.datamodules.train_set import _TEST, _TRAIN_SET, _VAL
from looped.errors import InputError

OPEN, WALL, START, GOAL, PATH = 0, 1, 2, 3, 4
STEPS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])
_AUGMENT = 4  # the seed purpose of the augmentations' draws (base's are 0..3)


def spanning_tree_mazes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``[n size size]`` int8 grids, 1 = wall: perfect mazes on the odd cells by Aldous–Broder, all walks at once.

    A walker carves the wall to each cell it enters for the first time; a uniform spanning tree when
    it has visited all. A step off the lattice stays put (the walk's moves are unchanged, so is the tree).
    """
    m = (size - 1) // 2  # lattice cells per side; cell (i, j) sits at grid (2i+1, 2j+1)
    grid = np.ones((n, size, size), np.int8)
    grid[:, 1 : 2 * m : 2, 1 : 2 * m : 2] = OPEN
    # Flat tables, so that a step is a few gathers: neighbour of each cell per direction, the wall between.
    i, j = np.divmod(np.arange(m * m), m)
    ni, nj = i[:, None] + STEPS[:, 0], j[:, None] + STEPS[:, 1]  # [m² 4]
    inside = (ni >= 0) & (ni < m) & (nj >= 0) & (nj < m)
    neighbour = np.where(inside, ni * m + nj, np.arange(m * m)[:, None])
    wall = np.where(inside, (i[:, None] + ni + 1) * size + j[:, None] + nj + 1, 0)
    flat = grid.reshape(n, -1)
    visited = np.zeros((n, m * m), bool)
    active = np.arange(n)
    here = rng.integers(0, m * m, size=n)
    visited[active, here] = True
    left = np.full(n, m * m - 1)
    while active.size:
        for step in rng.integers(0, 4, size=(32, active.size)):  # 32 steps, then drop the finished walks
            there = neighbour[here, step]
            new = ~visited[active, there]
            w = active[new]
            visited[w, there[new]] = True
            flat[w, wall[here[new], step[new]]] = OPEN
            left[w] -= 1
            here = there
        going = left[active] > 0
        active, here = active[going], here[going]
    return grid


def distances(open_cells: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Steps from ``source`` (boolean ``[n H W]``) to every cell through ``open_cells``, -1 where unreachable."""
    dist = np.where(source, 0, -1).astype(np.int32)
    frontier, d = source.copy(), 0
    while frontier.any():
        d += 1
        reach = np.zeros_like(frontier)
        reach[:, 1:] |= frontier[:, :-1]
        reach[:, :-1] |= frontier[:, 1:]
        reach[:, :, 1:] |= frontier[:, :, :-1]
        reach[:, :, :-1] |= frontier[:, :, 1:]
        frontier = reach & open_cells & (dist < 0)
        dist[frontier] = d
    return dist


def mark_shortest_path(grids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(path [n H W] bool, unique [n])`` of grids with one start and one goal: the cells on a shortest path.

    A cell is on one iff its distances from the start and from the goal add up to the path's
    length; the shortest path is unique iff there is one such cell per distance.
    """
    open_cells = grids != WALL
    from_start = distances(open_cells, grids == START)
    from_goal = distances(open_cells, grids == GOAL)
    length = from_start[grids == GOAL]  # [n]: each grid has one goal
    path = (from_start >= 0) & (from_goal >= 0) & (from_start + from_goal == length[:, None, None])
    return path, (length >= 0) & (path.sum(axis=(1, 2)) == length + 1)


def move(grids: np.ndarray, t: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Square grids ``[n N N]`` (mazes, labels or paths) moved by dihedral transforms ``t`` ``[n]`` (``grids.py``),
    or with ``inverse`` moved back: a prediction on a moved maze, moved back, is one on the maze itself."""
    return dihedral_batch(grids, INVERSE[t] if inverse else t)


def pick(rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
    """A uniformly random allowed cell of each grid ``[n H W]``, as a flat index ``[n]`` (0 where none is)."""
    n = len(allowed)
    return np.argmax(np.where(allowed, rng.random(allowed.shape), -1.0).reshape(n, -1), axis=1)


def one_hot(cells: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean grids ``shape`` with the flat cell ``cells[b]`` set in grid b."""
    out = np.zeros(shape, bool)
    out.reshape(len(cells), -1)[np.arange(len(cells)), cells] = True
    return out


class Maze(SyntheticTask):
    """Perfect mazes on an N×N grid; the label at every cell is the grid with the shortest path marked ``o``.

    Args:
        size: N, the grid's side (>= 5; the papers: 30).
        min_path: hard mode, keep only mazes whose shortest path has at least this many cells, start
            and goal included (the papers' Maze-Hard: > 110 on 30×30, i.e. 111); 0 keeps every maze.
        augment: move each training maze and its labels by one of the 8 symmetries of the square, drawn
            per sample (TRM's Maze-Hard: 1,000 mazes, ``train_size: 1000``, × 8); a moved maze that equals
            a validation or test maze is left unmoved. With ``train_size`` the rows are then moved in the
            loader (numpy) instead of gathered on the device.
        **kwargs: batch sizes, eval set sizes, seed, workers, ``train_size`` (see ``SyntheticTask``).
            Validation and test draw from their own seeds and are disjoint from each other and training.
    """

    def __init__(self, size: int = 15, min_path: int = 0, augment: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.augment = augment
        if size < 5:
            raise InputError(f"data.size must be >= 5 (a maze needs two cells and the walls around), got {size}")
        m = (size - 1) // 2
        longest = 2 * m * m - 1  # a path through every lattice cell and the openings between them
        if min_path > longest:
            raise InputError(
                f"data.min_path={min_path} is longer than any path in a {size}×{size} maze (at most {longest} "
                "cells); raise data.size or lower data.min_path"
            )
        self.size, self.min_path = size, min_path
        self._keep_rate = 1.0
        if min_path > 0:
            probe = self.draw_mazes(np.random.default_rng(0), 256, tries=1)
            self._keep_rate = len(probe[0]) / 256
            if self._keep_rate < 0.05:
                raise InputError(
                    f"data.min_path={min_path} is too long for data.size={size} in practice: only "
                    f"{self._keep_rate:.1%} of random mazes have such a path; raise data.size or lower data.min_path"
                )

    @property
    def vocab(self) -> list[str]:
        return [".", "#", "S", "G", "o"]

    @property
    def seq_len(self) -> int:
        return self.size * self.size

    def decode(self, ids) -> str:
        """The grid, a line per row, ``/`` between rows."""
        text = super().decode(ids)
        return "/".join(text[i : i + self.size] for i in range(0, len(text), self.size))

    def draw_mazes(self, rng: np.random.Generator, n: int, tries: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mazes with a start and a goal, and their shortest paths: ``(grids [k N N] int64, paths [k N N] bool)``.

        Of ``n`` fresh mazes, those with a long enough path (``min_path``); ``k = n`` unless ``tries=1``.
        """
        if tries is None:
            return draw_kept(n, self._keep_rate, lambda m: self.draw_mazes(rng, m, tries=1))
        grids = spanning_tree_mazes(rng, n, self.size).astype(np.int64)
        lattice = np.zeros((self.size, self.size), bool)
        m = (self.size - 1) // 2
        lattice[1 : 2 * m : 2, 1 : 2 * m : 2] = True
        rows = np.arange(n)
        start = pick(rng, lattice[None] & (grids == OPEN))
        if self.min_path > 0:
            # Hard mode: the start among the cells at least 3/4 as far from a random cell as its farthest,
            # so that long paths from it are common (a random start has one in a 30×30 maze ~14% of the time).
            probe = distances(grids == OPEN, one_hot(start, grids.shape))
            start = pick(rng, lattice & (4 * probe >= 3 * probe.max(axis=(1, 2), keepdims=True)))
        steps = distances(grids == OPEN, one_hot(start, grids.shape))
        # The goal: a lattice cell at least min_path - 1 steps away (any other cell by default), uniformly.
        far = lattice & (steps >= max(self.min_path - 1, 1))
        keep = far.any(axis=(1, 2))
        goal = pick(rng, far)
        grids.reshape(n, -1)[rows, start] = START
        grids.reshape(n, -1)[rows, goal] = GOAL
        grids = grids[keep]
        path, unique = mark_shortest_path(grids)
        return grids[unique], path[unique]

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        grids, path = self.draw_mazes(rng, n)
        labels = np.where(path & (grids == OPEN), PATH, grids)
        return grids.reshape(n, -1), labels.reshape(n, -1)

    @property
    def serves_rows(self) -> bool:
        return self.train_size is not None and not self.augment

    def train_batch(self, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of ``rank`` (``SyntheticTask``), each maze moved by its own symmetry when ``augment``."""
        x, y = super().train_batch(rank, index)
        if not self.augment:
            return x, y
        n, shape = len(x), (len(x), self.size, self.size)
        t = self.rng(_AUGMENT, rank, index).integers(0, 8, size=n)
        moved = move(x.reshape(shape), t).reshape(n, -1)
        clash = np.array([key in self.eval_keys for key in rows_as_keys(moved)])
        t = np.where(clash, 0, t)  # the unmoved maze was checked against the evaluation sets already
        return move(x.reshape(shape), t).reshape(n, -1), move(y.reshape(shape), t).reshape(n, -1)

    def puzzles(self, split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(grids, paths)`` of ``split``: grids int64 ``[n N N]`` (0 open, 1 wall, 2 start, 3 goal), paths bool.

        ``val`` and ``test``: the first ``n`` of the fixed sets (default all); ``train``: the fixed
        training set's first ``n`` with ``train_size``, else ``n`` draws of a fixed seed (disjoint from both).
        """
        purposes = {"val": _VAL, "test": _TEST}
        if split == "train":
            if self.train_size is not None:
                input_ids, labels = self.train_set()
                input_ids, labels = input_ids[:n].astype(np.int64), labels[:n].astype(np.int64)
            else:
                input_ids, labels = self.fresh_batch(self.rng(_TRAIN_SET, 1, 0), n or self.batch_size)
        elif split in purposes:
            input_ids, labels = self.eval_set(purposes[split])
            input_ids, labels = input_ids[:n], labels[:n]
        else:
            raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}")
        shape = (len(input_ids), self.size, self.size)
        return input_ids.reshape(shape), (labels >= START).reshape(shape)  # S, G and o
