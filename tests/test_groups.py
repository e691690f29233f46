"""Group composition: the vectorised generator against hand composition of the decoded text, and its data contract."""

import numpy as np
import pytest

from conftest import RECIPES
from looped.datamodules.base import IGNORE, rows_as_keys
from looped.datamodules.groups import GroupComposition

SETTINGS = [("symmetric", 5), ("symmetric", 3), ("cyclic", 7)]


def parse(text: str) -> list[str]:
    """``g_1 … g_n =`` -> the element tokens."""
    tokens = text.split(" ")
    assert tokens[-1] == "="
    return tokens[:-1]


def reference_product(elements: list[str], group: str, order: int) -> str:
    """Slow and literal: g_1·…·g_n as text.

    Permutations: (g_1·…·g_n)(x) = g_1(g_2(…g_n(x)…)), applying the rightmost first.
    Z_m: the sum mod m.
    """
    if group == "cyclic":
        return str(sum(int(g) for g in elements) % order)
    perms = [[int(c) for c in g] for g in elements]
    assert all(sorted(p) == list(range(order)) for p in perms)
    image = []
    for x in range(order):
        for p in reversed(perms):
            x = p[x]
        image.append(x)
    return "".join(str(x) for x in image)


@pytest.mark.parametrize("group, order", SETTINGS)
def test_generator_matches_reference(group, order):
    task = GroupComposition(group=group, order=order, length=16, batch_size=500)
    checked = 0
    for index in range(4):  # 2,000 samples per group
        input_ids, labels = task.train_batch(rank=0, index=index)
        assert input_ids.shape == (500, 17) and labels.shape == input_ids.shape
        assert (labels[:, :-1] == IGNORE).all()
        assert (input_ids[:, -1] == task.vocab.index("=")).all()
        for ids, label in zip(input_ids, labels):
            assert task.vocab[label[-1]] == reference_product(parse(task.decode(ids)), group, order)
            checked += 1
    assert checked == 2000


@pytest.mark.parametrize("group, order", [("symmetric", 5), ("cyclic", 7)])
def test_supervise_all_labels_every_prefix(group, order):
    task = GroupComposition(group=group, order=order, length=12, supervise="all", batch_size=150)
    last = GroupComposition(group=group, order=order, length=12, batch_size=150)
    for index in range(2):  # 300 samples
        input_ids, labels = task.train_batch(0, index)
        same_ids, last_labels = last.train_batch(0, index)
        np.testing.assert_array_equal(input_ids, same_ids)  # supervise changes labels, never inputs
        np.testing.assert_array_equal(labels[:, -1], last_labels[:, -1])
        for ids, row in zip(input_ids, labels):
            elements = parse(task.decode(ids))
            expected = [reference_product(elements[:i], group, order) for i in range(1, len(elements) + 1)]
            assert [task.vocab[i] for i in row[:-1]] == expected
            assert task.vocab[row[-1]] == expected[-1]
    # Evaluation scores the final product only.
    _, eval_labels = task.eval_set(1)
    assert (eval_labels[:, :-1] == IGNORE).all()


def test_composition_order_and_tokens():
    """(σ·τ)(i) = σ(τ(i)): τ is applied first."""
    task = GroupComposition(group="symmetric", order=3, length=8)
    assert task.vocab == ["012", "021", "102", "120", "201", "210", "="]
    sigma, tau = task.vocab.index("102"), task.vocab.index("021")  # swap 0↔1, swap 1↔2
    assert task._table[sigma, tau] == task.vocab.index("120")
    assert task._table[tau, sigma] == task.vocab.index("201")
    assert task.decode([sigma, tau, 6]) == "102 021 ="
    s5 = GroupComposition(order=5)
    assert s5.vocab_size == 121 and s5.vocab[0] == "01234" and s5.seq_len == 17
    z = GroupComposition(group="cyclic", order=7, length=8)
    assert z.vocab == [str(k) for k in range(7)] + ["="] and z.decode([3, 5, 7]) == "3 5 ="


def test_answers_are_uniform_over_s5():
    task = GroupComposition(order=5, length=16)
    _, labels = task.generate(np.random.default_rng(0), 12_000)
    counts = np.bincount(labels[:, -1], minlength=120)
    assert counts.size == 120  # never the `=` token
    # 100 expected per element, Poisson sd 10: every element within ±4.5 sd.
    assert counts.min() > 55 and counts.max() < 145, (counts.min(), counts.max())


def test_deterministic_given_seed_and_different_across_ranks_and_seeds():
    a, b = GroupComposition(batch_size=32, seed=3), GroupComposition(batch_size=32, seed=3)
    np.testing.assert_array_equal(a.train_batch(0, 5)[0], b.train_batch(0, 5)[0])
    np.testing.assert_array_equal(a.eval_set(2)[0], b.eval_set(2)[0])
    assert not np.array_equal(a.train_batch(0, 5)[0], a.train_batch(1, 5)[0])
    assert not np.array_equal(a.train_batch(0, 5)[0], a.train_batch(0, 6)[0])
    other = GroupComposition(batch_size=32, seed=4)
    assert not np.array_equal(a.train_batch(0, 5)[0], other.train_batch(0, 5)[0])


def test_recipes_exist():
    assert len(list((RECIPES / "groups").glob("*.yaml"))) >= 3


def test_collisions_with_eval_are_redrawn():
    """Z_2 with 12 elements has 4,096 sequences: collisions are certain, and redrawn rows keep correct answers."""
    task = GroupComposition(group="cyclic", order=2, length=12, batch_size=64, val_size=64, test_size=64)
    keys = task.eval_keys
    collided = 0
    for index in range(40):
        x, y = task.train_batch(0, index)
        assert not keys.intersection(rows_as_keys(x))
        for ids, label in zip(x, y):
            assert task.vocab[label[-1]] == reference_product(parse(task.decode(ids)), "cyclic", 2)
        raw, _ = task.generate(task.rng(0, 0, index), 64)
        collided += len(keys.intersection(rows_as_keys(raw)))
    assert collided > 0, "the test needs a task small enough to collide"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": 7}, r"data.order .*S7 has 5040 elements"),
        ({"order": 1}, "data.order must lie in 2..6"),
        ({"group": "cyclic", "order": 101}, "data.order must lie in 2..100"),
        ({"group": "cyclic", "order": 1}, "data.order"),
        ({"group": "dihedral"}, "data.group"),
        ({"length": 1}, "data.length"),
        ({"group": "cyclic", "order": 2, "length": 8}, "data.length=8 gives only 256"),
        ({"supervise": "some"}, "data.supervise"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupComposition(**kwargs)
