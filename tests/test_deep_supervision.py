"""``DeepSupervision`` against independent references: N_sup = 1 is ordinary training, the carried state is
detached, the Q-head's loss by hand, the papers' carry, every step's test accuracy, and a bit-identical resume."""

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_summary import ModelSummary

from looped import LoopedConfig, LoopedLM
from looped.datamodules import Sudoku
from looped.errors import InputError
from looped.training.deep_supervision import Carry, DeepSupervision, continue_target, q_halt_loss

BATCH = 8


def sudoku() -> Sudoku:
    return Sudoku(size=4, givens=8, val_size=8, test_size=8, train_puzzles=16, batch_size=BATCH, eval_batch_size=8)


def config(data: Sudoku, **overrides) -> LoopedConfig:
    base = dict(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=16, n_heads=2, d_ff=32, causal=False)
    return LoopedConfig(**{**base, **overrides})


def trainer(root, steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        **kwargs,
    )


def batch(data: Sudoku, index: int) -> dict[str, torch.Tensor]:
    x, y = data.train_batch(0, index)
    return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}


def test_one_supervision_step_is_one_ordinary_training_step(tmp_path):
    data = sudoku()
    runs = {}
    for name, make in {
        "plain": lambda c: LoopedLM(c, warmup_steps=1),
        "deep": lambda c: DeepSupervision(c, supervision_steps=1, halting="none", warmup_steps=1),
    }.items():
        torch.manual_seed(0)
        module = make(config(data, loops=2))
        trainer(tmp_path / name, steps=3).fit(module, datamodule=data)
        runs[name] = module.model.state_dict()
    for key, value in runs["plain"].items():
        assert torch.equal(value, runs["deep"][key]), key


@pytest.mark.parametrize("recursion", ["loop", "trm"])
def test_the_carried_state_is_detached(recursion):
    """Step 2's gradient equals the gradient from a state that never had a graph: no gradient reaches step 1."""
    data = sudoku()
    torch.manual_seed(0)
    extra = dict(answer_steps=1, latent_steps=2, norm_placement="post") if recursion == "trm" else dict(loops=2)
    module = DeepSupervision(config(data, recursion=recursion, **extra), supervision_steps=4, halting="none")
    reference = copy.deepcopy(module)
    module.training_step(batch(data, 0), 0)  # step 1: its graph stays alive (no backward), so a leak would show
    assert module.carry.state.grad_fn is None and not module.carry.halted.any()
    reference.carry = Carry(**{k: v.clone() for k, v in vars(module.carry).items()})
    module.training_step(batch(data, 1), 1).backward()
    reference.training_step(batch(data, 1), 1).backward()
    for (name, p), q in zip(module.named_parameters(), reference.parameters(), strict=True):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def slow_bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_q_head_loss_equals_a_slow_reference():
    q = torch.tensor([[-2.0, 0.5], [1.0, -1.0], [0.3, 3.0]])
    correct = torch.tensor([False, True, True])
    next_q = torch.tensor([[0.2, 1.5], [-1.0, -3.0], [2.0, 0.0]])
    last = torch.tensor([False, False, True])
    # HRM's target: sigmoid(next halt) at the last step, else sigmoid(max(next halt, next continue)).
    target = [1 / (1 + math.exp(-v)) for v in (1.5, -1.0, 2.0)]
    assert continue_target(next_q, last).tolist() == pytest.approx(target)
    trm = sum(slow_bce(q[i, 0].item(), float(correct[i])) for i in range(3)) / 3
    hrm = trm + sum(slow_bce(q[i, 1].item(), target[i]) for i in range(3)) / 3
    assert q_halt_loss(q, correct).item() == pytest.approx(trm, rel=1e-6)
    assert q_halt_loss(q, correct, continue_target(next_q, last)).item() == pytest.approx(hrm, rel=1e-6)


@pytest.mark.parametrize("halting", ["trm", "hrm"])
def test_training_loss_is_lm_loss_plus_half_the_q_loss(halting):
    data = sudoku()
    torch.manual_seed(0)
    module = DeepSupervision(config(data, loops=2, q_head=True), supervision_steps=3, halting=halting)
    with torch.no_grad():
        module.model.q_head.weight.normal_(std=1.0)  # not the -5 start, so both targets matter
    b = batch(data, 0)
    loss = module.training_step(b, 0)
    logits, q, state = module.model.reason(b["input_ids"])
    right = (logits.argmax(-1) == b["labels"]).all(-1)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten()).item()
    bce = sum(slow_bce(q[i, 0].item(), float(right[i])) for i in range(BATCH)) / BATCH
    if halting == "hrm":
        _, next_q, _ = module.model.reason(b["input_ids"], state)
        target = [1 / (1 + math.exp(-max(next_q[i, 0].item(), next_q[i, 1].item()))) for i in range(BATCH)]
        bce += sum(slow_bce(q[i, 1].item(), target[i]) for i in range(BATCH)) / BATCH
    assert loss.item() == pytest.approx(expected + 0.5 * bce, rel=1e-5)


def test_halted_examples_are_replaced_by_new_ones():
    data = sudoku()
    module = DeepSupervision(config(data, loops=1), supervision_steps=2, halting="none")
    batches = [batch(data, i) for i in range(3)]
    module.training_step(batches[0], 0)
    assert torch.equal(module.carry.input_ids, batches[0]["input_ids"]) and not module.carry.halted.any()
    module.training_step(batches[1], 1)  # step 2 of batch 0's examples: batch 1 is dropped, all halt
    assert torch.equal(module.carry.input_ids, batches[0]["input_ids"]) and module.carry.halted.all()
    module.training_step(batches[2], 2)
    assert torch.equal(module.carry.input_ids, batches[2]["input_ids"]) and module.carry.steps.eq(1).all()


def test_halting_follows_the_q_head_after_the_exploration_minimum():
    data = sudoku()
    module = DeepSupervision(config(data, q_head=True), supervision_steps=5, halting="trm", exploration=0.0)
    q = torch.tensor([[1.0, 9.0], [-1.0, -9.0], [-1.0, 0.0]])
    steps = torch.tensor([1, 1, 5])
    assert module.halted_after(q, steps).tolist() == [True, False, True]  # q_halt > 0, or N_sup reached
    module.halting = "hrm"  # q_halt > q_continue
    assert module.halted_after(q, steps).tolist() == [False, True, True]
    module.exploration = 1.0  # every example must first run U{2..5} steps
    assert module.halted_after(q, torch.tensor([1, 1, 1])).tolist() == [False, False, False]


def test_every_supervision_steps_test_accuracy_is_logged(tmp_path):
    data = sudoku()
    torch.manual_seed(0)
    module = DeepSupervision(config(data, loops=1, q_head=True), supervision_steps=2, eval_steps=3)
    results = trainer(tmp_path, steps=2).test(module, datamodule=data, verbose=False)[0]
    inputs, labels = next_eval(data)
    with torch.no_grad():
        for steps in (1, 2, 3):
            preds = module(inputs, steps=steps).argmax(-1)
            assert results[f"test/exact_match_step{steps}"] == pytest.approx((preds == labels).all(-1).float().mean())
            assert results[f"test/cell_accuracy_step{steps}"] == pytest.approx((preds == labels).float().mean())
    assert results["test/exact_match"] == pytest.approx(results["test/exact_match_step2"])


def next_eval(data: Sudoku) -> tuple[torch.Tensor, torch.Tensor]:
    b = next(iter(data.test_dataloader()))
    return b["input_ids"], b["labels"]


def test_the_model_summary_counts_parameters_and_flops():
    data = sudoku()
    cfg = config(data, recursion="trm", attention="mlp", norm_placement="post", q_head=True, block_layers=2)
    module = DeepSupervision(cfg, supervision_steps=2)
    summary = ModelSummary(module)
    assert summary.total_parameters == sum(p.numel() for p in module.parameters())
    per_step = data.seq_len * module.model.flops_per_token(data.seq_len)  # one example, one supervision step
    assert summary.total_flops == pytest.approx(2 * per_step, rel=0.02)


def test_bad_settings_name_the_key():
    data = sudoku()
    with pytest.raises(InputError, match=r"^model\.init_args\.halting: .*model\.init_args\.config\.q_head: true"):
        DeepSupervision(config(data), halting="trm")
    with pytest.raises(InputError, match=r"^model\.init_args\.supervision_steps must be >= 1"):
        DeepSupervision(config(data, q_head=True), supervision_steps=0)


STEPS, STOP = 6, 3


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def train(root, ckpt_path=None) -> tuple[Losses, DeepSupervision]:
    L.seed_everything(0)
    data = sudoku()
    cfg = config(data, recursion="trm", latent_steps=2, answer_steps=2, norm_placement="post", q_head=True, dropout=0.1)
    module = DeepSupervision(cfg, supervision_steps=3, halting="trm", exploration=0.5, warmup_steps=2)
    with torch.no_grad():
        module.model.q_head.weight.normal_(std=3.0)  # the head halts some examples from the start: the carry mixes
        module.model.q_head.bias.zero_()
    losses = Losses()
    save = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=STOP, save_top_k=-1)
    trainer(root, STEPS, callbacks=[losses, save]).fit(module, datamodule=data, ckpt_path=ckpt_path)
    return losses, module


def test_a_resumed_run_continues_bit_identically(tmp_path):
    full, straight = train(tmp_path / "full")
    assert sorted(full.losses) == list(range(1, STEPS + 1))
    assert len(set(straight.carry.steps.tolist())) > 1  # examples at different supervision steps
    resumed, again = train(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "ckpt" / f"epoch=0-step={STOP}.ckpt")
    assert sorted(resumed.losses) == list(range(STOP + 1, STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == full.losses[step], step
    for key, value in straight.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    for key, value in vars(straight.carry).items():
        assert torch.equal(value, getattr(again.carry, key)), key


class Weights(L.Callback):
    """The module's weights after every optimiser step (before any average replaces them)."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_ema_decay_evaluates_and_saves_the_average_and_keeps_the_current_weights_for_resuming(tmp_path):
    """TRM's EMA (``ema_decay``): after training, the module holds the average of the weights of every step
    (the first step's weights, then lerp by 1 − decay), computed here by hand; the checkpoint's ``state_dict``
    is that average and its ``current_model_state`` the weights the optimiser left, which a resume continues."""
    L.seed_everything(0)
    data = sudoku()
    module = DeepSupervision(config(data, q_head=True), supervision_steps=2, warmup_steps=1, ema_decay=0.5)
    (ema,) = [c for c in module.configure_callbacks() if type(c).__name__ == "EMAWeightAveraging"]
    weights = Weights()
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 3, callbacks=[weights, save]).fit(module, datamodule=data)
    average = dict(weights.after_step[0])
    for step in weights.after_step[1:]:
        average = {k: a.lerp(step[k], 0.5) if a.is_floating_point() else step[k] for k, a in average.items()}
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    for name, value in average.items():
        torch.testing.assert_close(module.state_dict()[name], value, msg=name)
        torch.testing.assert_close(saved["state_dict"][name], value, msg=name)
        torch.testing.assert_close(saved["current_model_state"][name], weights.after_step[-1][name], msg=name)
    assert not torch.equal(average["model.embed.weight"], weights.after_step[-1]["model.embed.weight"])
    with pytest.raises(InputError, match=r"^model\.init_args\.ema_decay must be in \(0, 1\) or null"):
        DeepSupervision(config(data, q_head=True), ema_decay=1.0)
