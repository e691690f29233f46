"""Fixed training sets (``data.train_size``): drawn once, sampled by row index, gathered on the device.

The paper trains p-hop, i-GSM and addition on a fixed set of 4M samples. ``FixedTrainingSet``
gives a ``SyntheticTask`` that set:

* drawn once at setup in seeded chunks (chunk ``i`` is a pure function of ``(seed, i)``), by
  ``data.num_workers`` loader processes with the same result as one;
* stored in the narrowest integer type that holds the vocabulary and the -100 label, each
  sample's inputs and labels side by side (``[n 2 t]``), so a batch is one gather;
* served as row indices (``TrainRows``): the loader hands over only ``{"rows": [b]}`` and
  ``on_after_batch_transfer`` gathers those rows from a copy of the set on the training
  device, so feeding a step costs one gather kernel whatever the sample length
  (``benchmarks/datagen.py``). Batch ``i`` of rank ``r`` is a pure function of ``(seed, r, i)``,
  so a resumed run draws the batches it would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from looped.contract import IGNORE
from looped.errors import InputError

# What a seed is for: the streams of one task never share random numbers.
_TRAIN, _VAL, _TEST, _TRAIN_SET = 0, 1, 2, 3


class FixedTrainingSet:
    """The fixed-training-set half of ``SyntheticTask`` (a mixin: it reads the task's ``train_size``,
    ``batch_size``, ``num_workers``, ``vocab_size``, ``rng``, ``fresh_batch`` and ``eval_keys``)."""

    train_size: int | None
    _train_set: np.ndarray | None  # [n 2 t]: each sample's input_ids and labels, side by side
    _train_set_on_device: dict[torch.device, torch.Tensor]

    ROWS_PER_DRAW = 256
    """Batches of fixed-set row indices drawn per RNG call: one call costs ~20 µs to set up, a batch's rows ~1 µs."""

    def train_rows_drawn(self, rank: int, draw: int) -> np.ndarray:
        """Rows of the fixed training set (``data.train_size``) for batches ``draw·R … draw·R + R-1`` of ``rank``.

        ``[R b]`` with R = ``ROWS_PER_DRAW``: uniform with replacement, seeded by ``(seed, rank, draw)``,
        so every batch is a pure function of its index and a resumed run draws the batches it would have drawn.
        """
        if self.train_size is None:
            raise InputError("fixed-set row indices need a fixed training set: set data.train_size")
        return self.rng(_TRAIN, rank, draw).integers(0, self.train_size, size=(self.ROWS_PER_DRAW, self.batch_size))

    def train_rows(self, rank: int, index: int) -> np.ndarray:
        """Rows of the fixed training set that make batch ``index`` of ``rank`` (``[b]``)."""
        draw, offset = divmod(index, self.ROWS_PER_DRAW)
        return self.train_rows_drawn(rank, draw)[offset]

    TRAIN_SET_CHUNK = 4096
    """Samples per seeded chunk of the fixed training set (chunk ``i`` is a pure function of ``(seed, i)``)."""

    def train_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed training set of ``train_size`` samples (``data.train_size``), drawn once.

        Built in chunks of fresh samples seeded by chunk index alone (the same set on every
        rank; ranks sample different rows), so a smaller ``train_size`` is a prefix of a
        larger one, and ``num_workers`` processes draw the chunks in parallel with the same
        result as one (a 4M-sample set takes minutes on one core). Stored in ``storage_dtype``
        (an eighth of int64's memory for most tasks), with each sample's inputs and labels in
        one block ``[n 2 t]``, so a batch is one gather.
        """
        if self._train_set is None:
            chunks = TrainSetChunks(self)
            workers = min(self.num_workers, len(chunks))
            rank_zero_info(
                f"{type(self).__name__}: drawing the fixed training set of {self.train_size:,} samples"
                + (f" with {workers} processes" if workers > 1 else "")
            )
            self._build_eval_sets()  # once here, before the workers start, so that none rebuilds them
            loader = DataLoader(chunks, batch_size=None, num_workers=workers)  # in chunk order
            self._train_set = np.concatenate([chunk.numpy() for chunk in loader])
        return self._train_set[:, 0], self._train_set[:, 1]

    def train_set_chunk(self, index: int) -> np.ndarray:
        """Chunk ``index`` of the fixed training set, ``[n 2 t]`` (the last chunk may be short)."""
        n = min(self.TRAIN_SET_CHUNK, self.train_size - index * self.TRAIN_SET_CHUNK)
        x, y = self.fresh_batch(self.rng(_TRAIN_SET, 0, index), n)
        return np.stack([x, y], axis=1).astype(self.storage_dtype)

    @property
    def storage_dtype(self) -> type:
        """The narrowest signed integer type holding every token id and the -100 label of a fixed set.

        The gather reads (and a GPU holds) this many bytes per token twice over; int8 halves
        int16's cost for every task of at most 128 tokens.
        """
        for dtype in (np.int8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= IGNORE and self.vocab_size - 1 <= info.max:
                return dtype
        raise InputError(f"{type(self).__name__}: a vocabulary of {self.vocab_size} tokens does not fit int32")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """A batch of fixed-set row indices becomes those rows, gathered on the batch's device.

        ``input_ids`` and ``labels`` are the two halves of one gathered ``[b 2 t]`` tensor
        (strided views: use ``reshape``, not ``view``).
        """
        if "rows" not in batch:
            return batch
        samples = self.train_set_on(batch["rows"].device).index_select(0, batch["rows"]).long()  # [b 2 t]
        return {"input_ids": samples[:, 0], "labels": samples[:, 1]}

    def train_set_on(self, device: torch.device) -> torch.Tensor:
        """The fixed training set ``[n 2 t]`` on ``device``, copied there once (on the CPU: shared, no copy)."""
        if device not in self._train_set_on_device:
            self.train_set()
            self._train_set_on_device[device] = torch.from_numpy(self._train_set).to(device)
        return self._train_set_on_device[device]


class TrainSetChunks(Dataset):
    """The seeded chunks of a task's fixed training set, for loader workers to draw in parallel."""

    def __init__(self, task: FixedTrainingSet) -> None:
        self.task = task

    def __len__(self) -> int:
        return -(-self.task.train_size // self.task.TRAIN_SET_CHUNK)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.task.train_set_chunk(index)


class TrainRows:
    """Row indices of the fixed-set batches ``start, start+1, ...`` of ``rank``: ``{"rows": [b]}``.

    The training loader of a fixed set, iterated in the training process (a worker
    would only add a hand-off per batch); ``SyntheticTask.on_after_batch_transfer``
    turns each into ``input_ids`` and ``labels``.
    """

    def __init__(self, task: FixedTrainingSet, rank: int, start: int) -> None:
        self.task, self.rank, self.start = task, rank, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        draw, offset = divmod(self.start, self.task.ROWS_PER_DRAW)
        while True:
            # One tensor per draw, split into views: a batch then costs the host no conversion at all.
            for rows in torch.from_numpy(self.task.train_rows_drawn(self.rank, draw)).unbind(0)[offset:]:
                yield {"rows": rows}
            draw, offset = draw + 1, 0
