"""Scoring by generation: the greedy-decoded final answer, against a re-run-the-forward reference and a Python scan."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from conftest import tiny_module
from looped import LoopedConfig, LoopedLM
from looped.evaluation.generation import final_answer

VOCAB, T, P, PAD = 6, 12, 5, 0


def answer_of(row: list[int], eos_id: int):
    """The token before the first eos, scanning left to right; None without one (or with eos first)."""
    for i, token in enumerate(row):
        if token == eos_id:
            return row[i - 1] if i > 0 else None
    return None


def test_final_answer_matches_a_scan():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4, (200, 6), generator=g)
    got = final_answer(rows, eos_id=3).tolist()
    for row, value in zip(rows.tolist(), got):
        expected = answer_of(row, 3)
        assert value == (-1 if expected is None else expected)
    assert -1 in got and any(v >= 0 for v in got)


def greedy_reference(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens by re-running the full forward on the growing sequence (no cache)."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1] :]


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.batch.items()}


class GeneratedAnswers(L.LightningDataModule):
    """A task scored by generation: left-padded prompts of length P, gold continuation ending in eos_id."""

    vocab_size, seq_len = VOCAB, T

    def __init__(self, sets: dict[str, dict[str, torch.Tensor]], eos_id) -> None:
        super().__init__()
        self.sets, self.eos_id = sets, eos_id
        self.eval_names = list(sets)

    def decode(self, ids) -> str:
        return " ".join("<eos>" if i == self.eos_id else str(i) for i in ids)

    def train_dataloader(self):
        return DataLoader(Rows(next(iter(self.sets.values()))), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return [DataLoader(Rows(self.sets[name]), batch_size=4) for name in self.eval_names]


def make_task(model, n: int, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    """Prompts, the model's own greedy continuation as gold (up to eos, then PAD), and answers half of them right."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, VOCAB, (n, P), generator=g)
    prompt[::2, :2] = PAD  # left padding
    free = greedy_reference(model, prompt, T - P)
    eos_id = int(free[:, 1].mode().values)  # frequent at the second step: several rows end early
    input_ids = torch.cat([prompt, free], dim=1)
    labels = torch.full_like(input_ids, -100)
    answers = []
    for i, row in enumerate(free.tolist()):
        end = row.index(eos_id) if eos_id in row else len(row) - 1
        input_ids[i, P + end + 1 :] = PAD  # right padding after the gold eos
        labels[i, P - 1 : P + end] = input_ids[i, P : P + end + 1]
        value = answer_of(row, eos_id)
        answers.append(0 if value is None else (value if i % 2 == 0 else (value + 1) % VOCAB))
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_len": torch.full((n,), P),
        "answer": torch.tensor(answers),
    }
    return batch, eos_id


def expected_accuracy(model, batch, eos_id) -> float:
    continuation = greedy_reference(model, batch["input_ids"][:, :P], T - P)
    right = [answer_of(row, eos_id) == a for row, a in zip(continuation.tolist(), batch["answer"].tolist())]
    return sum(right) / len(right)


def make_module(eos_id) -> LoopedLM:
    return tiny_module(vocab_size=VOCAB, max_seq_len=T, loops=2, init_std=0.3, eos_id=eos_id).eval()


def test_answer_accuracy_per_set_matches_the_reference(tmp_path):
    module = make_module(eos_id=None)
    a, eos_id = make_task(module, 10, seed=1)
    module = make_module(eos_id)  # same weights (same seed), now scoring by generation
    b, _ = make_task(module, 7, seed=2)
    b_eos = b["input_ids"][:, P:] == eos_id
    data = GeneratedAnswers({"a": a, "b": b}, eos_id)
    expected = {name: expected_accuracy(module, batch, eos_id) for name, batch in data.sets.items()}
    assert 0 < expected["a"] < 1 and b_eos.any()  # a non-trivial mix of right, wrong and unanswered
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=data, verbose=False)
    logged = trainer.callback_metrics
    assert logged["val/answer_accuracy_a"].item() == pytest.approx(expected["a"])
    assert logged["val/answer_accuracy_b"].item() == pytest.approx(expected["b"])
    overall = (10 * expected["a"] + 7 * expected["b"]) / 17
    assert logged["val/answer_accuracy"].item() == pytest.approx(overall)
    assert "val/exact_match" in logged and "val/loss_b" in logged  # teacher-forced metrics are still there


def test_prompt_len_without_eos_id_names_the_fix(tmp_path):
    module = make_module(eos_id=None)
    batch, eos_id = make_task(module, 4, seed=3)
    data = GeneratedAnswers({"a": batch}, eos_id)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="eos_id is None.*model.init_args.eos_id"):
        trainer.validate(module, datamodule=data, verbose=False)


def test_fit_end_to_end_logs_answer_accuracy_and_samples(tmp_path):
    module = make_module(eos_id=None)
    batch, eos_id = make_task(module, 8, seed=4)
    module = make_module(eos_id).train()
    data = GeneratedAnswers({"a": batch}, eos_id)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    # The trained weights, scored again: the logged accuracy is the reference's.
    trainer.validate(module, datamodule=data, verbose=False)
    assert trainer.callback_metrics["val/answer_accuracy"].item() == pytest.approx(
        expected_accuracy(module.eval(), batch, eos_id)
    )
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"tensors": 0}).Reload()
    assert "val/answer_accuracy_a" in events.Tags()["scalars"]
    samples = [t for t in events.Tags()["tensors"] if t.startswith("val/samples")]
    assert samples, events.Tags()
    text = events.Tensors(samples[0])[0].tensor_proto.string_val[0].decode()
    assert "prompt:" in text and "<eos>" in text


def test_tasks_scored_at_labelled_positions_log_input_prediction_and_gold(tmp_path):
    """Every task, not only generated ones, puts a few validation samples with the model's answers in TensorBoard."""
    from looped.datamodules import PHop

    data = PHop(alphabet_size=4, length=12, hops=2, batch_size=8, val_size=16, test_size=16)
    config = LoopedConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=16, n_heads=2, d_ff=32)
    module = LoopedLM(config)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"tensors": 0}).Reload()
    text = events.Tensors("val/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = text.split("\n\n")
    inputs, labels = data.eval_set(1)
    module.eval()
    with torch.no_grad():
        preds = module(torch.from_numpy(inputs[:4])).argmax(-1)
    assert len(rows) == 4
    for row, ids, lab, pred in zip(rows, inputs, labels, preds):
        answer = lab != -100
        assert row == (
            f"input: `{data.decode(ids)}`  \npredicted: `{data.decode(pred[torch.from_numpy(answer)])}`  \n"
            f"gold: `{data.decode(lab[answer])}`"
        )
