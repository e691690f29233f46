"""A run resumed from its step-N checkpoint logs exactly the losses of the uninterrupted run."""

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from looped import LoopedConfig, LoopedLM
from looped.datamodules import PHop

STEPS, STOP = 12, 5


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def train(root, ckpt_path=None) -> dict[int, float]:
    L.seed_everything(0)
    data = PHop(length=16, hops=2, batch_size=16, val_size=32, test_size=32, num_workers=2)
    config = LoopedConfig(
        vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=4, d_ff=64, loops=3, dropout=0.1
    )
    model = LoopedLM(config, warmup_steps=3)
    recorder = LossRecorder()
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        limit_val_batches=0,
        callbacks=[recorder, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=STOP, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return recorder.losses


@pytest.mark.slow
def test_resume_continues_the_same_losses(tmp_path):
    full = train(tmp_path / "full")
    assert sorted(full) == list(range(1, STEPS + 1))
    checkpoint = tmp_path / "full" / "ckpt" / f"epoch=0-step={STOP}.ckpt"
    assert checkpoint.exists()
    resumed = train(tmp_path / "resumed", ckpt_path=checkpoint)
    # Same data position (2 workers), optimiser, schedule and dropout RNG: identical losses.
    assert sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    assert full[STEPS] < full[1]
