"""Chain-of-thought DP tasks: every answer and every CoT step re-derived from the decoded text by slow solvers."""

import numpy as np
import pytest

from looped.datamodules import CoTTask, EditDistance, LongestIncreasingSubsequence, ModularArithmetic
from looped.datamodules.base import IGNORE, rows_as_keys

P = 11


# -- independent references ---------------------------------------------------------------------
class Expression:
    """Recursive-descent parser and evaluator mod 11 over a token list; remembers every operation's span."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.pos, self.ready = tokens, 0, []
        self.value = self.sum()
        assert self.pos == len(tokens), f"trailing tokens in {tokens}"

    def sum(self):
        value = self.product()
        while self.pos < len(self.tokens) and self.tokens[self.pos] in "+-":
            value = self.operation(value, self.product)
        return value

    def product(self):
        value = self.atom()
        while self.pos < len(self.tokens) and self.tokens[self.pos] in "*/":
            value = self.operation(value, self.atom)
        return value

    def operation(self, left, operand):
        start_left = self.last_atom_start
        op = self.tokens[self.pos]
        self.pos += 1
        right_start = self.pos
        right = operand()
        a, b = left, right
        if op == "/":
            assert b % P != 0, f"division by zero in {' '.join(self.tokens)}"
            result = a * pow(b, P - 2, P) % P
        else:
            result = {"+": a + b, "-": a - b, "*": a * b}[op] % P
        # An operation whose two operands are literal numbers can be evaluated now.
        if self.pos - start_left == 3 and right_start - start_left == 2:
            self.ready.append((start_left, self.pos, result))
        self.last_atom_start = start_left  # the result stands where its left operand began
        return result

    def atom(self):
        token = self.tokens[self.pos]
        self.last_atom_start = self.pos
        if token == "(":
            start = self.pos
            self.pos += 1
            value = self.sum()
            assert self.tokens[self.pos] == ")"
            self.pos += 1
            self.last_atom_start = start
            return value
        assert token.isdigit() and 0 <= int(token) < P, token
        self.pos += 1
        return int(token)


def reduce_first(tokens: list[str]) -> list[str]:
    """The expression after the first operation a left-to-right evaluator performs (brackets around it drop)."""
    start, end, result = Expression(tokens).ready[0]
    if start > 0 and tokens[start - 1] == "(" and end < len(tokens) and tokens[end] == ")":
        start, end = start - 1, end + 1
    return tokens[:start] + [str(result)] + tokens[end:]


def operators(tokens: list[str]) -> int:
    return sum(t in ("+", "-", "*", "/") for t in tokens)


def lis_dp(values: list[int]) -> list[int]:
    dp = []
    for i, v in enumerate(values):
        dp.append(1 + max([dp[j] for j in range(i) if values[j] < v], default=0))
    return dp


def edit_table(a: str, b: str) -> list[list[int]]:
    D = [[2 * (i + j) if i == 0 or j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            D[i][j] = min(D[i - 1][j] + 2, D[i][j - 1] + 2, D[i - 1][j - 1] + (0 if a[i - 1] == b[j - 1] else 3))
    return D


# -- per-task checks of one decoded sample: (prompt tokens, cot tokens, answer token) -------------------------
def check_arithmetic(task, prompt, cot, answer):
    assert operators(prompt) == task.size
    assert str(Expression(prompt).value) == answer
    if task.format == "direct":
        assert cot == []
        return
    steps, text = [prompt], " ".join(cot)
    assert text.count("=") == task.size - 1  # one step per operation; the last one is the answer
    if text:
        assert text.startswith("= ")
        steps += [step.split() for step in text[2:].split(" = ")]
    for before, after in zip(steps, steps[1:]):
        assert after == reduce_first(before), (before, after)  # one operation, the evaluator's next one
        assert operators(after) == operators(before) - 1 and Expression(after).value == Expression(before).value
    assert operators(steps[-1]) == 1 and reduce_first(steps[-1]) == [answer]


def check_lis(task, prompt, cot, answer):
    values = [int(t) for t in prompt]
    assert len(values) == task.size and all(task.size < v <= task.size + task.value_range for v in values)
    dp = lis_dp(values)
    assert int(answer) == max(dp)
    if task.format == "cot":
        assert cot[0] == "<sep>" and [int(t) for t in cot[1:]] == dp


def check_edit_distance(task, prompt, cot, answer):
    bar = prompt.index("|")
    a, b = "".join(prompt[:bar]), "".join(prompt[bar + 1 :])
    assert len(a) == len(b) == task.size and (a + b).isalpha()
    D = edit_table(a, b)
    assert int(answer) == D[-1][-1]
    if task.format == "cot":
        assert cot[0] == "<sep>"
        rows = [[int(v) for v in row.split()] for row in " ".join(cot[1:]).split(" , ")]
        assert rows == [row[1:] for row in D[1:]]


TASKS = {
    "arithmetic": (ModularArithmetic, dict(size=5), check_arithmetic),
    "lis": (LongestIncreasingSubsequence, dict(size=50), check_lis),
    "edit_distance": (EditDistance, dict(size=12), check_edit_distance),
}


def split_row(task: CoTTask, row: np.ndarray) -> tuple[list[str], list[str], str]:
    """Decoded ``prompt``, ``CoT`` and answer of one row, from its text alone."""
    tokens = task.decode(row[: task.prompt_len]).split()
    written = task.decode(row[task.prompt_len :]).split()
    assert written[-2:-1] and written[-1] == "<eos>" and written[-3] == "<ans>", written
    return tokens, written[:-3], written[-2]


@pytest.mark.parametrize("fmt", ["cot", "direct"])
@pytest.mark.parametrize("name", TASKS)
def test_every_answer_and_step_matches_the_slow_solver(name, fmt):
    cls, kwargs, check = TASKS[name]
    task = cls(format=fmt, batch_size=1000, **kwargs)
    for index in range(2):  # 2,000 samples per task and format
        x, _ = task.train_batch(rank=0, index=index)
        for row in x:
            check(task, *split_row(task, row))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6, 8])
def test_arithmetic_other_sizes(size):
    task = ModularArithmetic(size=size)
    for row in task.generate(task.rng(0, 0, 0), 300)[0]:
        check_arithmetic(task, *split_row(task, row))


@pytest.mark.parametrize("size", [2, 3, 100])
def test_lis_and_edit_distance_other_sizes(size):
    for task, check in (
        (LongestIncreasingSubsequence(size=size, value_range=max(size, 5)), check_lis),
        (EditDistance(size=min(size, 20), alphabet_size=4), check_edit_distance),
    ):
        for row in task.generate(task.rng(0, 0, 0), 200)[0]:
            check(task, *split_row(task, row))


def test_answers_are_spread():
    """The generators follow the paper's: no task collapses onto a few answers."""
    for task, low in (
        (ModularArithmetic(size=5), 11),
        (LongestIncreasingSubsequence(size=50), 30),
        (EditDistance(size=12), 15),
    ):
        x, _ = task.generate(task.rng(0, 0, 0), 2000)
        answers = task.eval_extras(x, None)["answer"]
        assert len(np.unique(answers)) >= low, type(task).__name__


# -- the shared layout --------------------------------------------------------------------------------------
def all_tasks():
    for name, (cls, kwargs, _) in TASKS.items():
        for fmt in ("cot", "direct"):
            yield pytest.param(cls(format=fmt, batch_size=256, **kwargs), id=f"{name}-{fmt}")


@pytest.mark.parametrize("task", all_tasks())
def test_prompt_column_and_labels(task):
    x, y = task.train_batch(0, 0)
    n, T = x.shape
    assert T == task.seq_len and task.vocab[task.eos_id] == "<eos>" and task.vocab[task.pad_id] == "<pad>"
    P = task.prompt_len
    prompt = x[:, :P]
    # Left padding only: once a row's prompt starts, no more padding; the prompt ends at column P.
    started = np.cumsum(prompt != task.pad_id, axis=1) > 0
    assert (prompt[started] != task.pad_id).all() and (prompt[:, -1] != task.pad_id).all()
    eos = np.argmax(x == task.eos_id, axis=1)
    assert ((x == task.eos_id).sum(axis=1) == 1).all() and (eos > P).all()
    cols = np.arange(T)[None, :]
    written = (cols >= P) & (cols <= eos[:, None])
    assert (x[written] != task.pad_id).all() and (x[~written & (cols >= P)] == task.pad_id).all()
    assert (x[np.arange(n), eos - 2] == task.answer_marker_id).all()
    # Labels: the next token, exactly at the positions whose next token the model writes.
    labelled = (cols >= P - 1) & (cols < eos[:, None])
    assert ((y != IGNORE) == labelled).all()
    assert (y[:, :-1][labelled[:, :-1]] == x[:, 1:][labelled[:, :-1]]).all()
    if task.format == "direct":
        assert (eos == P + 2).all()


@pytest.mark.parametrize("task", all_tasks())
def test_eval_batches_carry_prompt_len_and_answer(task):
    task.val_size, task.test_size, task.eval_batch_size = 64, 64, 32
    batch = next(iter(task.val_dataloader()))
    assert set(batch) == {"input_ids", "labels", "prompt_len", "answer"}
    x = batch["input_ids"].numpy()
    assert (batch["prompt_len"].numpy() == task.prompt_len).all()
    for row, answer in zip(x, batch["answer"].numpy()):
        assert task.decode([answer]) == split_row(task, row)[2]
        assert row[list(row).index(task.eos_id) - 1] == answer


@pytest.mark.parametrize("name", TASKS)
def test_direct_and_cot_pose_the_same_problems(name):
    cls, kwargs, _ = TASKS[name]
    direct, cot = cls(format="direct", **kwargs), cls(format="cot", **kwargs)
    xd, _ = direct.generate(direct.rng(0, 0, 0), 64)
    xc, _ = cot.generate(cot.rng(0, 0, 0), 64)
    assert np.array_equal(xd[:, : direct.prompt_len], xc[:, : cot.prompt_len])
    assert np.array_equal(direct.eval_extras(xd, None)["answer"], cot.eval_extras(xc, None)["answer"])


@pytest.mark.parametrize("name", TASKS)
def test_determinism_ranks_and_disjoint_eval(name):
    cls, kwargs, _ = TASKS[name]
    a, b = (
        cls(batch_size=32, val_size=256, test_size=256, **kwargs),
        cls(batch_size=32, val_size=256, test_size=256, **kwargs),
    )
    assert np.array_equal(a.train_batch(0, 3)[0], b.train_batch(0, 3)[0])
    assert np.array_equal(a.eval_set(2)[0], b.eval_set(2)[0])
    assert not np.array_equal(a.train_batch(0, 3)[0], a.train_batch(1, 3)[0])
    assert not np.array_equal(a.train_batch(0, 3)[0], a.train_batch(0, 4)[0])
    assert not np.array_equal(a.train_batch(0, 3)[0], cls(batch_size=32, seed=1, **kwargs).train_batch(0, 3)[0])
    assert not set(rows_as_keys(a.eval_set(1)[0])) & set(rows_as_keys(a.eval_set(2)[0]))


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: ModularArithmetic(size=0), "data.size"),
        (lambda: ModularArithmetic(modulus=12), "data.modulus"),
        (lambda: ModularArithmetic(format="chain"), "data.format"),
        (lambda: ModularArithmetic(size=50), "data.max_seq_len"),
        (lambda: LongestIncreasingSubsequence(size=1), "data.size"),
        (lambda: LongestIncreasingSubsequence(size=200, value_range=150), "data.value_range"),
        (lambda: EditDistance(size=0), "data.size"),
        (lambda: EditDistance(alphabet_size=27), "data.alphabet_size"),
        (lambda: EditDistance(size=80), "data.max_seq_len"),
    ],
)
def test_invalid_parameters_name_the_field(build, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build()


def test_describe_prints_the_vocabulary():
    task = EditDistance(size=3)
    text = task.describe()
    assert " ".join(task.vocab) in text and task.vocab[-1] == "9" and "prompt_len = 7" in text and "<ans>" in text
