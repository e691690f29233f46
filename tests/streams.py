"""The first batches of a synthetic task's training stream, as the real loader delivers them."""

from itertools import islice

import torch
from torch.utils.data import DataLoader

from looped.datamodules.base import SyntheticTask, TrainStream


def stream(task: SyntheticTask, workers: int, n: int, start: int = 0, rank: int = 0) -> list[torch.Tensor]:
    """``input_ids`` of batches ``start … start+n-1`` of ``rank``, through a DataLoader with ``workers`` workers."""
    loader = DataLoader(TrainStream(task, rank=rank, start=start), batch_size=None, num_workers=workers)
    return [batch["input_ids"] for batch in islice(loader, n)]
