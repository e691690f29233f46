"""A run resumed from its step-N checkpoint logs exactly the losses of the uninterrupted run."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from looped import LoopedConfig, LoopedLM
from looped.callbacks import InterruptCheckpoint
from looped.datamodules import PHop

STEPS, STOP = 12, 5


class LossRecorder(L.Callback):
    def __init__(self, interrupt_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.interrupt_at = interrupt_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()
        self.inputs[trainer.global_step] = batch["input_ids"]
        if trainer.global_step == self.interrupt_at:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C


def train(root, ckpt_path=None, interrupt_at=None, train_size=None) -> LossRecorder:
    L.seed_everything(0)
    data = PHop(length=16, hops=2, batch_size=16, val_size=32, test_size=32, num_workers=2, train_size=train_size)
    config = LoopedConfig(
        vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=4, d_ff=64, loops=3, dropout=0.1
    )
    model = LoopedLM(config, warmup_steps=3)
    recorder = LossRecorder(interrupt_at)
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        limit_val_batches=0,
        callbacks=[
            recorder,
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=STOP, save_top_k=-1),
            InterruptCheckpoint(),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return recorder


@pytest.mark.slow
@pytest.mark.parametrize("train_size", [None, 2000], ids=["generated", "fixed_set"])
def test_resume_continues_the_same_losses(tmp_path, train_size):
    full = train(tmp_path / "full", train_size=train_size)
    assert sorted(full.losses) == list(range(1, STEPS + 1))
    checkpoint = tmp_path / "full" / "ckpt" / f"epoch=0-step={STOP}.ckpt"
    assert checkpoint.exists()
    resumed = train(tmp_path / "resumed", ckpt_path=checkpoint, train_size=train_size)
    # Same data position (2 workers, or the fixed set's row draws), optimiser, schedule and dropout RNG.
    assert sorted(resumed.losses) == list(range(STOP + 1, STEPS + 1))
    for step in resumed.losses:
        assert torch.equal(resumed.inputs[step], full.inputs[step]), step
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6), step
    assert full.losses[STEPS] < full.losses[1]


@pytest.mark.slow
def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    """Ctrl-C at step 7 (between periodic checkpoints) loses nothing: interrupted.ckpt resumes at step 8."""
    full = train(tmp_path / "full").losses
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on KeyboardInterrupt exits with 1
        train(tmp_path / "stopped", interrupt_at=7)
    checkpoint = tmp_path / "stopped" / "ckpt" / "interrupted.ckpt"
    assert checkpoint.exists()
    resumed = train(tmp_path / "resumed", ckpt_path=checkpoint).losses
    assert sorted(resumed) == list(range(8, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_checkpoint_loads_safely_into_a_new_module(tmp_path):
    """Hyperparameters are plain data: load_from_checkpoint works under torch.load(weights_only=True)."""
    data = PHop(length=16, hops=2, batch_size=8, val_size=16, test_size=16)
    config = LoopedConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=4, d_ff=64, loops=2)
    model = LoopedLM(config, warmup_steps=1, decay_steps=2)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = LoopedLM.load_from_checkpoint(path, weights_only=True)
    assert loaded.config == config
    x = torch.from_numpy(data.eval_set(1)[0][:4])
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
