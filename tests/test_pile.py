"""``PileDataModule``: shifted token blocks, primitives labelled on the answer only, exact resume in a real fit."""

import lightning as L
import pytest
import torch

from looped import LoopedLM
from looped.datamodules import PileDataModule
from looped.datamodules.primitives import ReasoningPrimitives
from looped.errors import InputError
from looped.model import LoopedConfig
from looped.training.module import IGNORE
from pile_data import prepared_pile


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_pile(tmp_path_factory.mktemp("piledm"), shards=4, per_shard=120, val_fraction=0.1, workers=2)


def test_batches_are_next_token_pairs_of_stored_blocks(data_dir):
    dm = PileDataModule(str(data_dir), seq_len=16, batch_size=4, num_workers=0, primitives_size=0)
    assert (dm.vocab_size, dm.eos_id, dm.eval_names) == (257, 256, ["pile"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    (val,) = dm.val_dataloader()
    first = next(iter(val))
    text = bytes(t for t in first["input_ids"][0].tolist() if t < 256).decode()
    assert "doc " in text or text.strip()  # real held-out text


def test_primitives_sets_label_only_the_answer(data_dir):
    dm = PileDataModule(str(data_dir), seq_len=512, batch_size=2, num_workers=0, primitives_size=8, primitives_shots=2)
    assert dm.eval_names == [
        "pile",
        "primitives_math_d0",
        "primitives_math_d1",
        "primitives_code_d0",
        "primitives_code_d1",
    ]
    loaders = dm.val_dataloader()
    assert len(loaders) == 5
    tok = dm.tokenizer()
    for name, (flavour, depth) in zip(dm.eval_names[1:], [("math", 0), ("math", 1), ("code", 0), ("code", 1)]):
        task = ReasoningPrimitives(depth=depth, flavour=flavour, shots=2, val_size=8, test_size=8, seed=0)
        ids, labels = task.eval_set(1)
        data = dm.primitive_sets()[name]
        assert len(data) == 8
        for i in range(8):
            row = data[i]
            keep = row["labels"] != IGNORE
            answer = tok.decode(row["labels"][keep].tolist())
            assert answer == task.vocab[labels[i, -1]]  # the reference answer, and only it, is labelled
            prompt = tok.decode([t for t in row["input_ids"].tolist() if t != dm.eos_id])
            assert prompt == task.decode(ids[i]) + " "  # the rendered prompt, nothing cut at this seq_len
            # the label at the last labelled position is the token after it: the answer follows the prompt
            assert keep[-1] and not keep[: -len(tok.encode(answer))].any()


def test_missing_or_unprepared_path_names_the_fix(tmp_path):
    with pytest.raises(InputError, match="data.path: .*nowhere does not exist.*looped prepare pile"):
        PileDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="has no manifest.json, so `looped prepare pile` did not write it"):
        PileDataModule(str(tmp_path))
    with pytest.raises(InputError, match="data.path is empty"):
        PileDataModule("")
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"not a prepare manifest.*looped prepare pile"):
        PileDataModule(str(tmp_path))


class Recorder(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())


class ReadsSteppingBatches(LoopedLM):
    """Reads ``estimated_stepping_batches`` first, building the train loader before the restore (Lightning #20550)."""

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return super().configure_optimizers()


def _fit(data_dir, root, max_steps, ckpt_path=None):
    dm = PileDataModule(str(data_dir), seq_len=16, batch_size=2, num_workers=2, primitives_size=0, seed=3)
    torch.manual_seed(0)
    config = LoopedConfig(
        vocab_size=dm.vocab_size, max_seq_len=16, d_model=16, n_heads=2, d_ff=32, block_layers=1, loops=2
    )
    model = ReadsSteppingBatches(config, warmup_steps=1)
    recorder = Recorder()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[recorder, checkpoint],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return recorder.batches


@pytest.mark.slow
def test_resumed_fit_sees_exactly_the_batches_of_an_uninterrupted_one(data_dir, tmp_path):
    whole = _fit(data_dir, tmp_path / "whole", 8)
    assert len(whole) == 8
    first = _fit(data_dir, tmp_path / "cut", 4)
    assert all(torch.equal(a, b) for a, b in zip(first, whole[:4]))
    resumed = _fit(data_dir, tmp_path / "cut", 8, ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[4:]))
    # Control: a checkpoint without any loader position (neither this module's nor the copy Lightning
    # 2.6 keeps in its fit loop) restarts the stream, so the comparison above can fail.
    state = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=False)
    assert "train_loader" in state.pop("PileDataModule")  # our copy of the position
    state["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    torch.save(state, tmp_path / "cut" / "stripped.ckpt")
    restarted = _fit(data_dir, tmp_path / "cut", 8, ckpt_path=str(tmp_path / "cut" / "stripped.ckpt"))
    same = len(restarted) == 4 and all(torch.equal(a, b) for a, b in zip(restarted, whole[4:]))
    assert not same, "without a stored loader position the resumed run cannot continue the stream"
