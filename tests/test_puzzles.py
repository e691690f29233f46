"""Sudoku and mazes: every puzzle checked by a solver written here, not the modules' own, and their data contract."""

from collections import deque

import numpy as np
import pytest

from looped.contract import IGNORE
from looped.datamodules import Maze, Sudoku
from looped.datamodules.base import rows_as_keys
from looped.datamodules.maze import move
from looped.datamodules.sudoku import augment
from looped.errors import InputError

# size, box, givens (9×9 at 36: the plain counter stays fast); 3×2 boxes: the orientation is the user's
BOXES = [(4, (2, 2), 6), (6, (2, 3), 14), (6, (3, 2), 14), (9, (3, 3), 36)]


def small(cls, **kwargs):
    return cls(batch_size=8, val_size=12, test_size=12, **kwargs)


def count_solutions(grid: np.ndarray, box: tuple[int, int], limit: int = 2) -> int:
    """Plain backtracking: fill the first blank with each digit its row, column and box lack; stop at ``limit``."""
    size, (r, c) = len(grid), box
    cells = [[int(v) for v in row] for row in grid]

    def allowed(i: int, j: int, d: int) -> bool:
        bi, bj = i // r * r, j // c * c
        return (
            all(cells[i][k] != d for k in range(size))
            and all(cells[k][j] != d for k in range(size))
            and all(cells[bi + a][bj + b] != d for a in range(r) for b in range(c))
        )

    def count() -> int:
        for i in range(size):
            for j in range(size):
                if cells[i][j] == 0:
                    found = 0
                    for d in range(1, size + 1):
                        if allowed(i, j, d):
                            cells[i][j] = d
                            found += count()
                            cells[i][j] = 0
                            if found >= limit:
                                break
                    return found
        return 1

    return count()


def is_solution(grid: np.ndarray, box: tuple[int, int]) -> bool:
    size, (r, c) = len(grid), box
    digits = set(range(1, size + 1))
    boxes = [grid[i : i + r, j : j + c].ravel() for i in range(0, size, r) for j in range(0, size, c)]
    return all(set(line.tolist()) == digits for line in [*grid, *grid.T, *boxes])


def check_pair(givens: np.ndarray, solution: np.ndarray, box: tuple[int, int], unique: bool = True) -> None:
    assert is_solution(solution, box)
    kept = givens > 0
    np.testing.assert_array_equal(givens[kept], solution[kept])
    if unique:
        assert count_solutions(givens, box) == 1


@pytest.mark.parametrize("size, box, givens", BOXES)
def test_every_sudoku_is_valid_and_unique(size, box, givens):
    task = small(Sudoku, size=size, box=list(box), givens=givens, train_puzzles=12)
    for split in ("train", "val", "test"):
        puzzles, solutions = task.puzzles(split, 6 if size == 9 else None)
        assert puzzles.dtype == np.int64 and puzzles.shape[1:] == (size, size) == solutions.shape[1:]
        assert ((puzzles > 0).sum(axis=(1, 2)) == givens).all()
        for g, s in zip(puzzles, solutions):
            check_pair(g, s, box)


def test_splits_are_disjoint_and_seeded():
    task = small(Sudoku, size=4, givens=6, train_puzzles=40)
    keys = [set(rows_as_keys(task.puzzles(split)[0].reshape(-1, 16))) for split in ("val", "test", "train")]
    assert [len(k) for k in keys] == [12, 12, 40]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    again = small(Sudoku, size=4, givens=6, train_puzzles=40)
    np.testing.assert_array_equal(again.puzzles("test")[0], task.puzzles("test")[0])
    for index in range(20):  # augmented training samples never equal an evaluation puzzle
        assert not task.eval_keys & set(rows_as_keys(task.train_batch(0, index)[0]))


@pytest.mark.parametrize("size, box, givens", BOXES[:3] + [(9, (3, 3), 40)])
def test_augmentations_map_pairs_to_pairs(size, box, givens):
    task = small(Sudoku, size=size, box=list(box), givens=givens, train_puzzles=8)
    puzzles, solutions = task.puzzles("train")
    rng = np.random.default_rng(0)
    for _ in range(3):
        new_puzzles, new_solutions = augment(puzzles, solutions, box, rng)
        assert not (new_puzzles == puzzles).all()
        for g, s in zip(new_puzzles, new_solutions):
            check_pair(g, s, box, unique=size < 9)
            assert (g > 0).sum() == givens


def test_transposition_is_only_valid_for_square_boxes():
    task = small(Sudoku, size=6, givens=14, train_puzzles=4)
    solution = task.puzzles("train")[1][0]
    assert is_solution(solution, (2, 3)) and not is_solution(solution.T, (2, 3))  # why augment skips it
    square = small(Sudoku, size=4, givens=6, train_puzzles=4).puzzles("train")[1][0]
    assert is_solution(square.T, (2, 2))


def test_hardness_counts_guesses_and_the_hard_mode_keeps_hard_puzzles():
    task = small(Sudoku, size=6, givens=10, min_guesses=2, train_puzzles=4)
    puzzles, solutions = task.puzzles("val")
    assert (task.hardness(puzzles) >= 2).all()
    assert (task.hardness(solutions) == 0).all()  # nothing to fill, nothing to guess
    for g, s in zip(puzzles, solutions):
        check_pair(g, s, (2, 3))


def bfs(grid: np.ndarray, source: tuple[int, int]) -> tuple[dict, dict]:
    """Distances from ``source`` over non-wall cells, and the number of shortest paths to each cell."""
    dist, paths, queue = {source: 0}, {source: 1}, deque([source])
    while queue:
        i, j = queue.popleft()
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if 0 <= a < grid.shape[0] and 0 <= b < grid.shape[1] and grid[a, b] != 1:
                if (a, b) not in dist:
                    dist[a, b], paths[a, b] = dist[i, j] + 1, 0
                    queue.append((a, b))
                if dist[a, b] == dist[i, j] + 1:
                    paths[a, b] += paths[i, j]
    return dist, paths


def check_maze(grid: np.ndarray, path: np.ndarray, min_path: int = 0) -> None:
    assert set(np.unique(grid).tolist()) <= {0, 1, 2, 3}
    assert (grid == 2).sum() == 1 and (grid == 3).sum() == 1
    start = tuple(np.argwhere(grid == 2)[0])
    goal = tuple(np.argwhere(grid == 3)[0])
    dist, paths = bfs(grid, start)
    assert paths[goal] == 1  # the shortest path is unique
    walk = [goal]  # back from the goal, one step nearer the start each time
    while walk[-1] != start:
        i, j = walk[-1]
        walk.append(next(c for c in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)) if dist.get(c) == dist[i, j] - 1))
    assert len(walk) == dist[goal] + 1 >= max(min_path, 2)
    marked = {tuple(c) for c in np.argwhere(path)}
    assert marked == set(walk)  # start and goal included, every cell connected to the next


@pytest.mark.parametrize("size, min_path", [(9, 0), (10, 0), (15, 25), (30, 111)])  # the last: Maze-Hard's
def test_every_maze_path_is_the_unique_shortest(size, min_path):
    n = 4 if size == 30 else 12
    task = Maze(size=size, min_path=min_path, batch_size=n, val_size=n, test_size=n)
    for split in ("train", "val", "test"):
        grids, paths = task.puzzles(split)
        assert grids.shape == paths.shape == (n, size, size) and paths.dtype == bool
        for grid, path in zip(grids, paths):
            check_maze(grid, path, min_path)


def test_maze_splits_are_disjoint():
    task = small(Maze, size=7)
    val, test = (set(rows_as_keys(task.puzzles(s)[0].reshape(12, -1))) for s in ("val", "test"))
    assert len(val) == len(test) == 12 and not val & test
    for index in range(10):
        assert not (val | test) & set(rows_as_keys(task.train_batch(0, index)[0]))


# The 8 symmetries of the square as numpy writes them (HRM's ids), and how to undo each
SYMMETRIES = [
    (lambda g: g, lambda g: g),
    (lambda g: np.rot90(g, 1), lambda g: np.rot90(g, -1)),
    (lambda g: np.rot90(g, 2), lambda g: np.rot90(g, -2)),
    (lambda g: np.rot90(g, 3), lambda g: np.rot90(g, -3)),
    (np.fliplr, np.fliplr),
    (np.flipud, np.flipud),
    (np.transpose, np.transpose),
    (lambda g: np.fliplr(np.rot90(g, 1)), lambda g: np.rot90(np.fliplr(g), -1)),
]


@pytest.mark.parametrize("size", [9, 10])  # an even side: its wall row and column move too
def test_maze_symmetries_map_mazes_to_mazes_and_invert_exactly(size):
    grids, paths = small(Maze, size=size).puzzles("val", 8)
    for t, (turn, undo) in enumerate(SYMMETRIES):
        moved, moved_paths = move(grids, np.full(8, t)), move(paths, np.full(8, t))
        for grid, path, new, new_path in zip(grids, paths, moved, moved_paths):
            np.testing.assert_array_equal(new, turn(grid))
            np.testing.assert_array_equal(new_path, turn(path))
            check_maze(new, new_path)
            np.testing.assert_array_equal(undo(new), grid)
        np.testing.assert_array_equal(move(moved, np.full(8, t), inverse=True), grids)


@pytest.mark.parametrize("train_size", [None, 16])
def test_augmented_maze_batches_are_moved_mazes(train_size):
    task = small(Maze, size=9, augment=True, train_size=train_size)
    task.setup("fit")
    plain = small(Maze, size=9, train_size=train_size)  # the same batches, unmoved
    used = set()
    for index in range(6):
        x, y = task.train_batch(0, index)
        px, py = plain.train_batch(0, index)
        for grid, label, before, before_label in zip(x, y, px, py):
            grid, label = grid.reshape(9, 9), label.reshape(9, 9)
            t = next(t for t, (turn, _) in enumerate(SYMMETRIES) if (turn(before.reshape(9, 9)) == grid).all())
            np.testing.assert_array_equal(SYMMETRIES[t][0](before_label.reshape(9, 9)), label)
            check_maze(grid, label >= 2)
            used.add(t)
        assert not task.eval_keys & set(rows_as_keys(x))
    assert len(used) >= 6
    batch = next(iter(task.train_dataloader()))  # streamed whole (a fixed set's rows are moved in the loader)
    np.testing.assert_array_equal(batch["input_ids"].numpy(), task.train_batch(0, 0)[0])


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: Sudoku(size=6, box=[2, 2]), "data.box"),
        (lambda: Sudoku(size=9, box=[3, 2]), "data.box"),
        (lambda: Sudoku(size=4, givens=17), "data.givens"),
        (lambda: Sudoku(size=9, givens=16), "data.givens"),
        (lambda: Maze(size=9, min_path=40), "data.min_path"),
        (lambda: Maze(size=30, min_path=300), "data.min_path"),
        (lambda: Maze(size=4), "data.size"),
        (lambda: small(Sudoku, size=4).puzzles("dev"), "split"),
        (lambda: small(Sudoku, size=4).puzzles("val", 13), "data.val_size"),
        (lambda: Sudoku(size=5), "data.size"),
        (lambda: small(Sudoku, size=6, givens=8).puzzles("val"), "data.givens"),  # legal, but digging stalls
    ],
)
def test_bad_input_is_one_line_naming_the_key(make, key):
    with pytest.raises(InputError) as error:
        make()
    message = str(error.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize(
    "task, n", [(small(Sudoku, size=4, givens=6, train_puzzles=16), 16), (small(Maze, size=9), 81)]
)
def test_batches_have_the_contract_shapes(task, n):
    task.setup("fit")
    for batch in (next(iter(task.train_dataloader())), next(iter(task.val_dataloader()))):
        assert batch["input_ids"].shape == batch["labels"].shape == (8, n) == (8, task.seq_len)
        assert batch["input_ids"].dtype == batch["labels"].dtype
        assert int(batch["input_ids"].max()) < task.vocab_size and int(batch["labels"].max()) < task.vocab_size
        assert (batch["labels"] != IGNORE).all()  # every cell is scored: the whole grid is the answer
    assert task.decode(batch["input_ids"][0]).count("/") == int(n**0.5) - 1
