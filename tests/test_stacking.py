"""Gradual stacking: the middle block is copied, training continues on the same schedule."""

import lightning as L
import pytest
import torch

from conftest import tiny_config, tiny_model
from looped import LoopedLM
from looped.callbacks.stacking import GradualStacking, grow_middle
from looped.datamodules import PHop
from looped.training.module import warmup_cosine


def test_grow_middle_copies_the_middle_block():
    model = tiny_model(block_layers=4).train()
    before = [layer for layer in model.block]
    grown = grow_middle(model.block, 2)
    assert len(grown) == 6
    # [0, 1, 2, 3] -> [0, 1, 2, 1', 2', 3]: originals kept in place, copies after the middle block.
    for index, original in zip([0, 1, 2, 5], [0, 1, 2, 3]):
        assert grown[index] is before[original]
    for copy_index, source in [(3, 1), (4, 2)]:
        assert grown[copy_index] is not before[source]
        for a, b in zip(grown[copy_index].parameters(), before[source].parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with pytest.raises(ValueError, match="block_layers=5"):
        grow_middle(model.block, 5)


class LrRecorder(L.Callback):
    def __init__(self):
        self.lrs, self.layers = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.layers[trainer.global_step] = len(pl_module.model.block)


@pytest.mark.slow
def test_training_grows_and_keeps_the_schedule(tmp_path):
    data = PHop(length=16, hops=2, batch_size=8, val_size=16, test_size=16)
    config = tiny_config(vocab_size=data.vocab_size, max_seq_len=data.seq_len, block_layers=2)
    module = LoopedLM(config, warmup_steps=2, decay_steps=8)
    recorder = LrRecorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=8,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[GradualStacking(grow_at_steps=[3, 6], block_layers=1), recorder],
    )
    trainer.fit(module, datamodule=data)
    assert [recorder.layers[s] for s in range(8)] == [2, 2, 2, 3, 3, 3, 4, 4]
    # The rebuilt optimiser trains every layer, and the LR follows one warmup-cosine curve throughout.
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in trained for p in module.model.parameters())
    for step, lr in recorder.lrs.items():
        assert lr == pytest.approx(1e-3 * warmup_cosine(step, 2, 8, 0.1)), step
    # The checkpoint describes the grown model, so it reloads.
    trainer.save_checkpoint(tmp_path / "grown.ckpt")
    reloaded = LoopedLM.load_from_checkpoint(tmp_path / "grown.ckpt", weights_only=True)
    assert len(reloaded.model.block) == 4
