"""The published Sudoku-Extreme and Maze-Hard sets (HRM, TRM), read from files a user downloaded.

Nothing here downloads. Two forms are read, each as ``<path>/train...`` and ``<path>/test...``:

* the original CSVs of the Hugging Face datasets ``sapientinc/sudoku-extreme`` and
  ``sapientinc/maze-30x30-hard-1k``: ``train.csv`` and ``test.csv``, a header row, then
  ``source,question,answer,rating``; a Sudoku is 81 characters row by row (``.`` a blank, ``1``-``9``),
  a maze N·N characters (``#`` wall, space open, ``S`` start, ``G`` goal; the answer marks the
  path's open cells ``o``);
* what HRM's ``dataset/build_{sudoku,maze}_dataset.py`` writes from them (TRM's are the same):
  ``<split>/dataset.json`` (``seq_len``, ``vocab_size``, ``pad_id``, ...) and ``<split>/all__inputs.npy``,
  ``all__labels.npy`` ``[rows seq_len]``, ``all__puzzle_identifiers.npy``, ``all__puzzle_indices.npy``
  (each puzzle's first row, CSR) and ``all__group_indices.npy`` (each group's first puzzle: a puzzle
  and its augmentations). Tokens are 0 = PAD and then the CSV's characters in order: Sudoku
  ``0``-``9`` as 1-10 (1 a blank), mazes ``# SGo`` as 1-5.

Either way the puzzles come out in this repository's tokens, the same as ``Sudoku``'s and ``Maze``'s
(a blank 0 and digits 1-9; ``.`` 0, ``#`` 1, ``S`` 2, ``G`` 3, ``o`` 4), so models and recipes
move between generated and published puzzles unchanged.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from looped.datamodules.base import SyntheticTask, rows_as_keys
from looped.datamodules.maze import _AUGMENT, START, move
from looped.datamodules.sudoku import BOXES, augment
from looped.datamodules.train_set import _TEST, _TRAIN_SET, _VAL
from looped.errors import InputError

SUDOKU_CHARS, MAZE_CHARS = ".123456789", " #SGo"
"""The CSVs' characters in the order of this repository's token ids."""
BUILT_FILES = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
METADATA_KEYS = ("seq_len", "vocab_size", "pad_id", "ignore_label_id", "num_puzzle_identifiers", "total_groups")
# HRM's token (index) → ours: Sudoku 1 blank, 2..10 digits; mazes 1 '#', 2 ' ', 3 'S', 4 'G', 5 'o'; -1: PAD.
FROM_BUILT = {"sudoku": np.arange(11, dtype=np.int8) - 1, "maze": np.array([-1, 1, 0, 2, 3, 4], np.int8)}


def fail(path: Path, what: str, fix: str) -> InputError:
    return InputError(f"data.path: {path} {what}; {fix}")


def read_split(root: Path, split: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """``(kind, inputs, labels, groups)`` of ``split`` (``train``/``test``) under ``root``, in either form.

    ``kind`` is ``sudoku`` or ``maze``; inputs and labels ``[n N N]`` int8 in this repository's
    tokens; ``groups`` ``[n]`` the group of each row (HRM's: a puzzle and its augmentations; a CSV row is its own).
    """
    if (root / f"{split}.csv").is_file():
        return read_csv(root / f"{split}.csv")
    if (root / split / "dataset.json").is_file():
        return read_built(root / split)
    raise fail(
        root,
        f"holds neither {split}.csv (the published CSV) nor {split}/dataset.json (HRM's build)",
        "download train.csv and test.csv from huggingface.co/datasets/sapientinc/sudoku-extreme or "
        "sapientinc/maze-30x30-hard-1k into it, or point data.path at the folder HRM's builder wrote",
    )


CSV_CHUNK = 100_000  # rows turned into an array at a time: Sudoku-Extreme's train.csv has 3.8M


def read_csv(path: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if next(reader, [])[:3] != ["source", "question", "answer"]:
                raise fail(path, "does not start with the header source,question,answer,rating", "download it again")
            chunks, rows, kind = [], [], None
            for row in reader:
                if len(row) < 3:
                    raise fail(
                        path, f"has a row without question and answer: {','.join(row)[:40]}", "download it again"
                    )
                rows.append(row)
                if kind is None:
                    kind, grid_text = ("sudoku" if set(row[1]) <= set(SUDOKU_CHARS) else "maze"), row[1]
                if len(rows) == CSV_CHUNK:
                    chunks.append(csv_grids(path, rows, kind, len(grid_text)))
                    rows = []
            if rows:
                chunks.append(csv_grids(path, rows, kind, len(grid_text)))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise fail(path, f"cannot be read as CSV ({type(error).__name__})", "download it again") from None
    if not chunks:
        raise fail(path, "holds no puzzles", "download it again")
    questions, answers = (np.concatenate(part) for part in zip(*chunks))
    return kind, questions, answers, np.arange(len(questions))


def csv_grids(path: Path, rows: list[list[str]], kind: str, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Questions and answers of CSV ``rows`` as int8 grids ``[n N N]`` in this repository's tokens."""
    side = int(round(cells**0.5))
    if side * side != cells:
        raise fail(path, f"has a question of {cells} characters, not a square grid", "download it again")
    chars = SUDOKU_CHARS if kind == "sudoku" else MAZE_CHARS
    table = np.full(256, -1, np.int8)
    table[np.frombuffer(chars.encode(), np.uint8)] = np.arange(len(chars))
    grids = []
    for column in (1, 2):
        text = "".join(row[column] for row in rows)
        if len(text) != len(rows) * cells:
            raise fail(path, f"has a {kind} that is not {side}×{side} like the first one", "download it again")
        grids.append(table[np.frombuffer(text.encode(), np.uint8)].reshape(len(rows), side, side))
    if (grids[0] < 0).any() or (grids[1] < 0).any():
        raise fail(path, f"has characters outside {chars!r} for a {kind}", "download it again")
    return grids[0], grids[1]


def read_built(folder: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    try:
        metadata = json.loads((folder / "dataset.json").read_text())
        missing = [key for key in METADATA_KEYS if key not in metadata]
    except (OSError, ValueError) as error:
        raise fail(folder / "dataset.json", f"is not JSON ({type(error).__name__})", "build it again") from None
    if missing:
        raise fail(folder / "dataset.json", f"lacks {', '.join(missing)}", "build it again with HRM's builder")
    arrays = {}
    for name in BUILT_FILES:
        file = folder / f"all__{name}.npy"
        try:
            arrays[name] = np.load(file, allow_pickle=False)
        except FileNotFoundError:
            raise fail(file, "is missing", "copy the whole folder HRM's builder wrote") from None
        except (OSError, ValueError) as error:
            raise fail(file, f"is not a readable .npy ({type(error).__name__})", "build it again") from None
    kind = {11: "sudoku", 6: "maze"}.get(metadata["vocab_size"])
    seq_len, side = metadata["seq_len"], int(round(metadata["seq_len"] ** 0.5))
    inputs, labels, puzzles, groups = (arrays[k] for k in ("inputs", "labels", "puzzle_indices", "group_indices"))
    if kind is None or side * side != seq_len:
        raise fail(
            folder, f"holds vocab_size {metadata['vocab_size']}, seq_len {seq_len}", "not a Sudoku or maze build"
        )
    if inputs.ndim != 2 or inputs.shape != labels.shape or inputs.shape[1] != seq_len:
        raise fail(folder, f"has inputs {inputs.shape} and labels {labels.shape}, not [rows {seq_len}]", "build again")
    if puzzles[-1] != len(inputs) or groups[-1] != len(puzzles) - 1 or (np.diff(puzzles) < 1).any():
        raise fail(folder, "has puzzle or group indices that do not cover its rows", "build it again")
    ours = FROM_BUILT[kind]
    if inputs.min() < 1 or labels.min() < 1 or max(inputs.max(), labels.max()) >= len(ours):
        raise fail(folder, f"has tokens outside 1..{len(ours) - 1} for a {kind}", "build it again")
    # Each row's group: its puzzle (CSR over rows), then that puzzle's group (CSR over puzzles).
    row_puzzle = np.repeat(np.arange(len(puzzles) - 1), np.diff(puzzles))
    puzzle_group = np.repeat(np.arange(len(groups) - 1), np.diff(groups))
    shape = (len(inputs), side, side)
    return kind, ours[inputs].reshape(shape), ours[labels].reshape(shape), puzzle_group[row_puzzle]


class PublishedPuzzles(SyntheticTask):
    """Sudoku-Extreme or Maze-Hard as published, trained on their training file and tested on their test file.

    Args:
        path: the folder holding ``train.csv`` and ``test.csv``, or HRM's built ``train/`` and ``test/``.
        train_puzzles: train on this many groups of the training file, a seeded random subset (HRM's
            ``--subsample-size``: 1,000); default all of it.
        augment: move each training sample as ``Sudoku`` (digits relabelled, bands, stacks, transposition)
            or ``Maze`` (the 8 symmetries) do, drawn per sample; off for a build that holds augmentations.
        val_size: validation puzzles, the first of the test file: the published sets have no validation
            split, and the papers watch the test set. A checkpoint chosen by it is chosen on test puzzles.
        test_size: test puzzles, the first of the test file (default: all of it, as the papers report).
        **kwargs: batch sizes, seed, workers (see ``SyntheticTask``). The training rows are the fixed
            training set (``train_size`` is theirs), gathered on the device unless ``augment``.
    """

    def __init__(
        self,
        path: str,
        train_puzzles: int | None = None,
        augment: bool = False,
        val_size: int = 256,
        test_size: int | None = None,
        **kwargs,
    ) -> None:
        if kwargs.pop("train_size", None) is not None:
            raise InputError("data.train_size: the training file sets it; use data.train_puzzles to take fewer")
        super().__init__(val_size=val_size, test_size=test_size or 0, **kwargs)
        self.path, self.augment = Path(path), augment
        self.kind, inputs, labels, groups = read_split(self.path, "train")
        kind, self.test_inputs, self.test_labels, _ = read_split(self.path, "test")
        if kind != self.kind or self.test_inputs.shape[1:] != inputs.shape[1:]:
            raise fail(self.path, f"holds a {self.kind} training file and a {kind} test file", "use one dataset's")
        if train_puzzles is not None:
            if not 1 <= train_puzzles <= groups[-1] + 1:
                raise InputError(
                    f"data.train_puzzles must be 1..{groups[-1] + 1} (the file's puzzles), got {train_puzzles}"
                )
            chosen = self.rng(_TRAIN_SET, 0, 0).permutation(groups[-1] + 1)[:train_puzzles]
            keep = np.isin(groups, chosen)
            inputs, labels = inputs[keep], labels[keep]
        self.test_size = test_size or len(self.test_inputs)
        if not 1 <= self.val_size <= self.test_size <= len(self.test_inputs):
            raise InputError(
                f"data.val_size ({self.val_size}) and data.test_size ({self.test_size}) must be 1 <= val <= test "
                f"<= {len(self.test_inputs)} (the test file's puzzles)"
            )
        self.side = inputs.shape[1]
        if self.kind == "sudoku" and self.side not in BOXES:
            raise fail(self.path, f"holds {self.side}×{self.side} sudokus", f"sides {sorted(BOXES)} are read")
        self.train_size = len(inputs)
        if self.train_size < self.batch_size:
            raise InputError(f"data.batch_size ({self.batch_size}) is more than the {self.train_size} training rows")
        flat = lambda grids: grids.reshape(len(grids), -1)
        self._rows = (flat(inputs), flat(labels))  # labels: every cell's solution, as Sudoku's and Maze's

    @property
    def vocab(self) -> list[str]:
        return list(".123456789") if self.kind == "sudoku" else list(".#SGo")

    @property
    def seq_len(self) -> int:
        return self.side * self.side

    def decode(self, ids) -> str:
        text = super().decode(ids)
        return "/".join(text[i : i + self.side] for i in range(0, len(text), self.side))

    def train_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The training file's rows, as the fixed training set (``SyntheticTask``) stores them."""
        if self._train_set is None:
            self._build_eval_sets()
            self._train_set = np.stack(self._rows, axis=1).astype(self.storage_dtype)
        return self._train_set[:, 0], self._train_set[:, 1]

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        rows = rng.integers(0, self.train_size, size=n)
        return self._rows[0][rows], self._rows[1][rows]

    @property
    def serves_rows(self) -> bool:
        return not self.augment

    def train_batch(self, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = super().train_batch(rank, index)
        if not self.augment:
            return x, y
        n, shape, rng = len(x), (len(x), self.side, self.side), self.rng(_AUGMENT, rank, index)
        if self.kind == "sudoku":
            x, y = augment(x.reshape(shape), y.reshape(shape), BOXES[self.side], rng)
        else:
            t = rng.integers(0, 8, size=n)
            x, y = move(x.reshape(shape), t), move(y.reshape(shape), t)
        return x.reshape(n, -1), y.reshape(n, -1)

    def _build_eval_sets(self) -> None:
        if self._eval_sets:
            return
        flat = lambda grids: grids.reshape(len(grids), -1)
        for purpose, size in ((_VAL, self.val_size), (_TEST, self.test_size)):
            x, y = self.test_inputs[:size], self.test_labels[:size]
            self._eval_sets[purpose, None] = (flat(x).astype(np.int64), flat(y).astype(np.int64))
        self._eval_keys = set(rows_as_keys(self._eval_sets[_TEST, None][0]))

    def puzzles(self, split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As ``Sudoku.puzzles`` (givens, solutions) or ``Maze.puzzles`` (grids, paths), ``[n N N]``."""
        if split == "train":
            x, y = self._rows
        elif split in ("val", "test"):
            x, y = self.eval_set({"val": _VAL, "test": _TEST}[split])
        else:
            raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}")
        shape = (len(x[:n]), self.side, self.side)
        x, y = x[:n].reshape(shape).astype(np.int64), y[:n].reshape(shape).astype(np.int64)
        return (x, y) if self.kind == "sudoku" else (x, y >= START)
