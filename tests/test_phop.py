"""p-hop induction: the vectorised generator against a literal reading of the definition, and its data contract."""

import numpy as np
import pytest
import torch

from looped.datamodules import PHop
from looped.datamodules.base import IGNORE, rows_as_keys
from looped.datamodules.train_set import _TEST
from looped.errors import InputError
from streams import stream


def reference_answer(text: str, hops: int):
    """Slow and literal: 1-indexed v, find_1(v, i) = max({0} ∪ {j ≤ i : v[j-1] = v[i]})."""
    v = [None] + list(text)  # v[1..n]

    def find_1(i: int) -> int:
        return max([0] + [j for j in range(2, i + 1) if v[j - 1] == v[i]])

    pos = len(text)
    for _ in range(hops):
        pos = find_1(pos)
    return v[pos] if pos > 0 else None


@pytest.mark.parametrize("alphabet_size,length,hops", [(4, 32, 3), (4, 24, 1), (3, 40, 7), (6, 64, 16)])
def test_generator_matches_reference(alphabet_size, length, hops):
    task = PHop(alphabet_size=alphabet_size, length=length, hops=hops, batch_size=500)
    checked = 0
    for index in range(5):  # 2,500 samples per setting
        input_ids, labels = task.train_batch(rank=0, index=index)
        assert input_ids.shape == (500, length + 1) and labels.shape == input_ids.shape
        assert (labels[:, :-1] == IGNORE).all()
        for ids, label in zip(input_ids, labels):
            text = task.decode(ids)
            assert text.endswith("=")
            expected = reference_answer(text[:-1], hops)
            assert expected is not None, "the generator must keep only sequences whose chain exists"
            assert task.vocab[label[-1]] == expected
            checked += 1
    assert checked == 2500


def test_answers_are_not_trivial():
    task = PHop(length=32, hops=3, batch_size=2000)
    _, labels = task.train_batch(0, 0)
    counts = np.bincount(labels[:, -1], minlength=4)[:4] / 2000
    assert counts.min() > 0.15, f"answer letters should be roughly balanced, got {counts}"


def test_stream_is_the_same_for_any_worker_count_and_resumes_exactly():
    task = PHop(length=32, hops=3, batch_size=8)
    single = stream(task, workers=0, start=0, n=6)
    double = stream(task, workers=2, start=0, n=6)
    for a, b in zip(single, double):
        assert torch.equal(a, b)
    resumed = stream(task, workers=2, start=3, n=3)
    for a, b in zip(single[3:], resumed):
        assert torch.equal(a, b)
    # Batches within the stream differ from each other.
    assert len({tuple(b.flatten().tolist()) for b in single}) == 6


def test_ranks_and_seeds_draw_different_streams():
    task = PHop(length=32, hops=3, batch_size=8)
    assert not torch.equal(stream(task, workers=0, n=1, rank=0)[0], stream(task, workers=0, n=1, rank=1)[0])
    other = PHop(length=32, hops=3, batch_size=8, seed=1)
    assert not torch.equal(stream(task, workers=0, n=1)[0], stream(other, workers=0, n=1)[0])


def test_collisions_with_eval_are_redrawn():
    """In a tiny task space collisions are certain; the stream must still never hand out an eval sample."""
    task = PHop(alphabet_size=2, length=6, hops=1, batch_size=64, val_size=16, test_size=16)
    keys = task.eval_keys
    collided = 0
    for index in range(50):
        x, y = task.train_batch(0, index)
        assert not keys.intersection(rows_as_keys(x))
        # the redrawn rows still carry correct answers
        for ids, label in zip(x, y):
            assert task.vocab[label[-1]] == reference_answer(task.decode(ids)[:-1], 1)
        raw, _ = task.generate(task.rng(0, 0, index), 64)
        collided += len(keys.intersection(rows_as_keys(raw)))
    assert collided > 0, "the test needs a task small enough to collide"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"length": 8, "hops": 32}, "data.hops=32 is impossible"),
        ({"alphabet_size": 26, "length": 40, "hops": 30}, "data.hops: 30 hops are impossible in practice"),
        (
            {"alphabet_size": 26, "length": 40, "hops": 2, "eval_hops": [2, 30]},
            "data.eval_hops: 30 hops are impossible",
        ),
        ({"length": 16, "hops": 2, "eval_hops": [0]}, "data.eval_hops: every hop count must lie in 1..15"),
        ({"alphabet_size": 1}, "data.alphabet_size"),
        ({"hops": 0}, "data.hops"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PHop(**kwargs)


def test_eval_hops_are_named_sets_of_known_depth():
    task = PHop(length=24, hops=2, eval_hops=[1, 3, 5], val_size=40, test_size=40)
    assert task.eval_names == ["hops1", "hops3", "hops5"]
    task.setup("fit")
    for name, hops in zip(task.eval_names, (1, 3, 5)):
        input_ids, labels = task.eval_set(_TEST, name)
        assert len(input_ids) == 40
        for ids, label in zip(input_ids, labels):
            assert task.vocab[label[-1]] == reference_answer(task.decode(ids)[:-1], hops)


@pytest.mark.parametrize("supervise", ["last", "all"])
def test_mixed_hop_counts_say_their_depth_and_match_the_reference(supervise):
    """``train_hops``: each sample's p is drawn from the list and written in its query token ``=p``; its
    labels (the answer, and with ``supervise: all`` every position's) follow that p, as the slow reference."""
    task = PHop(length=20, hops=2, train_hops=[1, 2, 3], eval_hops=[1, 3], supervise=supervise, batch_size=300)
    assert task.vocab == ["a", "b", "c", "d", "=1", "=2", "=3"]
    input_ids, labels = task.train_batch(rank=0, index=0)
    seen = set()
    for ids, label in zip(input_ids.tolist(), labels.tolist()):
        text = "".join(task.vocab[i] for i in ids[:-1])
        hops = int(task.vocab[ids[-1]].removeprefix("="))
        seen.add(hops)
        assert task.vocab[label[-1]] == reference_answer(text, hops)
        if supervise == "all":  # position i-1 holds the p-hop answer from position i, where its chain exists
            for i in range(1, len(text) + 1):
                expected = reference_answer(text[:i], hops)
                assert (label[i - 1] == IGNORE) if expected is None else (task.vocab[label[i - 1]] == expected)
    assert seen == {1, 2, 3}
    task.setup("test")
    for name, hops in (("hops1", 1), ("hops3", 3)):
        batch = next(iter(task.test_dataloader()[task.eval_names.index(name)]))
        assert set(batch["input_ids"][:, -1].tolist()) == {task.query_token(hops)}
    with pytest.raises(InputError, match=r"data.train_hops: \[1, 2\] does not include the evaluated hop counts \[3\]"):
        PHop(length=20, hops=2, train_hops=[1, 2], eval_hops=[3])
