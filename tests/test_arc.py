"""ARC: the encoding, the augmentations and their inverses, and the official score, each against a reference here."""

import numpy as np
import pytest

import looped.datamodules.arc as arc_module
from looped.contract import IGNORE
from looped.datamodules import Arc
from looped.datamodules.arc import encode
from looped.datamodules.arc_scoring import crop, solved, task_score, vote
from looped.errors import InputError

# The 8 symmetries as numpy writes them, and how to undo each (written out, not the module's tables)
TURNS = [
    lambda g: g,
    lambda g: np.rot90(g, 1),
    lambda g: np.rot90(g, 2),
    lambda g: np.rot90(g, 3),
    lambda g: np.fliplr(g),
    lambda g: np.flipud(g),
    lambda g: g.T,
    lambda g: np.fliplr(np.rot90(g, 1)),
]
UNDO = [
    lambda g: g,
    lambda g: np.rot90(g, -1),
    lambda g: np.rot90(g, -2),
    lambda g: np.rot90(g, -3),
    lambda g: np.fliplr(g),
    lambda g: np.flipud(g),
    lambda g: g.T,
    lambda g: np.rot90(np.fliplr(g), -1),
]


def draw(grid: np.ndarray, top: int = 0, left: int = 0) -> np.ndarray:
    """TRM's canvas, cell by cell: PAD 0, colour c + 2, EOS 1 below and right of the grid (no corner)."""
    canvas = np.zeros((30, 30), np.int64)
    h, w = grid.shape
    for i in range(h):
        for j in range(w):
            canvas[top + i, left + j] = grid[i, j] + 2
        if left + w < 30:
            canvas[top + i, left + w] = 1
    if top + h < 30:
        canvas[top + h, left : left + w] = 1
    return canvas


def find_grid(tokens: np.ndarray) -> np.ndarray:
    """The colour cells of a canvas as a grid, wherever they sit."""
    canvas = np.asarray(tokens).reshape(30, 30)
    rows, cols = np.nonzero(canvas >= 2)
    return canvas[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] - 2


@pytest.mark.parametrize("t", range(8))
def test_encode_draws_each_symmetry_recoloured_at_its_offset(t):
    rng = np.random.default_rng(t)
    for shape, offset in [((3, 5), (0, 0)), ((7, 2), (4, 9)), ((30, 30), (0, 0)), ((1, 29), (28, 1))]:
        grid = rng.integers(0, 10, shape)
        colours = np.concatenate([[0], rng.permutation(np.arange(1, 10))])
        moved = TURNS[t](np.array([colours[c] for c in grid.ravel()]).reshape(shape))
        if moved.shape[0] + offset[0] > 30 or moved.shape[1] + offset[1] > 30:
            offset = (0, 0)
        canvas = np.zeros((1, 30, 30), np.int8)
        canvas[0, : shape[0], : shape[1]] = grid
        tokens = encode(canvas, np.array([shape]), np.array([t]), colours[None], np.array([offset]))
        np.testing.assert_array_equal(tokens[0].reshape(30, 30), draw(moved, *offset))


def test_crop_reads_the_grid_at_the_top_left():
    grid = np.arange(12).reshape(3, 4) % 10
    assert np.array_equal(crop(draw(grid)), grid)
    canvas = draw(grid)
    canvas[0, 4] = 5  # a colour where the first row's EOS was: row 0 is wider, the rectangle is not
    assert np.array_equal(crop(canvas), grid)
    assert crop(np.zeros(900, np.int64)).shape == (0, 0)


def test_vote_counts_then_confidence_then_order():
    a, b, c = np.zeros((2, 2)), np.ones((2, 2)), np.ones((1, 2))
    assert [g.tolist() for g in vote([a, b, b, c, c, c])] == [c.tolist(), b.tolist()]
    assert [g.tolist() for g in vote([a, b], [0.2, 0.9])] == [b.tolist(), a.tolist()]  # tie: the surer one
    assert [g.tolist() for g in vote([a, b], [0.5, 0.5])] == [a.tolist(), b.tolist()]  # then the first seen
    assert len(vote([a, a, a])) == 1  # one distinct grid: one attempt


def test_two_attempts_and_partial_tasks():
    answer = np.array([[1, 2], [3, 4]])
    wrong, other_shape = np.array([[1, 2], [3, 5]]), np.array([[1, 2, 3, 4]])
    assert solved([wrong, answer], answer) and not solved([wrong, other_shape, answer], answer)
    assert task_score([[answer], [wrong]], [answer, answer]) == 0.5
    assert task_score([[answer], [wrong]], [answer, answer], all_or_nothing=True) == 0.0
    assert task_score([[wrong, answer], [answer]], [answer, answer]) == 1.0


# Hand-made tasks with known answers: "recolour 1 to 2" and "flip left-right"; the second has two test inputs.
def handmade() -> tuple[dict, dict]:
    g = [np.array(x) for x in ([[1, 0], [0, 0]], [[0, 1, 1]], [[1], [1], [0]], [[3, 1], [1, 3]], [[0, 0, 1]])]
    recolour = lambda x: np.where(x == 1, 2, x)
    flip = lambda x: x[:, ::-1]
    training = {"aaaa0001": ([(g[0], recolour(g[0])), (g[1], recolour(g[1]))], [(g[2], recolour(g[2]))])}
    # A demonstration equal to a test input (g[3]) must be dropped from training.
    evaluation = {
        "eeee0001": ([(g[0], flip(g[0])), (g[3], flip(g[3]))], [(g[3], flip(g[3])), (g[4], flip(g[4]))]),
        "eeee0002": ([(g[1], recolour(g[1]))], [(g[0], recolour(g[0]))]),
    }
    return training, evaluation


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(arc_module, "load_tasks", lambda version: handmade())
    return Arc(augmentations=20, test_views=8, batch_size=64, seed=0)


def test_training_samples_are_pairs_of_their_task_under_its_variant(toy):
    training, evaluation = handmade()
    tasks = {**training, **evaluation}
    seen_variants = set()
    for index in range(4):
        batch = toy.train_tensors(0, index)
        for x, y, pid in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), batch["puzzle_ids"].numpy()):
            task, variant = divmod(int(pid) - 1, toy.augmentations + 1)
            t, colours = toy.transform[task, variant], toy.colours[task, variant]
            seen_variants.add(variant)
            undo = np.argsort(colours)
            grid_in, grid_out = (undo[UNDO[t](find_grid(z))] for z in (x, np.where(y == IGNORE, 0, y)))
            demos, tests = tasks[toy.task_ids[task]]
            allowed = demos + tests if toy.task_ids[task] in training else demos[:1]  # eeee0001's 2nd demo is a test
            assert any(np.array_equal(grid_in, a) and np.array_equal(grid_out, b) for a, b in allowed)
            assert (y != 0).all()  # padding is never a label
    assert len(seen_variants) > 10


def test_training_never_holds_an_evaluation_row(toy):
    toy.setup("fit")
    for index in range(20):
        batch = toy.train_tensors(0, index)
        keys = {i.tobytes() + x.tobytes() for i, x in zip(batch["puzzle_ids"].numpy(), batch["input_ids"].numpy())}
        assert not keys & toy.eval_keys


def test_exact_predictions_score_one_and_the_vote_decides(toy):
    toy.setup("test")
    inputs, labels = toy.eval_set(2)
    assert len(inputs) == 3 * 8 and (toy.eval_set(1)[0] == inputs[::8]).all()  # val: each test input unaugmented
    answers = [y for _, y in handmade()[1]["eeee0001"][1]] + [handmade()[1]["eeee0002"][1][0][1]]
    exact = np.where(labels == IGNORE, 0, labels)
    result = toy.score(exact)
    assert result["score"] == 1.0 and result["tasks"] == {"eeee0001": 1.0, "eeee0002": 1.0}
    # One view right, the others black (the same grid under every colour map and symmetry): that view's
    # prediction, mapped back by its inverse, is the second attempt and must be the answer itself.
    zeros = lambda shape: draw(np.zeros(shape, np.int64)).ravel()
    for view in range(8):
        blind = np.tile(zeros((3, 3)), (len(exact), 1))
        blind[view::8] = exact[view::8]
        attempts = toy.score(blind)["attempts"]
        for (task, index), answer in zip([("eeee0001", 0), ("eeee0001", 1), ("eeee0002", 0)], answers):
            assert np.array_equal(attempts[task, index][1], answer), (view, toy.transform[toy.task_ids.index(task)])
    assert set(toy.transform[1:, 1:8].ravel().tolist()) == set(range(8))  # all 8 symmetries were inverted
    # eeee0001's first test input: 3 views say A, 3 say B, 2 the answer -> not in the two attempts; 0.5 for the task
    worse = exact.copy()
    worse[:3], worse[3:6] = zeros((2, 2)), zeros((3, 3))
    assert toy.score(worse)["tasks"] == {"eeee0001": 0.5, "eeee0002": 1.0}
    assert toy.score(worse)["score"] == 0.75
    # 3 say A, 5 the answer: the answer is attempt 1, A attempt 2
    better = exact.copy()
    better[:3] = zeros((2, 2))
    attempts = toy.score(better)["attempts"]["eeee0001", 0]
    assert np.array_equal(attempts[0], answers[0]) and np.array_equal(attempts[1], np.zeros((2, 2)))


def test_both_versions_load_from_the_wheel():
    assert [len(tasks) for tasks in arc_module.load_tasks("arc1")] == [400, 400]
    assert [len(tasks) for tasks in arc_module.load_tasks("arc2")] == [1000, 120]


def test_real_arc_tasks_load_with_their_ids():
    task = Arc(tasks=["007bbfb7", "00576224"], augmentations=2, test_views=3, batch_size=4)
    task.setup("fit")
    assert task.task_ids == ["007bbfb7", "00576224"] and task.num_puzzle_ids == 1 + 2 * 3
    batch = next(iter(task.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 900) and batch["puzzle_ids"].shape == (4,)
    assert next(iter(task.test_dataloader()))["puzzle_ids"].tolist() == [4, 5, 6]  # one test input, 3 views
    assert task.decode(task.eval_set(1)[0][0]).count("/") == 1  # 00576224's 2×2 test input


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: Arc(tasks=["007bbfb8"]), "data.tasks"),
        (lambda: Arc(tasks=["007bbfb7"]), "data.tasks"),  # a training task only: nothing to score
        (lambda: Arc(version="arc3"), "data.version"),
        (lambda: Arc(augmentations=2, test_views=4), "data.test_views"),
        (lambda: Arc(train_size=100), "data.train_size"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(make, key):
    with pytest.raises(InputError) as error:
        make()
    message = str(error.value)
    assert key in message and "\n" not in message


def test_a_wrong_task_id_names_the_nearest():
    with pytest.raises(InputError, match="nearest ids: 007bbfb7"):
        Arc(tasks=["007bbfb8"])
