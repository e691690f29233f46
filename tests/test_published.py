"""The reader of the published Sudoku-Extreme and Maze-Hard files: files written here in both published forms
(the Hugging Face CSVs, HRM's built folders, as its builders write them) read back to the same puzzles."""

import csv
import json

import numpy as np
import pytest
import torch
from test_puzzles import check_maze, check_pair

import looped.datamodules.published as published
from looped.datamodules import Maze, PublishedPuzzles, Sudoku
from looped.datamodules.sudoku import augment
from looped.errors import InputError

MAZE_TEXT = {0: " ", 1: "#", 2: "S", 3: "G", 4: "o"}  # the CSV's characters for this repository's maze tokens
HRM_MAZE = {" ": 2, "#": 1, "S": 3, "G": 4, "o": 5}  # HRM's char2id over CHARSET "# SGo", 0 = PAD


def sudoku_text(grid):
    return "".join(str(d) if d else "." for d in grid.ravel())


def maze_text(grid):
    return "".join(MAZE_TEXT[int(v)] for v in grid.ravel())


def write_csv(path, questions, answers, text):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "question", "answer", "rating"])
        for q, a in zip(questions, answers):
            writer.writerow(["here", text(q), text(a), 0])


def write_built(folder, inputs, labels, per_group, vocab_size):
    """HRM's layout: every puzzle one row, ``per_group`` puzzles per group (an original and its augmentations)."""
    folder.mkdir(parents=True)
    n = len(inputs)
    arrays = {
        "inputs": inputs.reshape(n, -1),
        "labels": labels.reshape(n, -1),
        "puzzle_identifiers": np.zeros(n, np.int32),
        "puzzle_indices": np.arange(n + 1, dtype=np.int32),
        "group_indices": np.arange(0, n + 1, per_group, dtype=np.int32),
    }
    for name, array in arrays.items():
        np.save(folder / f"all__{name}.npy", array)
    metadata = dict(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab_size)
    metadata.update(seq_len=inputs[0].size, num_puzzle_identifiers=1, total_groups=n // per_group)
    metadata.update(mean_puzzle_examples=1, sets=["all"])
    (folder / "dataset.json").write_text(json.dumps(metadata))


@pytest.fixture(scope="module")
def sudokus():
    task = Sudoku(size=9, givens=40, val_size=4, test_size=6, train_puzzles=4)
    train = task.puzzles("train")
    # HRM's build with --num-aug 2: each puzzle, then 2 augmentations of it, one group (train arrays int64)
    moved = [augment(*train, (3, 3), np.random.default_rng(k)) for k in range(2)]
    grouped = [np.stack([train[i]] + [m[i] for m in moved], axis=1).reshape(-1, 9, 9) for i in (0, 1)]
    return task.puzzles("test"), train, grouped


@pytest.fixture(scope="module")
def mazes():
    task = Maze(size=9, val_size=5, test_size=5, batch_size=6)
    grids, paths = task.puzzles("test")
    labels = np.where(paths & (grids == 0), 4, grids)
    train_grids, train_paths = task.puzzles("train")
    return (grids, labels), (train_grids, np.where(train_paths & (train_grids == 0), 4, train_grids))


def test_sudoku_csv_and_hrm_build_read_back_to_the_puzzles(tmp_path, sudokus):
    test, train, grouped = sudokus
    write_csv(tmp_path / "train.csv", *train, sudoku_text)
    write_csv(tmp_path / "test.csv", *test, sudoku_text)
    write_built(tmp_path / "built" / "train", grouped[0] + 1, grouped[1] + 1, per_group=3, vocab_size=11)
    write_built(tmp_path / "built" / "test", (test[0] + 1).astype(np.uint8), (test[1] + 1).astype(np.uint8), 1, 11)
    for path, expected_train in ((tmp_path, train), (tmp_path / "built", grouped)):
        data = PublishedPuzzles(str(path), val_size=2, batch_size=4)
        assert data.kind == "sudoku" and data.vocab_size == 10 and data.seq_len == 81
        for split, expected in (("train", expected_train), ("test", test), ("val", (test[0][:2], test[1][:2]))):
            got = data.puzzles(split)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])
        for g, s in zip(*data.puzzles("train")):
            check_pair(g, s, (3, 3), unique=False)
    # --subsample-size: whole groups (a puzzle with its augmentations), seeded
    two = PublishedPuzzles(str(tmp_path / "built"), train_puzzles=2, val_size=2, batch_size=4)
    givens = two.puzzles("train")[0]
    assert len(givens) == 6
    groups = grouped[0].reshape(-1, 3, 81)
    chosen = [next(k for k, g in enumerate(groups) if (g == group).all()) for group in givens.reshape(2, 3, 81)]
    assert len(set(chosen)) == 2  # two whole groups of the file, an original with its augmentations each


def test_a_csv_read_in_chunks_is_the_same(tmp_path, sudokus, monkeypatch):
    test, train, _ = sudokus
    write_csv(tmp_path / "train.csv", *train, sudoku_text)
    write_csv(tmp_path / "test.csv", *test, sudoku_text)
    whole = PublishedPuzzles(str(tmp_path), val_size=2, batch_size=4).puzzles("test")
    monkeypatch.setattr(published, "CSV_CHUNK", 4)  # 6 test rows: a chunk of 4, then 2
    for got, expected in zip(PublishedPuzzles(str(tmp_path), val_size=2, batch_size=4).puzzles("test"), whole):
        np.testing.assert_array_equal(got, expected)


def test_maze_csv_and_hrm_build_read_back_to_the_puzzles(tmp_path, mazes):
    (grids, labels), (train_grids, train_labels) = mazes
    write_csv(tmp_path / "train.csv", train_grids, train_labels, maze_text)
    write_csv(tmp_path / "test.csv", grids, labels, maze_text)
    to_hrm = lambda g: np.vectorize(lambda v: HRM_MAZE[MAZE_TEXT[int(v)]])(g).astype(np.uint8)
    write_built(tmp_path / "built" / "train", to_hrm(train_grids), to_hrm(train_labels), 1, 6)
    write_built(tmp_path / "built" / "test", to_hrm(grids), to_hrm(labels), 1, 6)
    for path in (tmp_path, tmp_path / "built"):
        data = PublishedPuzzles(str(path), val_size=2, batch_size=4)
        assert data.kind == "maze" and data.vocab == [".", "#", "S", "G", "o"] and data.seq_len == 81
        got_grids, got_paths = data.puzzles("test")
        np.testing.assert_array_equal(got_grids, grids)
        for grid, path_cells in zip(got_grids, got_paths):
            check_maze(grid, path_cells)
        np.testing.assert_array_equal(data.puzzles("train")[0], train_grids)
        np.testing.assert_array_equal(data.eval_set(2)[1], labels.reshape(5, -1))  # labels: the grid, path 'o'


def test_batches_fixed_rows_or_augmented(tmp_path, sudokus, mazes):
    test, train, _ = sudokus
    write_csv(tmp_path / "train.csv", *train, sudoku_text)
    write_csv(tmp_path / "test.csv", *test, sudoku_text)
    data = PublishedPuzzles(str(tmp_path), val_size=2, batch_size=4)
    data.setup("fit")
    rows = next(iter(data.train_dataloader()))
    batch = data.on_after_batch_transfer(rows, 0)  # the fixed set's rows, gathered
    np.testing.assert_array_equal(batch["input_ids"].numpy(), train[0].reshape(4, -1)[rows["rows"].numpy()])
    val = next(iter(data.val_dataloader()))
    assert val["input_ids"].dtype == val["labels"].dtype == batch["input_ids"].dtype == torch.int64
    moved = PublishedPuzzles(str(tmp_path), val_size=2, batch_size=4, augment=True)
    x, y = (t.numpy() for t in next(iter(moved.train_dataloader())).values())
    assert not any((row == train[0].reshape(4, -1)).all(axis=1).any() for row in x)  # moved, not the file's rows
    for g, s in zip(x.reshape(-1, 9, 9), y.reshape(-1, 9, 9)):
        check_pair(g, s, (3, 3), unique=False)
    (grids, labels), _ = mazes
    maze_dir = tmp_path / "maze"
    maze_dir.mkdir()
    for split in ("train", "test"):
        write_csv(maze_dir / f"{split}.csv", grids, labels, maze_text)
    x, y = PublishedPuzzles(str(maze_dir), val_size=2, batch_size=5, augment=True).train_batch(0, 0)
    for g, label in zip(x.reshape(-1, 9, 9), y.reshape(-1, 9, 9)):
        check_maze(g, label >= 2)


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda d: (d / "test.csv").unlink(), "holds neither test.csv"),
        (lambda d: (d / "train.csv").write_text("a,b\n1,2\n"), "header"),
        (
            lambda d: (d / "train.csv").write_text(f"source,question,answer,rating\nx,x{'.' * 80},{'1' * 81},0\n"),
            "characters",
        ),
        (lambda d: (d / "train.csv").write_text("source,question,answer,rating\nx,123,123,0\n"), "not a square"),
        (lambda d: (d / "built" / "train" / "all__labels.npy").write_bytes(b"\x93NUMPY broken"), "all__labels.npy"),
        (lambda d: (d / "built" / "test" / "all__group_indices.npy").unlink(), "is missing"),
        (lambda d: (d / "built" / "train" / "dataset.json").write_text("{}"), "lacks seq_len"),
        (lambda d: (d / "built" / "train" / "dataset.json").write_text("{"), "not JSON"),
    ],
)
def test_missing_or_corrupt_files_are_one_line(tmp_path, sudokus, damage, says):
    test, train, _ = sudokus
    write_csv(tmp_path / "train.csv", *train, sudoku_text)
    write_csv(tmp_path / "test.csv", *test, sudoku_text)
    for split, (q, a) in (("train", train), ("test", test)):
        write_built(tmp_path / "built" / split, q + 1, a + 1, 1, 11)
    damage(tmp_path)
    path = tmp_path / "built" if any(w in says for w in ("npy", "missing", "lacks", "JSON")) else tmp_path
    with pytest.raises(InputError) as error:
        PublishedPuzzles(str(path), val_size=2, batch_size=4)
    message = str(error.value)
    assert message.startswith("data.path: ") and says in message and "\n" not in message


def test_bad_settings_name_their_key(tmp_path, sudokus):
    test, train, _ = sudokus
    write_csv(tmp_path / "train.csv", *train, sudoku_text)
    write_csv(tmp_path / "test.csv", *test, sudoku_text)
    for kwargs, key in [
        (dict(train_puzzles=5), "data.train_puzzles"),
        (dict(val_size=7), "data.val_size"),
        (dict(train_size=2), "data.train_size"),
        (dict(batch_size=5), "data.batch_size"),
    ]:
        with pytest.raises(InputError, match=key):
            PublishedPuzzles(str(tmp_path), **{"val_size": 2, "batch_size": 4, **kwargs})
