"""Reasoning primitives: the vectorised generator against a parser of its own decoded text, and its data contract."""

import numpy as np
import pytest

from looped.datamodules.base import IGNORE, rows_as_keys
from looped.datamodules.primitives import ReasoningPrimitives


def resolve(env: dict, name: str) -> tuple[str, int]:
    """Follow assignments until a value: (the value, how many variable-to-variable hops)."""
    hops, value = 0, env[name]
    while value in env:
        value, hops = env[value], hops + 1
    return value, hops


def reference_math(text: str) -> list[tuple[str, int, str]]:
    """``a=1, c=a, c=? 1; …; b=?`` → per example (resolved answer, hops, written answer or None)."""
    out = []
    for example in text.split("; "):
        *statements, query = example.split(", ")
        env = {}
        for statement in statements:
            name, value = statement.split("=")
            assert name not in env, "every variable is assigned once"
            env[name] = value
        name, rest = query.split("=")
        assert rest.startswith("?")
        written = rest[1:].strip() or None
        out.append((*resolve(env, name), written))
    return out


def reference_code(text: str) -> list[tuple[str, int, str]]:
    """Run each line as Python, the final ``print ( x )`` turned into ``__answer__ = ( x )``."""
    out = []
    for line in text.split("\n"):
        program, _, written = line.partition(")")  # the query is the only ``)``
        assert program.count("print (") == 1 and program.split(" ; ")[-1].startswith("print (")
        env = {}
        exec(program.replace("print (", "__answer__ = (") + ")", {"__builtins__": {}}, env)
        query = program.split("print (")[1].strip()
        statements = dict(s.split(" = ") for s in program.split(" ; ")[:-1])
        assert str(env["__answer__"]) == resolve(statements, query)[0]
        out.append((str(env["__answer__"]), resolve(statements, query)[1], written.strip() or None))
    return out


SETTINGS = [(depth, flavour) for depth in (0, 1) for flavour in ("math", "code")]


@pytest.mark.parametrize("shots", [0, 5])
@pytest.mark.parametrize("depth, flavour", SETTINGS)
def test_generator_matches_reference(depth, flavour, shots):
    task = ReasoningPrimitives(depth=depth, flavour=flavour, num_variables=4, shots=shots, batch_size=1000)
    reference = reference_math if flavour == "math" else reference_code
    checked = 0
    for index in range(2):  # 2,000 samples per setting
        input_ids, labels = task.train_batch(rank=0, index=index)
        assert input_ids.shape == labels.shape == (1000, task.seq_len)
        assert (labels[:, :-1] == IGNORE).all() and (labels[:, -1] != IGNORE).all()
        for ids, label in zip(input_ids, labels):
            examples = reference(task.decode(ids))
            assert len(examples) == shots + 1
            for answer, hops, written in examples[:-1]:
                assert written == answer and hops == depth
            answer, hops, written = examples[-1]
            assert written is None and hops == depth  # depth 1 always queries a variable-to-variable one
            assert task.vocab[label[-1]] == answer
            checked += 1
    assert checked == 2000


def test_text_forms():
    math = ReasoningPrimitives(depth=1, flavour="math", num_variables=2, batch_size=4)
    text = math.decode(math.train_batch(0, 0)[0][0])
    assert len(text.split(", ")) == 5 and text.endswith("=?") and " " not in text.replace(", ", "")
    code = ReasoningPrimitives(depth=1, flavour="code", num_variables=2, shots=1, batch_size=4)
    first, second = code.decode(code.train_batch(0, 0)[0][0]).split("\n")
    assert first.split(" ; ")[-1].startswith("print ( ") and not first.endswith(")")  # solved: ends with its answer
    assert second.endswith(")") and len(second.split(" ; ")) == 5


def test_chain_is_shuffled_and_answers_balanced():
    task = ReasoningPrimitives(depth=1, num_variables=4, batch_size=2000)
    x, y = task.train_batch(0, 0)
    adjacent, query_positions = 0, set()
    for ids in x[:500]:
        *statements, query = task.decode(ids).split(", ")
        names = [s.split("=")[0] for s in statements]
        q = names.index(query.split("=")[0])
        source = names.index(statements[q].split("=")[1])
        adjacent += source == q - 1
        query_positions.add(q)
    assert adjacent < 250 and len(query_positions) >= 5
    counts = np.bincount(y[:, -1] - task.vocab.index("0"), minlength=10)[:10] / 2000
    assert counts.min() > 0.06


def test_left_padding_keeps_the_answer_last():
    plain = ReasoningPrimitives(depth=0, num_variables=3, batch_size=16)
    padded = ReasoningPrimitives(depth=0, num_variables=3, batch_size=16, pad_to=plain.seq_len + 7)
    x, y = plain.train_batch(0, 0)
    px, py = padded.train_batch(0, 0)
    assert padded.seq_len == plain.seq_len + 7
    assert (px[:, :7] == padded.vocab.index("<pad>")).all() and (py[:, :8] == IGNORE).all()
    assert np.array_equal(px[:, 7:], x) and np.array_equal(py[:, -1], y[:, -1])
    assert padded.decode(px[0]) == plain.decode(x[0])


def test_determinism_ranks_and_seeds():
    a = ReasoningPrimitives(shots=2, batch_size=32)
    b = ReasoningPrimitives(shots=2, batch_size=32)
    assert np.array_equal(a.train_batch(0, 3)[0], b.train_batch(0, 3)[0])
    assert np.array_equal(a.eval_set(1)[0], b.eval_set(1)[0])
    assert not np.array_equal(a.train_batch(0, 3)[0], a.train_batch(1, 3)[0])
    assert not np.array_equal(a.train_batch(0, 3)[0], a.train_batch(0, 4)[0])
    other = ReasoningPrimitives(shots=2, batch_size=32, seed=1)
    assert not np.array_equal(a.train_batch(0, 3)[0], other.train_batch(0, 3)[0])


@pytest.mark.parametrize("depth, flavour", SETTINGS)
def test_no_training_sample_is_evaluated(depth, flavour):
    task = ReasoningPrimitives(depth=depth, flavour=flavour, num_variables=2, num_values=3, batch_size=256)
    val, test = rows_as_keys(task.eval_set(1)[0]), rows_as_keys(task.eval_set(2)[0])
    assert len(set(val)) == task.val_size and len(set(test)) == task.test_size
    assert not set(val) & set(test)
    for index in range(40):
        for rank in (0, 1):
            x, _ = task.train_batch(rank=rank, index=index)
            assert not (set(val) | set(test)).intersection(rows_as_keys(x))


def test_collisions_with_eval_are_redrawn():
    """A tiny space (depth 0, one variable, two values: 52 samples) makes collisions certain."""
    task = ReasoningPrimitives(depth=0, num_variables=1, num_values=2, batch_size=64, val_size=8, test_size=8)
    keys = task.eval_keys
    collided = 0
    for index in range(10):
        x, y = task.train_batch(0, index)
        assert not keys.intersection(rows_as_keys(x))
        for ids, label in zip(x, y):
            assert task.vocab[label[-1]] == reference_math(task.decode(ids))[-1][0]
        collided += len(keys.intersection(rows_as_keys(task.generate(task.rng(0, 0, index), 64)[0])))
    assert collided > 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"depth": 2}, "data.depth"),
        ({"flavour": "latex"}, "data.flavour"),
        ({"num_values": 1}, "data.num_values"),
        ({"num_variables": 0}, "data.num_variables"),
        ({"depth": 1, "num_variables": 14}, "data.num_variables=14 needs 28"),
        ({"depth": 0, "num_variables": 27}, "data.num_variables=27"),
        ({"shots": -1}, "data.shots"),
        ({"pad_to": 10}, "data.pad_to=10"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ReasoningPrimitives(**kwargs)


@pytest.mark.parametrize("shots", [0, 3])
@pytest.mark.parametrize("depth, flavour", SETTINGS)
def test_dense_labels_are_the_values_read(depth, flavour, shots):
    """``supervise="all"``: every right-hand-side variable is labelled with its value, recomputed
    here statement by statement from the decoded words; the last position keeps the answer."""
    task = ReasoningPrimitives(depth=depth, flavour=flavour, shots=shots, supervise="all", batch_size=500)
    input_ids, dense = task.train_batch(0, 0)
    last = ReasoningPrimitives(depth=depth, flavour=flavour, shots=shots, batch_size=500).train_batch(0, 0)[1]
    checked = 0
    for row, labels, final in zip(input_ids, dense, last):
        words = [task.vocab[i] for i in row]
        expected, env = {}, {}
        for i, word in enumerate(words[:-1]):
            if word == "=" and words[i - 1].isalpha() and len(words[i - 1]) == 1:
                rhs = words[i + 1]
                if rhs.isdigit():
                    env[words[i - 1]] = rhs
                elif rhs.isalpha() and len(rhs) == 1:
                    expected[i + 1] = env[rhs]
                    env[words[i - 1]] = env[rhs]
        for i, label in enumerate(labels[:-1]):
            assert (task.vocab[label] if label != IGNORE else None) == expected.get(i), (task.decode(row), i)
        assert labels[-1] == final[-1]  # the answer, as with supervise="last"
        checked += len(expected) + 1
    assert checked >= 500 * (1 + depth * task.num_variables * (shots + 1))


def test_dense_labels_refuse_a_wrong_setting():
    with pytest.raises(ValueError, match="data.supervise"):
        ReasoningPrimitives(supervise="every")
