"""n-ary addition: the vectorised generator against Python-int sums of the decoded text, and its data contract."""

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import RECIPES
from looped.datamodules.addition import NaryAddition
from looped.datamodules.base import IGNORE, rows_as_keys
from streams import stream


def solve(text: str, digits: int) -> tuple[list[int], int]:
    """Slow and literal: ``a+b+…=`` (the decoded input, maybe followed by answer digits) -> operands and their sum."""
    problem, equals, _ = text.partition("=")
    assert equals == "=", text
    terms = problem.split("+")
    assert all(re.fullmatch(rf"[0-9]{{{digits}}}", t) for t in terms), text  # zero-padded, fixed width
    operands = [int(t) for t in terms]
    return operands, sum(operands)


def check_sample(task: NaryAddition, ids: np.ndarray, labels: np.ndarray) -> int:
    """Assert one sample is right; return its operand count."""
    text = task.decode(ids)
    operands, total = solve(text, task.digits)
    answer = task.decode(labels)
    assert answer == str(total).zfill(task.answer_digits), (text, answer)
    # The input ends in the answer minus its last digit (teacher forcing); labels only on the answer.
    assert text.endswith("=" + answer[:-1])
    assert (labels[: -task.answer_digits] == IGNORE).all() and (labels[-task.answer_digits :] != IGNORE).all()
    # Padding only on the left, and nothing but padding there.
    pad = task.vocab.index("_")
    body = ids[ids != pad]
    assert (ids[: len(ids) - len(body)] == pad).all()
    return len(operands)


def test_paper_format_and_vocabulary():
    task = NaryAddition()
    assert task.vocab == list("0123456789") + ["+", "=", "_"]
    assert task.answer_digits == 5  # 32 * 999 = 31968
    assert task.seq_len == 32 * 4 + 5 - 1
    assert task.eval_names == ["n8", "n16", "n24", "n32"]
    text = "315+120+045+824=0130"
    ids = np.array([task.vocab.index(c) for c in "_" * (task.seq_len - len(text)) + text])
    assert task.decode(ids) == text
    assert "+ = _" in task.describe() and "answer: 5 digits" in task.describe()


@pytest.mark.parametrize("digits, train, evals", [(3, [2, 4, 8, 16, 32], [8, 16, 24, 32]), (2, [2, 5], [3])])
def test_training_mix_matches_reference(digits, train, evals):
    task = NaryAddition(digits=digits, train_operands=train, eval_operands=evals, batch_size=500)
    counts = {n: 0 for n in train}
    for index in range(2000 * len(train) // 500):  # >= 2,000 samples per n on average
        input_ids, labels = task.train_batch(rank=0, index=index)
        assert input_ids.shape == labels.shape == (500, task.seq_len)
        for ids, y in zip(input_ids, labels):
            counts[check_sample(task, ids, y)] += 1
    total = sum(counts.values())
    # Uniform mix: each n within 5 standard deviations of total / len(train).
    p = 1 / len(train)
    assert all(abs(c - total * p) < 5 * (total * p * (1 - p)) ** 0.5 for c in counts.values()), counts


def test_eval_sets_match_reference_and_have_one_n_each():
    task = NaryAddition(val_size=2000, test_size=500)
    for purpose, size in ((1, 2000), (2, 500)):
        for name, n in zip(task.eval_names, task.eval_operands):
            input_ids, labels = task.eval_set(purpose, name)
            assert input_ids.shape == (size, task.seq_len)
            assert {check_sample(task, ids, y) for ids, y in zip(input_ids, labels)} == {n}


def test_loaders_are_one_per_named_set_in_order():
    task = NaryAddition(train_operands=[2, 4, 8], eval_operands=[4, 8], val_size=64, test_size=32, eval_batch_size=16)
    task.setup("fit")
    for loaders, size in ((task.val_dataloader(), 64), (task.test_dataloader(), 32)):
        assert isinstance(loaders, list) and len(loaders) == 2
        for loader, n in zip(loaders, [4, 8]):
            batches = list(loader)
            assert sum(len(b["input_ids"]) for b in batches) == size
            assert all(len(task.decode(ids).split("=")[0].split("+")) == n for b in batches for ids in b["input_ids"])
    single = NaryAddition(train_operands=[2, 4], eval_operands=[], val_size=16, test_size=16)
    assert isinstance(single.val_dataloader(), DataLoader)  # no names: today's single set


def test_named_sets_do_not_depend_on_the_other_names():
    """A set is seeded by its name: adding n=24 leaves n=8's set as it was (up to cross-set collisions)."""
    a = NaryAddition(eval_operands=[8, 32], val_size=256, test_size=256)
    b = NaryAddition(eval_operands=[8, 24, 32], val_size=256, test_size=256)
    np.testing.assert_array_equal(a.eval_set(1, "n8")[0], b.eval_set(1, "n8")[0])
    np.testing.assert_array_equal(a.eval_set(2, "n32")[0], b.eval_set(2, "n32")[0])


def test_collisions_with_every_named_set_are_redrawn():
    """n=2 with 1-digit operands has only 100 problems: training must avoid the ones in any eval set."""
    task = NaryAddition(digits=1, train_operands=[2], eval_operands=[2, 3], val_size=20, test_size=20, batch_size=256)
    eval_keys = set()
    for purpose in (1, 2):
        for name in task.eval_names:
            keys = rows_as_keys(task.eval_set(purpose, name)[0])
            assert not eval_keys & set(keys)
            eval_keys |= set(keys)
    assert len(eval_keys) == 80
    seen = set()
    for index in range(20):
        keys = rows_as_keys(task.train_batch(0, index)[0])
        assert not eval_keys & set(keys)
        seen |= set(keys)
    assert len(seen) == 100 - 20 - 20  # every other n=2 problem is still trained on


def test_deterministic_and_different_across_ranks_workers_and_seeds():
    task = NaryAddition(batch_size=32, val_size=16, test_size=16)
    again = NaryAddition(batch_size=32, val_size=16, test_size=16)
    first, second = task.train_batch(0, 0), again.train_batch(0, 0)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(task.eval_set(2, "n16")[0], again.eval_set(2, "n16")[0])
    assert not np.array_equal(task.train_batch(0, 0)[0], task.train_batch(1, 0)[0])  # ranks
    other_seed = NaryAddition(batch_size=32, val_size=16, test_size=16, seed=1)
    assert not np.array_equal(first[0], other_seed.train_batch(0, 0)[0])
    # Two workers interleave to the same stream as one process, and never repeat a batch.
    single, double = stream(task, workers=0, n=4), stream(task, workers=2, n=4)
    assert all(torch.equal(a, b) for a, b in zip(single, double))
    assert len({rows_as_keys(b.numpy())[0] for b in double}) == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"train_operands": [1, 4]}, "data.train_operands"),
        ({"eval_operands": [8, 1]}, "data.eval_operands"),
        ({"train_operands": []}, "data.train_operands"),
        ({"eval_operands": [8, 8]}, "data.eval_operands"),
        ({"digits": 0}, "data.digits"),
        ({"pad_to": 100}, "data.pad_to"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NaryAddition(**kwargs)


def test_unknown_eval_set_names_the_choices():
    task = NaryAddition(val_size=8, test_size=8)
    with pytest.raises(KeyError, match="n8"):
        task.eval_set(1, "n12")
    with pytest.raises(KeyError, match="eval_operands"):
        task.generate_eval("n12", np.random.default_rng(0), 4)


def test_pad_to_only_adds_left_padding():
    short, long = NaryAddition(val_size=8, test_size=8), NaryAddition(pad_to=200, val_size=8, test_size=8)
    x, y = short.train_batch(0, 0)
    lx, ly = long.train_batch(0, 0)
    assert lx.shape[1] == 200
    np.testing.assert_array_equal(lx[:, -x.shape[1] :], x)
    np.testing.assert_array_equal(ly[:, -y.shape[1] :], y)


@pytest.mark.slow
def test_recipe_trains_and_validates_over_every_set(run_dir):
    """fast_dev_run of a CPU recipe through LoopedLM, with one loader per set; val/exact_match pools all sets."""
    from lightning import Trainer

    from looped.cli import LoopedCLI

    cli = LoopedCLI(
        args=[
            "--config",
            str(RECIPES / "addition" / "cpu_1x4.yaml"),
            "--trainer.fast_dev_run",
            "2",
            "--data.val_size",
            "48",
            "--data.eval_batch_size",
            "32",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(cli.trainer.val_dataloaders) == len(cli.datamodule.eval_names) == 2
    task = cli.datamodule

    def oracle(input_ids, **_):
        """Right on every problem of the first set (solved from the text), one digit off on the second."""
        logits = torch.zeros(*input_ids.shape, task.vocab_size)
        for row, ids in enumerate(input_ids):
            operands, total = solve(task.decode(ids), task.digits)
            answer = [int(c) for c in str(total).zfill(task.answer_digits)]
            answer[0] = answer[0] if len(operands) == task.eval_operands[0] else (answer[0] + 1) % 10
            logits[row, -task.answer_digits :][range(task.answer_digits), answer] = 1.0
        return logits

    cli.model.forward = oracle
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[])
    metrics = trainer.validate(cli.model, datamodule=task, verbose=False)[0]
    assert metrics["val/exact_match"] == pytest.approx(0.5)  # 48 of the 96 samples, both sets counted
