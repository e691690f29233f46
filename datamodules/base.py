"""Shared machinery of every synthetic task: seeding, on-the-fly training streams, fixed eval sets.

A task only says how to draw samples (``generate``) and what its tokens are
(``vocab``). This base turns that into

* a training stream generated on the fly, one whole batch at a time
  (vectorised), where batch ``i`` of rank ``r`` is a pure function of
  ``(seed, r, i)``. Dataloader workers take every W-th batch index, so the
  stream is the same for any number of workers, differs across ranks, and
  resumes at the exact batch it stopped at (the start index comes from the
  restored ``global_step``);
* or, with ``train_size``, batches of rows drawn from a fixed training set. The
  loader then hands over only the row indices (no worker, no copy of samples);
  ``on_after_batch_transfer`` gathers the rows from a copy of the set on the
  training device, so feeding a step costs one gather kernel whatever the
  sample length (``benchmarks/datagen.py``);
* fixed validation and test sets drawn from their own seeds, disjoint from each
  other, with every training sample that collides with them redrawn, so no
  evaluation sample is ever trained on. A task with several named evaluation
  sets (``eval_names``, e.g. one per problem size) gets one validation and one
  test loader per name, in that order, all disjoint from each other and from
  training.

Batches are dicts ``{"input_ids": [b t], "labels": [b t]}`` with labels -100
except at answer positions.
"""

from __future__ import annotations

import zlib
from abc import abstractmethod
from collections.abc import Callable, Iterator
from functools import cached_property

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from looped.contract import IGNORE
from looped.datamodules.train_set import _TEST, _TRAIN, _VAL, FixedTrainingSet, TrainRows
from looped.errors import InputError


def answer_at_end(sequences: np.ndarray, answer: np.ndarray, separator: int) -> tuple[np.ndarray, np.ndarray]:
    """Input ``sequence =`` and the answer as the only label, at ``=``."""
    n = len(sequences)
    input_ids = np.concatenate([sequences, np.full((n, 1), separator, dtype=np.int64)], axis=1)
    labels = np.full_like(input_ids, IGNORE)
    labels[:, -1] = answer
    return input_ids, labels


def draw_kept(n: int, rate: float, draw: Callable[[int], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """The first ``n`` rows that ``draw(m)`` keeps of ``m`` fresh samples (it returns the kept rows' arrays),
    drawing again until there are ``n``, each time with headroom for the share ``rate`` it keeps."""
    parts: list[tuple[np.ndarray, ...]] = []
    have = 0
    while have < n:
        parts.append(draw(int((n - have) / rate * 1.2) + 8))
        have += len(parts[-1][0])
    return tuple(np.concatenate(column)[:n] for column in zip(*parts))


def rows_as_keys(input_ids: np.ndarray) -> list[bytes]:
    """Hashable identity of each sample (its input tokens determine its answer)."""
    return [row.tobytes() for row in np.ascontiguousarray(input_ids, dtype=np.int64)]


class SyntheticTask(FixedTrainingSet, L.LightningDataModule):
    """Base class of tasks generated on the fly. Subclasses define ``vocab``, ``seq_len`` and ``generate``.

    Args:
        batch_size: training samples per batch (per device).
        eval_batch_size: samples per validation / test batch (default: ``batch_size``).
        val_size: samples in the fixed validation set (in each one, with ``eval_names``).
        test_size: samples in the fixed test set (in each one, with ``eval_names``).
        seed: root seed; training, validation and test streams derive from it.
        num_workers: dataloader worker processes generating the training stream; with
            ``train_size``, processes drawing the fixed set at setup (row indices are then drawn
            in the training process, with no worker).
        train_size: None: a fresh sample for every training example (an endless stream);
            N: a fixed training set of N samples drawn once at setup, which batches then sample
            uniformly with replacement (the paper's "4M train"). The set is copied once to the
            training device in the narrowest integer type that holds the vocabulary and the -100
            label (int8 for every task up to 128 tokens: 2 bytes per token for inputs and labels,
            e.g. 2.1 GB for p-hop's 4M x 257) and each step gathers its rows there, so a GPU is
            never input-bound (see ``benchmarks/datagen.py``).
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_size: int = 1024,
        test_size: int = 1024,
        seed: int = 0,
        num_workers: int = 0,
        train_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise InputError(f"data.batch_size must be >= 1, got {batch_size}")
        if train_size is not None and train_size < batch_size:
            raise InputError(
                f"data.train_size ({train_size}) must hold at least one batch (data.batch_size={batch_size})"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_size = train_size
        self._train_set: np.ndarray | None = None  # [n 2 t]: each sample's input_ids and labels, side by side
        self._train_set_on_device: dict[torch.device, torch.Tensor] = {}
        self._eval_sets: dict[tuple[int, str | None], tuple[np.ndarray, np.ndarray]] = {}
        self._eval_keys: set[bytes] = set()

    _supervise: str = "last"

    @property
    def supervise(self) -> str:
        """``last``: train on the answer only; ``all``: also on ``labels_at_every_position`` (tasks that have it)."""
        return self._supervise

    @supervise.setter
    def supervise(self, value: str) -> None:
        if value not in ("last", "all"):
            raise InputError(f"data.supervise must be 'last' or 'all', got {value!r}")
        self._supervise = value

    eval_names: list[str] = []
    """Named evaluation sets, each drawn by ``generate_eval``; empty: one validation and one test set."""

    eos_id: int | None = None
    """The token that ends an answer, for tasks scored by generation (``CoTTask``); None for the others."""

    # -- what a task defines ------------------------------------------------
    @property
    @abstractmethod
    def vocab(self) -> list[str]:
        """Token strings; the token id is the index."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Length ``t`` of every ``input_ids`` row."""

    @abstractmethod
    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` samples: ``input_ids`` and ``labels``, int64 arrays ``[n t]``."""

    def generate_eval(self, name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` samples of the evaluation set ``name`` (one of ``eval_names``); default: ``generate``."""
        return self.generate(rng, n)

    # -- derived -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @cached_property
    def token_ids(self) -> dict[str, int]:
        """Token string -> id (the vocabulary is fixed once a task is built)."""
        return {token: i for i, token in enumerate(self.vocab)}

    def decode(self, ids) -> str:
        """Readable text of a row of token ids (padding and -100 dropped)."""
        return "".join(self.vocab[i] for i in np.asarray(ids).tolist() if 0 <= i < self.vocab_size)

    def rng(self, purpose: int, rank: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, purpose, rank, index])

    # -- evaluation sets -------------------------------------------------------
    def eval_set(self, purpose: int, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The fixed validation (``_VAL``) or test (``_TEST``) set, or its set ``name`` of ``eval_names``.

        All sets are built together, once, each excluding every sample drawn before it.
        """
        self._build_eval_sets()
        if (purpose, name) not in self._eval_sets:
            sets = self.eval_names or [None]
            raise KeyError(f"{type(self).__name__} has no evaluation set {name!r}; its sets are {sets}")
        return self._eval_sets[purpose, name]

    def _build_eval_sets(self) -> None:
        if self._eval_sets:
            return
        seen: set[bytes] = set()
        for which, size in ((_VAL, self.val_size), (_TEST, self.test_size)):
            for name in self.eval_names or [None]:
                self._eval_sets[which, name] = self._draw_unique(which, size, seen, name)
        self._eval_keys = seen

    def _draw_unique(
        self, purpose: int, size: int, seen: set[bytes], name: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        ids, labels, attempt = [], [], 0
        while sum(len(x) for x in ids) < size:
            if name is None:
                x, y = self.generate(self.rng(purpose, 0, attempt), size)
            else:
                # Seeded by the name, not its position: a set stays the same when others are added.
                rng = np.random.default_rng([self.seed, purpose, 0, attempt, zlib.crc32(name.encode())])
                x, y = self.generate_eval(name, rng, size)
            keep = []
            for i, key in enumerate(rows_as_keys(x)):
                if key not in seen and len(keep) + sum(len(a) for a in ids) < size:
                    seen.add(key)
                    keep.append(i)
            ids.append(x[keep])
            labels.append(y[keep])
            attempt += 1
            if attempt > 100:
                raise InputError(
                    f"{type(self).__name__}: could not draw {size} distinct evaluation samples"
                    + (f" for set {name!r}" if name is not None else "")
                    + "; the task has too few distinct samples, lower data.val_size / data.test_size "
                    "or make the task larger"
                )
        return np.concatenate(ids), np.concatenate(labels)

    @property
    def eval_keys(self) -> set[bytes]:
        self._build_eval_sets()
        return self._eval_keys

    def train_batch(self, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Training batch ``index`` of ``rank`` as int64 arrays: fresh samples (val/test ones redrawn) or fixed rows.

        The reference definition of the stream; the training loader delivers exactly these batches.
        """
        if self.train_size is not None:
            inputs, labels = self.train_set()
            rows = self.train_rows(rank, index)
            return inputs[rows].astype(np.int64), labels[rows].astype(np.int64)
        return self.fresh_batch(self.rng(_TRAIN, rank, index), self.batch_size)

    def train_tensors(self, rank: int, index: int) -> dict[str, torch.Tensor]:
        """Training batch ``index`` of ``rank`` as the loader delivers it (a task may add keys, e.g. ``puzzle_ids``)."""
        x, y = self.train_batch(rank, index)
        return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}

    def fresh_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` newly generated training samples; any that occur in val/test are redrawn."""
        x, y = self.generate(rng, n)
        eval_keys = self.eval_keys
        clash = [i for i, key in enumerate(rows_as_keys(x)) if key in eval_keys]
        while clash:
            nx, ny = self.generate(rng, len(clash))
            x[clash], y[clash] = nx, ny
            clash = [i for i, key in zip(clash, rows_as_keys(nx)) if key in eval_keys]
        if self.supervise == "all":
            y = self.labels_at_every_position(x)
        return x, y

    def labels_at_every_position(self, input_ids: np.ndarray) -> np.ndarray:
        """Dense training labels for ``supervise="all"``; evaluation always scores the answer alone."""
        raise NotImplementedError(f"{type(self).__name__} has no per-position labels; use data.supervise: last")

    # -- Lightning hooks -------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self._build_eval_sets()
        if self.train_size is not None and stage in (None, "fit"):
            self.train_set()  # once, before dataloader workers fork (they share it copy-on-write)

    def _consumed_batches(self) -> int:
        """Batches this rank already trained on (after a resume: restored from the checkpoint)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    @property
    def serves_rows(self) -> bool:
        """The training loader hands over fixed-set row indices (gathered on the device), not whole batches.

        True with ``train_size``; a task that transforms each batch of rows (an augmentation) streams them instead.
        """
        return self.train_size is not None

    def train_dataloader(self) -> DataLoader | TrainRows:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        start = self._consumed_batches()
        if self.serves_rows:
            # Only the row indices travel: on_after_batch_transfer gathers them on the device.
            # A plain iterable: a DataLoader would only add its per-batch bookkeeping.
            return TrainRows(self, rank=rank, start=start)
        return DataLoader(
            TrainStream(self, rank=rank, start=start),
            batch_size=None,  # the stream yields whole batches
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: creating the iterator must not consume the global RNG
            # (dropout's), or a resumed run would draw different dropout masks.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def eval_extras(self, input_ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Extra per-sample arrays for evaluation batches (e.g. a gold answer for decoding); none by default."""
        return {}

    def _eval_loader(self, purpose: int) -> DataLoader | list[DataLoader]:
        """One loader, or one per name of ``eval_names`` in that order (Lightning's ``dataloader_idx``)."""
        loaders = []
        for name in self.eval_names or [None]:
            input_ids, labels = self.eval_set(purpose, name)
            dataset = EvalSet(input_ids, labels, self.eval_extras(input_ids, labels))
            loaders.append(DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False))
        return loaders if self.eval_names else loaders[0]

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loader(_VAL)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loader(_TEST)

    def describe(self) -> str:
        return f"{type(self).__name__}: vocab ({self.vocab_size}) = {' '.join(self.vocab)}; seq_len = {self.seq_len}"


class TrainStream(IterableDataset):
    """Endless training batches ``start, start+1, ...``; worker w of W yields indices ≡ w (mod W).

    PyTorch's DataLoader takes one batch from each worker in turn, so the
    interleaved output is exactly ``start, start+1, ...`` for any W.
    """

    def __init__(self, task: SyntheticTask, rank: int, start: int) -> None:
        self.task, self.rank, self.start = task, rank, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + worker
        while True:
            yield self.task.train_tensors(self.rank, index)
            index += workers


class EvalSet(Dataset):
    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> None:
        self.input_ids = torch.from_numpy(input_ids)
        self.labels = torch.from_numpy(labels)
        self.extras = {name: torch.from_numpy(np.asarray(v)) for name, v in (extras or {}).items()}

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], **{k: v[i] for k, v in self.extras.items()}}
