"""i-GSM: the vectorised generator against a parser and recursive evaluator of its own decoded text."""

from collections import Counter

import numpy as np
import pytest

from looped.datamodules import IGSM
from looped.datamodules.base import IGNORE, rows_as_keys
from looped.datamodules.train_set import _TEST
from streams import stream

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse(text: str) -> tuple[list[tuple[str, list[str]]], str]:
    """``E#I = 4 ; F#K = E#J * E#I ; ? F#K =`` → ([(name, right-hand side words)], query name)."""
    *equations, query = text.split(" ; ")
    assert query.startswith("? ") and query.endswith(" =")
    out = []
    for equation in equations:
        name, eq, *rhs = equation.split(" ")
        assert eq == "="
        out.append((name, rhs))
    return out, query[2:-2]


def reference(text: str, modulus: int = 7) -> tuple[int, int, dict[str, int], list[str]]:
    """Evaluate the query by plain recursion with Python ints: (answer, query depth, all depths, names in order)."""
    equations, query = parse(text)
    defs = dict(equations)
    assert len(defs) == len(equations), "every parameter is defined once"

    def value(name: str) -> int:
        rhs = defs[name]
        if len(rhs) == 1:
            return int(rhs[0])
        x, op, y = rhs
        return OPS[op](value(x), value(y)) % modulus

    def depth(name: str) -> int:
        rhs = defs[name]
        return 0 if len(rhs) == 1 else 1 + max(depth(rhs[0]), depth(rhs[2]))

    depths = {name: depth(name) for name in defs}
    return value(query), depths[query], depths, [name for name, _ in equations]


def is_topological(text: str) -> bool:
    seen = set()
    for name, rhs in parse(text)[0]:
        if len(rhs) == 3 and not {rhs[0], rhs[2]} <= seen:
            return False
        seen.add(name)
    return True


SETTINGS = [
    dict(num_operations=4, num_edges=8),
    dict(num_operations=4, num_edges=12),
    dict(num_operations=8, num_edges=20),
    dict(num_operations=2, num_edges=6, layers=3, entities_per_layer=2, modulus=5, pad_to=48),
    dict(num_operations=3, num_edges=4, layers=2, entities_per_layer=2, shuffle=False),  # the CPU recipes
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_generator_matches_reference(setting):
    task = IGSM(batch_size=1000, **setting)
    modulus, ops = task.modulus, task.num_operations
    query_depths, topological = Counter(), 0
    for index in range(2):  # 2,000 samples per setting
        input_ids, labels = task.train_batch(rank=0, index=index)
        assert input_ids.shape == labels.shape == (1000, task.seq_len)
        assert (labels[:, :-1] == IGNORE).all()
        for ids, label in zip(input_ids, labels):
            text = task.decode(ids)
            answer, depth, depths, names = reference(text, modulus)
            assert task.vocab[label[-1]] == str(answer)
            assert len(names) == task.num_edges and sum(d > 0 for d in depths.values()) == ops
            assert depth == max(depths.values()), "the query is a deepest parameter"
            for name in names:  # every parameter is an edge between consecutive layers
                u, v = (task.entities.index(c) // task.entities_per_layer for c in name.split("#"))
                assert v == u + 1
            query_depths[depth] += 1
            topological += is_topological(text)
    assert set(query_depths) <= set(range(1, ops + 1)) and len(query_depths) >= 2
    if task.shuffle:  # a random order of e equations is topological only by chance
        assert topological < 0.2 * 2000
    else:  # every operand is defined further left
        assert topological == 2000


def test_query_depth_distribution():
    """The default (Table 2) setting: the deepest node's depth spreads over 3..ops, none shallower than 2."""
    task = IGSM(batch_size=2000)
    input_ids, _ = task.train_batch(0, 0)
    depths = np.array([reference(task.decode(ids))[1] for ids in input_ids])
    counts = np.bincount(depths, minlength=task.num_operations + 1) / len(depths)
    assert counts[:2].sum() == 0 and counts[2] < 0.05, counts
    assert 3.5 < depths.mean() < 6.5 and counts.max() < 0.5 and (counts >= 0.05).sum() >= 4, counts
    assert depths.max() <= task.num_operations


def test_answers_cover_every_value():
    task = IGSM(num_operations=4, num_edges=12, batch_size=4000)
    _, labels = task.train_batch(0, 0)
    freq = np.bincount(labels[:, -1] - task.vocab.index("0"), minlength=7) / 4000
    # 0 absorbs products, so it is the majority answer (~22%); the rest near 1/7.
    assert freq.argmax() == 0 and freq[0] < 0.3 and (freq[1:] > 0.1).all(), freq


@pytest.mark.parametrize("shuffle", [True, False])
def test_dense_labels_against_reference(shuffle):
    """``supervise: all``, word by word: every value that the text to its left determines is labelled.

    A ';' carries its parameter's value iff the parameter's whole closure is defined at or
    before that equation; a read of an operand (the second token of its name) carries the
    operand's value iff the operand's closure is defined in earlier equations.
    """
    task = IGSM(num_operations=6, num_edges=14, supervise="all", shuffle=shuffle, batch_size=500)
    input_ids, labels = task.train_batch(0, 0)
    ends_labelled = reads_labelled = 0
    for ids, row in zip(input_ids, labels):
        text = task.decode(ids)
        equations, query = parse(text)
        defs, position = dict(equations), {name: i for i, (name, _) in enumerate(equations)}
        expect = {len(ids) - 1: reference(text)[0]}  # token position -> value; the answer at '='

        def closure(name, defs=defs):
            rhs = defs[name]
            return {name} if len(rhs) == 1 else {name} | closure(rhs[0]) | closure(rhs[2])

        def value(name, text=text):
            return reference(text.rsplit(" ; ", 1)[0] + f" ; ? {name} =", task.modulus)[0]  # ask for it

        at = 0  # token position of the equation's first token, walking the words
        for i, (name, rhs) in enumerate(equations):
            end = at + 2 * len(rhs) + 2  # its ';': a constant has 5 tokens, a derived equation 9
            known_by = {n: max(position[m] for m in closure(n)) for n in [name, *rhs[::2]] if n in defs}
            if known_by[name] == i:
                expect[end] = value(name)
                ends_labelled += 1
            if len(rhs) == 3:
                for operand, read in ((rhs[0], at + 4), (rhs[2], at + 7)):
                    if known_by[operand] < i:
                        expect[read] = value(operand)
                        reads_labelled += 1
            at = end + 1
        for t in range(len(ids)):
            assert task.vocab[row[t]] == str(expect[t]) if t in expect else row[t] == IGNORE, (text, t)
    assert ends_labelled > 500 * 3 and reads_labelled > 500 * 3
    if not shuffle:  # in topological order every value is known where it is written
        assert ends_labelled == 500 * 14 and reads_labelled == 500 * 6 * 2


def test_deterministic_and_rank_dependent():
    a, b = IGSM(batch_size=64, seed=3), IGSM(batch_size=64, seed=3)
    assert np.array_equal(a.train_batch(0, 7)[0], b.train_batch(0, 7)[0])
    assert np.array_equal(a.eval_set(1)[0], b.eval_set(1)[0])
    assert not np.array_equal(a.train_batch(0, 7)[0], a.train_batch(1, 7)[0])  # ranks differ
    assert not np.array_equal(a.train_batch(0, 7)[0], a.train_batch(0, 8)[0])  # batches differ
    assert not np.array_equal(a.train_batch(0, 7)[0], IGSM(batch_size=64, seed=4).train_batch(0, 7)[0])
    val, test = a.eval_set(1)[0], a.eval_set(2)[0]
    assert not set(rows_as_keys(val)) & set(rows_as_keys(test))


def test_workers_split_the_stream():
    task = IGSM(batch_size=16)
    batches = stream(task, workers=2, n=4, start=5)
    for offset, batch in enumerate(batches):  # two workers, interleaved: exactly batches 5, 6, 7, 8
        assert np.array_equal(batch.numpy(), task.train_batch(0, 5 + offset)[0])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_operations=12, num_edges=12), "data.num_operations"),
        (dict(num_operations=0), "data.num_operations"),
        (dict(num_edges=49, num_operations=4), "data.num_edges"),
        (dict(num_edges=1, num_operations=1), "data.num_edges"),
        (dict(layers=1), "data.layers"),
        (dict(layers=4, entities_per_layer=7), "data.layers * data.entities_per_layer"),
        (dict(pad_to=50), "data.pad_to"),
        (dict(modulus=1), "data.modulus"),
        (dict(supervise="dense"), "data.supervise"),
    ],
)
def test_invalid_parameters_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("*", r"\*")):
        IGSM(**kwargs)


def test_vocab_and_text():
    task = IGSM(num_operations=2, num_edges=4, batch_size=4)
    assert "4 equations (2 operations in {+, -, *} mod 7)" in task.describe()
    assert "IGSM: vocab (30) = <pad> A B C D E F G H I J K L M N O P 0 1 2 3 4 5 6 = + - * ; ?" in task.describe()
    text = task.decode(task.train_batch(0, 0)[0][0])
    assert text.count(" ; ") == 4 and text.endswith(" =") and "?" in text
    assert task.seq_len == 2 * 5 + 2 * 9 + 4


def test_documented_example():
    """The example in the module docstring and the README evaluates to what they say."""
    assert reference("E#I = 4 ; F#K = E#J * E#I ; E#J = E#I + E#I ; B#F = 3 ; ? F#K =")[:2] == (4, 2)


def test_eval_depths_are_named_sets_of_known_query_depth():
    """``eval_depths``: set ``depth<d>`` holds problems whose query the reference evaluator finds d
    operations deep, with the reference's answer; training keeps the natural mix of depths."""
    task = IGSM(num_operations=4, num_edges=6, layers=3, entities_per_layer=2, shuffle=False,
                eval_depths=[2, 3, 4], val_size=30, test_size=30)  # fmt: skip
    assert task.eval_names == ["depth2", "depth3", "depth4"]
    task.setup("fit")
    for name, want in zip(task.eval_names, (2, 3, 4)):
        input_ids, labels = task.eval_set(_TEST, name)
        assert len(input_ids) == 30
        for ids, label in zip(input_ids, labels):
            answer, depth, _, _ = reference(task.decode(ids))
            assert depth == want and task.vocab[label[-1]] == str(answer)
    train_depths = {reference(task.decode(ids))[1] for ids in task.train_batch(0, 0)[0]}
    assert train_depths >= {2, 3, 4}


def test_eval_depth_that_never_occurs_is_refused_with_the_ones_that_do():
    # 4 equations, 3 of them derived: the query (the deepest) is always 2 or 3 operations deep.
    with pytest.raises(ValueError, match=r"data.eval_depths: no query .* is 1 operations deep.*2 \(\d+%\), 3"):
        IGSM(num_operations=3, num_edges=4, layers=2, entities_per_layer=2, shuffle=False, eval_depths=[1, 3])
