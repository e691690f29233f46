"""``data.train_size``: a fixed training set drawn once, sampled by every rank, never overlapping evaluation."""

import lightning as L
import numpy as np
import pytest
import torch

from conftest import tiny_config
from looped import LoopedLM
from looped.datamodules import LongestIncreasingSubsequence, PHop
from looped.datamodules.base import rows_as_keys
from looped.datamodules.train_set import _TRAIN_SET, TrainRows


def task(**kwargs):
    args = dict(alphabet_size=4, length=16, hops=2, batch_size=32, val_size=256, test_size=256, seed=3)
    return PHop(**{**args, **kwargs})


def test_batches_are_rows_of_the_fixed_set_and_the_set_avoids_every_eval_sample():
    t = task(train_size=3000)
    t.setup("fit")
    inputs, labels = t.train_set()
    assert inputs.shape == (3000, t.seq_len) and labels.shape == inputs.shape
    members = {key: i for i, key in enumerate(rows_as_keys(inputs))}
    eval_keys = set(rows_as_keys(t.eval_set(1)[0])) | set(rows_as_keys(t.eval_set(2)[0]))
    assert not eval_keys & set(members)
    for rank in (0, 1):
        x, y = t.train_batch(rank, 7)
        assert x.dtype == np.int64 and y.dtype == np.int64  # what the model sees, as without a fixed set
        for row_x, row_y in zip(x, y):
            i = members[row_x.tobytes()]
            assert np.array_equal(labels[i], row_y)  # the stored labels come with their input
    assert not np.array_equal(t.train_batch(0, 7)[0], t.train_batch(1, 7)[0])  # ranks draw different rows
    assert np.array_equal(t.train_batch(0, 7)[0], task(train_size=3000).train_batch(0, 7)[0])  # deterministic


def test_a_smaller_set_is_a_prefix_of_a_larger_one():
    small, large = task(train_size=5000).train_set(), task(train_size=9000).train_set()
    assert np.array_equal(small[0], large[0][:5000]) and np.array_equal(small[1], large[1][:5000])


def test_the_set_keeps_dense_labels_and_matches_fresh_generation():
    t = task(train_size=4096, supervise="all")
    inputs, labels = t.train_set()
    assert np.array_equal(labels, t.labels_at_every_position(inputs.astype(np.int64)))
    fresh_x, _ = t.fresh_batch(t.rng(_TRAIN_SET, 0, 0), 4096)  # chunk 0 is one fresh draw
    assert np.array_equal(inputs, fresh_x)


def test_processes_draw_the_same_set_as_one():
    """``num_workers`` forked processes draw the chunks; the set is the one the serial loop draws."""
    serial = task(train_size=3 * 4096 + 100, supervise="all")
    parallel = task(train_size=3 * 4096 + 100, supervise="all", num_workers=2)
    expected = np.concatenate([serial.train_set_chunk(i) for i in range(4)])  # chunk by chunk, here
    assert np.array_equal(np.stack(parallel.train_set(), axis=1), expected)
    assert np.array_equal(np.stack(serial.train_set(), axis=1), expected)


def test_the_loader_resumes_mid_draw_with_the_reference_rows():
    """A loader started at any batch (a resume) yields exactly ``train_rows`` from there, across a draw boundary."""
    t = task(train_size=3000, batch_size=8)
    start = 2 * t.ROWS_PER_DRAW - 5
    loader = TrainRows(t, rank=1, start=start)
    for index, batch in zip(range(start, start + 10), loader):
        assert np.array_equal(batch["rows"].numpy(), t.train_rows(1, index))


def test_a_set_smaller_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="data.train_size"):
        task(train_size=8)


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)


def test_the_trainer_gets_the_reference_batches_gathered_from_the_fixed_set(tmp_path):
    """The loader hands over row indices only; the data module gathers them after the device transfer."""
    t = task(train_size=3000, batch_size=8)
    assert set(next(iter(t.train_dataloader()))) == {"rows"}
    recorder = BatchRecorder()
    config = tiny_config(vocab_size=t.vocab_size, max_seq_len=t.seq_len)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=t.ROWS_PER_DRAW + 3,
        limit_val_batches=0,
        callbacks=[recorder],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(LoopedLM(config), datamodule=t)
    assert len(recorder.batches) == t.ROWS_PER_DRAW + 3  # across a draw boundary of row indices
    for index, batch in enumerate(recorder.batches):
        x, y = t.train_batch(0, index)
        assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
        assert np.array_equal(batch["input_ids"].numpy(), x) and np.array_equal(batch["labels"].numpy(), y)


@pytest.mark.parametrize(
    "make, dtype",
    [
        (lambda: task(train_size=4096), np.int8),  # 5 tokens
        (
            lambda: LongestIncreasingSubsequence(
                size=12, value_range=150, format="direct", batch_size=32, val_size=64, test_size=64, train_size=4096
            ),
            np.int16,
        ),  # 166 tokens
    ],
)
def test_the_set_is_stored_narrow_and_gathers_back_exactly(make, dtype):
    """The narrowest type that holds the vocabulary and -100; the gather returns the generated int64 samples."""
    t = make()
    assert t.storage_dtype is dtype
    t.setup("fit")
    inputs, labels = t.train_set()
    assert inputs.dtype == dtype and labels.dtype == dtype
    fresh_x, fresh_y = t.fresh_batch(t.rng(_TRAIN_SET, 0, 0), 4096)  # chunk 0 is one fresh draw
    if dtype is not np.int8:
        assert fresh_x.max() > np.iinfo(np.int8).max  # ids that int8 would wrap are there to be kept
    assert np.array_equal(inputs, fresh_x) and np.array_equal(labels, fresh_y)
    rows = torch.arange(0, 4096, 7)
    batch = t.on_after_batch_transfer({"rows": rows}, 0)
    assert batch["input_ids"].dtype == torch.int64
    assert np.array_equal(batch["input_ids"].numpy(), fresh_x[rows.numpy()])
    assert np.array_equal(batch["labels"].numpy(), fresh_y[rows.numpy()])
