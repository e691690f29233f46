"""PerLoopAccuracy draws its curve into TensorBoard after validation and test."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import looped
from looped.callbacks import PerLoopAccuracy
from looped.callbacks.per_loop import exact_match_per_loop, log_figure, perplexity_per_loop
from looped.datamodules import PHop
from looped.tools.plots import per_loop_figure


def test_curve_image_is_written_after_fit_and_test(tmp_path):
    d = PHop(length=16, hops=2, batch_size=16, val_size=32, test_size=32)
    model = looped.LoopedLM(
        looped.LoopedConfig(vocab_size=d.vocab_size, max_seq_len=d.seq_len, d_model=32, n_heads=4, d_ff=64, loops=2),
        warmup_steps=2,
        decay_steps=5,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=5,
        val_check_interval=5,  # the training stream is endless: validate at the last step
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[PerLoopAccuracy()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=d)
    trainer.test(model, datamodule=d, verbose=False)
    assert "test/exact_match_loop4" in trainer.callback_metrics  # the scalars are still there
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0}).Reload()
    images = events.Tags()["images"]
    assert "val/exact_match_per_loop" in images and "test/exact_match_per_loop" in images
    assert events.Images("test/exact_match_per_loop")[-1].step == 5
    assert events.Images("test/exact_match_per_loop")[-1].encoded_image_string.startswith(b"\x89PNG")


def test_figure_marks_the_trained_loops():
    fig = per_loop_figure([0.1, 0.5, 0.9, 0.8], trained_loops=3)
    (ax,) = fig.axes
    curve, marker = ax.lines
    assert list(curve.get_xdata()) == [1, 2, 3, 4]
    assert list(marker.get_xdata()) == [3, 3]


def test_no_tensorboard_logger_draws_nothing():
    def draw():
        raise AssertionError("drew without a TensorBoard logger")

    log_figure(SimpleNamespace(loggers=[], global_step=0), "x", draw)


@pytest.mark.parametrize("overrides", [{}, {"prelude_layers": 1, "coda_layers": 1}], ids=["batched-readout", "coda"])
def test_exact_match_per_loop_matches_separate_forwards(overrides):
    torch.manual_seed(0)
    shape = dict(vocab_size=5, max_seq_len=12, d_model=32, n_heads=4, d_ff=64, loops=2, init_std=0.3)
    config = looped.LoopedConfig(**shape, **overrides)
    model = looped.LoopedTransformer(config).eval()
    input_ids = torch.randint(0, 5, (16, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, 0]
    labels[::2, 3] = input_ids[::2, 1]
    labels[3] = -100  # no labelled position: counts as right
    with torch.no_grad():
        per_loop = exact_match_per_loop(model, input_ids, labels, loops=5)
        for n in range(1, 6):
            preds = model(input_ids, loops=n).argmax(-1)
            rows = zip(preds.tolist(), labels.tolist())
            expected = [all(p == y for p, y in zip(row, ys) if y != -100) for row, ys in rows]
            assert per_loop[n - 1].tolist() == expected
    assert 0 < per_loop.sum() < per_loop.numel()  # neither all right nor all wrong


@pytest.mark.parametrize("overrides", [{}, {"prelude_layers": 1, "coda_layers": 1}], ids=["batched-readout", "coda"])
def test_perplexity_per_loop_matches_separate_forwards(overrides, monkeypatch):
    """Language-model labels (every position): one forward's per-loop perplexity = exp(CE) of a forward per n."""
    import looped.evaluation.loop_readout

    monkeypatch.setattr(
        looped.evaluation.loop_readout, "READOUT_ELEMENTS", 2 * 16 * 11 * 7
    )  # readouts of two loops at a time
    torch.manual_seed(0)
    shape = dict(vocab_size=7, max_seq_len=12, d_model=32, n_heads=4, d_ff=64, loops=2, init_std=0.3)
    model = looped.LoopedTransformer(looped.LoopedConfig(**shape, **overrides)).eval()
    tokens = torch.randint(0, 7, (16, 12), generator=torch.Generator().manual_seed(1))
    input_ids, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[2, :4] = -100  # a padded start, as a document boundary would leave
    with torch.no_grad():
        per_loop = perplexity_per_loop(model, input_ids, labels, loops=5)
        for n in range(1, 6):
            logits = model(input_ids, loops=n)
            expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            torch.testing.assert_close(per_loop[n - 1], expected.exp(), rtol=1e-5, atol=1e-5)
    assert len(set(per_loop.tolist())) == 5  # each loop reads its own state
