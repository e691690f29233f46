"""Named evaluation sets: per-set and overall metrics logged by LoopedLM and PerLoopAccuracy, against a hand count."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from conftest import tiny_module
from looped import LoopedLM
from looped.callbacks import PerLoopAccuracy

VOCAB, T, LOOPS = 7, 10, 2


class Rows(torch.utils.data.Dataset):
    """A dict of equal-length tensors, one sample per row (default_collate stacks them back)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.batch.items()}


class TwoSets(L.LightningDataModule):
    """Two named evaluation sets; ``eval_names`` orders the loaders (``looped.contract.DataModuleContract``)."""

    vocab_size, seq_len, eos_id = VOCAB, T, None

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)

    def __init__(self, sets: dict[str, dict[str, torch.Tensor]], batch_size: int = 4) -> None:
        super().__init__()
        self.sets, self.batch_size = sets, batch_size
        self.eval_names = list(sets)

    def loaders(self) -> list[DataLoader]:
        return [DataLoader(Rows(self.sets[name]), batch_size=self.batch_size) for name in self.eval_names]

    val_dataloader = test_dataloader = loaders


def make_module() -> LoopedLM:
    return tiny_module(vocab_size=VOCAB, max_seq_len=T, loops=LOOPS, init_std=0.3).eval()


def labelled_set(module: LoopedLM, n: int, right_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """Labels copy the model's own prediction on ``right_fraction`` of the samples: a set of known difficulty."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (n, T), generator=g)
    with torch.no_grad():
        preds = module(input_ids).argmax(-1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = (preds[:, -2:] + 1) % VOCAB  # wrong
    right = torch.arange(n) < round(right_fraction * n)
    labels[right, -2:] = preds[right, -2:]
    labels[1::3, -1] = preds[1::3, -1]  # some half-right samples: token accuracy differs from exact match
    return {"input_ids": input_ids, "labels": labels}


def hand_metrics(module: LoopedLM, rows: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    input_ids = torch.cat([r["input_ids"] for r in rows])
    labels = torch.cat([r["labels"] for r in rows])
    with torch.no_grad():
        logits = module(input_ids)
    mask = labels != -100
    right = logits.argmax(-1) == labels
    loss = F.cross_entropy(logits[mask], labels[mask]).item()  # token mean over the whole set
    return {
        "exact_match": (right | ~mask).all(dim=1).float().mean().item(),
        "token_accuracy": right[mask].float().mean().item(),
        "loss": loss,
        "perplexity": math.exp(loss),
    }


def test_per_set_and_overall_metrics_match_a_hand_count(tmp_path):
    module = make_module()
    sets = {"easy": labelled_set(module, 10, 0.8, seed=1), "hard": labelled_set(module, 7, 0.3, seed=2)}
    data = TwoSets(sets)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PerLoopAccuracy(max_eval_loops=3)],
        default_root_dir=tmp_path,
    )
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        run(module, datamodule=data, verbose=False)
        logged = dict(trainer.callback_metrics)
        expected = {"": hand_metrics(module, list(sets.values()))}
        expected.update({f"_{name}": hand_metrics(module, [rows]) for name, rows in sets.items()})
        assert expected["_easy"]["exact_match"] > expected["_hard"]["exact_match"]  # the sets differ
        for suffix, values in expected.items():
            for metric, value in values.items():
                assert logged[f"{stage}/{metric}{suffix}"].item() == pytest.approx(value, rel=1e-5), (
                    stage,
                    metric,
                    suffix,
                )
        # Per-loop exact match, overall and per set, against separate forwards with n loops.
        for n in (1, 2, 3):
            for suffix, rows in [("", list(sets.values())), *((f"_{k}", [v]) for k, v in sets.items())]:
                ids, labels = torch.cat([r["input_ids"] for r in rows]), torch.cat([r["labels"] for r in rows])
                with torch.no_grad():
                    right = (module(ids, loops=n).argmax(-1) == labels) | (labels == -100)
                assert logged[f"{stage}/exact_match_loop{n}{suffix}"].item() == pytest.approx(
                    right.all(dim=1).float().mean().item()
                )
        assert not any("dataloader_idx" in key for key in logged)


def test_without_names_the_log_keys_are_unchanged(tmp_path):
    module = make_module()
    rows = labelled_set(module, 6, 0.5, seed=3)

    class One(TwoSets):
        eval_names = []  # one unnamed set

        def __init__(self):
            L.LightningDataModule.__init__(self)

        def val_dataloader(self):
            return DataLoader(Rows(rows), batch_size=4)

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=One(), verbose=False)
    assert set(trainer.callback_metrics) == {
        f"val/{m}" for m in ("exact_match", "token_accuracy", "loss", "perplexity")
    }


def test_bad_eval_names_are_named():
    module = make_module()
    with pytest.raises(ValueError, match="data.eval_names"):
        module.set_eval_names(["a", "a"])


def test_a_data_module_missing_part_of_the_contract_is_named(run_dir):
    class Bare(L.LightningDataModule):
        vocab_size, seq_len = VOCAB, T

    module = make_module()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(TypeError, match="Bare lacks eval_names, eos_id, decode of looped.contract.DataModuleContract"):
        trainer.validate(module, datamodule=Bare())
