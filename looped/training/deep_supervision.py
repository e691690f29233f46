"""``DeepSupervision``: train a model the way TRM and HRM are trained, on a state carried across supervision steps.

Deep supervision (HRM: Wang et al. 2025; TRM: Jolicoeur-Martineau 2025): each training example is
worked on for up to ``supervision_steps`` (N_sup, the papers' 16) *supervision steps*. A step runs the
model's recursion once from the example's carried state (``LoopedTransformer.reason``: TRM, HRM or our
``(k⊗L)``, ``LoopedConfig.recursion``), reads an answer out, takes a loss and an optimiser step, and
keeps the new state, detached, for the example's next step. A halting Q-head learns when the answer is
right, and an example stops when it says so or at N_sup steps.

As in the papers' code (their ``carry``), one Lightning training step is one supervision step of a batch
of *slots*: a slot whose example halted takes the row of the same index from the new batch, with a fresh
state; the others keep their example and state, and their new row is dropped. So the loss of a step
averages examples at different supervision steps, automatic optimisation applies (one optimiser step per
``training_step``), and N_sup = 1 is exactly ordinary training. The carry (states, examples, step
counts, halted flags, puzzle ids) and the exploration generator are saved in checkpoints, and the data module
replays its batches from ``global_step``, so a resumed run continues bit for bit.

Halting objectives (``halting``), both with exploration (with probability ``exploration`` an example
must run at least U{2..N_sup} steps before it may halt):

* ``trm``: ``BCE(q_halt, answer exactly right)``; halt when ``q_halt > 0``. TRM drops q_continue.
* ``hrm``: that, plus ``BCE(q_continue, σ(target))`` with HRM's bootstrapped target from one more
  no-grad step on the new state: ``q_halt'`` at the last step, else ``max(q_halt', q_continue')``;
  halt when ``q_halt > q_continue``.
* ``none``: no Q-head loss; every example runs N_sup steps.

The loss is ``lm_loss + q_loss_weight · q_loss`` (the papers: 0.5), ``lm_loss`` the token-mean cross
entropy of ``LoopedLM`` (the papers average per example, the same when every example has as many
labelled cells, as Sudoku and mazes do). Evaluation runs ``eval_steps`` supervision steps from fresh
states, no halting, and logs the exact match (a puzzle solved) and cell accuracy after every step,
``{stage}/exact_match_step{s}`` and ``{stage}/cell_accuracy_step{s}``: inference-time scaling in supervision
steps, as ``PerLoopAccuracy`` logs it in loops. The usual metrics (``{stage}/exact_match`` ...) are read at
step N_sup.

Dimension letters: s states, b batch (slots), t time, d model width, v vocabulary, n supervision step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor, nn

from looped.contract import IGNORE
from looped.errors import MODEL_CONFIG, InputError
from looped.model import LoopedConfig
from looped.training.module import LoopedLM, as_dataclass


@dataclass
class Carry:
    """What each slot of the training batch holds between supervision steps."""

    state: Tensor
    """``[s b t d]`` the detached state after the slot's last step."""
    steps: Tensor
    """``[b]`` supervision steps the slot's example has had."""
    halted: Tensor
    """``[b]`` the example stopped: the slot takes a new one at the next step."""
    input_ids: Tensor
    labels: Tensor
    puzzle_ids: Tensor | None = None
    """``[b]`` the slot's example's puzzle id (batches that carry ``puzzle_ids``, e.g. ARC's; else 0, "none").
    None only in a checkpoint from before puzzle ids were carried."""

    def to(self, device: torch.device) -> Carry:
        # Not dataclasses.asdict: it deep-copies every tensor (each step), and a deep-copied fake tensor
        # crashes the interpreter when freed (`looped plan` runs this step on fake tensors).
        values = (getattr(self, field.name) for field in fields(self))
        return Carry(*(None if value is None else value.to(device) for value in values))


def exactly_right(logits: Tensor, labels: Tensor) -> Tensor:
    """``[b]`` bool: every labelled position's argmax is its label."""
    return ((logits.argmax(-1) == labels) | (labels == IGNORE)).all(-1)


def q_halt_loss(q: Tensor, correct: Tensor, continue_target: Tensor | None = None) -> Tensor:
    """The Q-head's loss, mean over examples: ``BCE(q_halt, correct)`` (TRM), plus ``BCE(q_continue, target)``
    (HRM, ``continue_target`` already a probability)."""
    loss = F.binary_cross_entropy_with_logits(q[:, 0], correct.to(q.dtype))
    if continue_target is not None:
        loss = loss + F.binary_cross_entropy_with_logits(q[:, 1], continue_target)
    return loss


def continue_target(next_q: Tensor, last_step: Tensor) -> Tensor:
    """HRM's bootstrapped q_continue target from the next step's Q logits ``[b 2]``: σ(q_halt') at the last step,
    else σ(max(q_halt', q_continue'))."""
    return torch.sigmoid(torch.where(last_step, next_q[:, 0], next_q.max(-1).values))


class DeepSupervision(LoopedLM):
    """``LoopedLM`` trained with deep supervision and a halting Q-head (the module docstring says how).

    Args:
        config: the architecture; ``recursion`` says what a supervision step does, ``q_head`` gives the halting head.
        supervision_steps: N_sup, the most supervision steps an example gets in training (TRM, HRM: 16).
        halting: the Q-head's objective and halting rule: ``trm``, ``hrm`` or ``none`` (every example N_sup steps).
        exploration: the probability that an example must run at least U{2..N_sup} steps (TRM, HRM: 0.1).
        q_loss_weight: weight of the Q-head's loss (TRM, HRM: 0.5).
        eval_steps: supervision steps at evaluation, each one's accuracy logged (default: 2·N_sup, to show
            what steps beyond training add).
        puzzle_embedding_lr: learning rate of the puzzle-id embedding (``config.puzzle_embedding_len``), trained as
            TRM and HRM train it: SignSGD on the rows the step's examples used (TRM, HRM on ARC: 1e-2), on the
            same warmup schedule as the other weights.
        puzzle_embedding_weight_decay: its decoupled weight decay, on those rows only (TRM, HRM: 0.1).
        seed: seed of the exploration draws.
        ema_decay: keep an exponential moving average of the weights with this decay (TRM's ``ema=True``: 0.999),
            which validation, testing and the saved ``state_dict`` use: Lightning's ``EMAWeightAveraging``, added
            by ``configure_callbacks`` (a checkpoint also holds the current weights, so a resume is exact); one
            device or DDP (the average is an unsharded copy). None: off.
        **kwargs: ``LoopedLM``'s (optimiser, schedule, ...).
    """

    def __init__(
        self,
        config: LoopedConfig,
        supervision_steps: int = 16,
        halting: Literal["trm", "hrm", "none"] = "trm",
        exploration: float = 0.1,
        q_loss_weight: float = 0.5,
        eval_steps: int | None = None,
        puzzle_embedding_lr: float = 1e-2,
        puzzle_embedding_weight_decay: float = 0.1,
        seed: int = 0,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        config = as_dataclass(LoopedConfig, config)
        own = {"puzzle_embedding_lr": puzzle_embedding_lr, "ema_decay": ema_decay}
        own["puzzle_embedding_weight_decay"] = puzzle_embedding_weight_decay
        check_deep_supervision(config, supervision_steps, halting, exploration, eval_steps, {**kwargs, **own})
        super().__init__(config, **kwargs)
        self.supervision_steps, self.halting, self.exploration = supervision_steps, halting, exploration
        self.q_loss_weight, self.eval_steps = q_loss_weight, eval_steps or 2 * supervision_steps
        self.puzzle_embedding_lr = puzzle_embedding_lr
        self.puzzle_embedding_weight_decay = puzzle_embedding_weight_decay
        self.ema_decay = ema_decay
        # This evaluation batch's answer at step N_sup, for callbacks that score it (looped.callbacks.ArcScore):
        # (predicted tokens [b t], the Q-head's halt logit [b] or None).
        self.eval_answer: tuple[Tensor, Tensor | None] | None = None
        self.carry: Carry | None = None
        self.explore = torch.Generator().manual_seed(seed)  # its own draws: saved and restored with the carry
        # Lightning's model summary runs this through forward (all N_sup steps) and counts its FLOPs; a dict, as
        # a batch is (it passes the data module's batch hooks first).
        self.example_input_array = {"input_ids": torch.zeros(1, config.max_seq_len or 1, dtype=torch.long)}
        # Per stage, summed over the epoch's batches: [2·eval_steps + 2] (see _eval_step).
        self.step_counts: dict[str, Tensor] = {}

    def configure_callbacks(self) -> list[L.Callback]:
        """TRM's weight average (``ema_decay``), Lightning's implementation, beside the recipe's callbacks."""
        callbacks = list(super().configure_callbacks() or [])
        if self.ema_decay is not None:
            callbacks.append(EMAWeightAveraging(decay=self.ema_decay))
        return callbacks

    def forward(self, input_ids: Tensor, steps: int | None = None, puzzle_ids: Tensor | None = None) -> Tensor:
        """Logits ``[b t v]`` after ``steps`` supervision steps (default N_sup) from fresh states."""
        state = None
        for _ in range(steps or self.supervision_steps):
            logits, _, state = self.model.reason(input_ids, state, puzzle_ids)
        return logits

    # -- training: one supervision step of the carried slots -----------------------------------------
    def carry_in(self, input_ids: Tensor, labels: Tensor, puzzle_ids: Tensor | None = None) -> Carry:
        """The slots for this step: halted ones take this batch's rows (and puzzle ids) and a fresh state."""
        fresh = self.model.initial_state(*input_ids.shape)
        b, carry = input_ids.shape[0], self.carry
        zeros = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        puzzle_ids = zeros if puzzle_ids is None else puzzle_ids  # id 0: none
        if carry is None or carry.input_ids.shape != input_ids.shape:  # the first step (or a new batch shape)
            new = torch.ones(b, dtype=torch.bool, device=input_ids.device)
            return Carry(fresh, zeros, new, input_ids, labels, puzzle_ids)
        carry = carry.to(input_ids.device)
        new = carry.halted
        # A slot keeps its example's id until it halts (a carry saved without ids: take the batch's).
        ids = puzzle_ids if carry.puzzle_ids is None else torch.where(new, puzzle_ids, carry.puzzle_ids)
        return Carry(
            torch.where(new[None, :, None, None], fresh, carry.state),
            torch.where(new, 0, carry.steps),
            new,
            torch.where(new[:, None], input_ids, carry.input_ids),
            torch.where(new[:, None], labels, carry.labels),
            ids,
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._batch_shape = tuple(batch["input_ids"].shape)
        carry = self.carry_in(batch["input_ids"], batch["labels"], batch.get("puzzle_ids"))
        logits, q, state = self.model.reason(carry.input_ids, carry.state, carry.puzzle_ids)
        steps = carry.steps + 1
        lm_loss = self.compute_loss(logits, carry.labels)
        correct = exactly_right(logits.detach(), carry.labels)
        loss = lm_loss
        if self.halting != "none":
            target = None
            if self.halting == "hrm":
                with torch.no_grad():  # one more step on the new state, for the bootstrapped target
                    _, next_q, _ = self.model.reason(carry.input_ids, state.detach(), carry.puzzle_ids)
                target = continue_target(next_q, steps >= self.supervision_steps)
            q_loss = q_halt_loss(q, correct, target)
            loss = loss + self.q_loss_weight * q_loss
            self.log("train/q_loss", q_loss.detach())
            self.log("train/q_halt_accuracy", ((q[:, 0] > 0) == correct).float().mean())
        halted = self.halted_after(q, steps)
        # Detached: the next step's loss reaches no earlier step (TRM, HRM: no backpropagation through time).
        self.carry = Carry(state.detach(), steps, halted, carry.input_ids, carry.labels, carry.puzzle_ids)
        # Data-independent shapes only (`looped plan` runs this step on fake tensors): means over the slots.
        self.log_dict(
            {
                "train/lm_loss": lm_loss.detach(),
                "train/exact_match": correct.float().mean(),
                "train/steps": steps.float().mean(),  # the supervision step the slots are at
                "train/halted": halted.float().mean(),  # the share of slots taking a new example next
            }
        )
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.count_training_flops()
        return loss

    @torch.no_grad()
    def halted_after(self, q: Tensor | None, steps: Tensor) -> Tensor:
        """``[b]`` which slots' examples stop after this step: N_sup reached, or the Q-head says so (after the
        exploration's minimum)."""
        halted = steps >= self.supervision_steps
        if self.halting == "none":
            return halted
        halted |= q[:, 0] > 0 if self.halting == "trm" else q[:, 0] > q[:, 1]
        b = steps.shape[0]
        explore = torch.rand(b, generator=self.explore) < self.exploration
        least = torch.randint(2, self.supervision_steps + 1, (b,), generator=self.explore)
        least = torch.where(explore, least, 0).to(steps.device)
        return halted & (steps >= least)

    # -- evaluation: every supervision step's accuracy --------------------------------------------------
    def _eval_step(self, batch: dict[str, Tensor], metrics: nn.ModuleDict, stage: str, dataloader_idx: int = 0) -> None:
        input_ids, labels = batch["input_ids"], batch["labels"]
        mask = labels != IGNORE
        solved, cells, state = [], [], None
        for step in range(1, self.eval_steps + 1):
            logits, q, state = self.model.reason(input_ids, state, batch.get("puzzle_ids"))
            preds = logits.argmax(-1)
            solved.append(exactly_right(logits, labels).sum())
            cells.append(((preds == labels) & mask).sum())
            if step == self.supervision_steps:
                self.update_metric_groups(batch, logits, metrics, stage, dataloader_idx)  # the usual metrics
                self.eval_answer = (preds, None if q is None else q[:, 0])
        # [steps] solved, [steps] right cells, examples, labelled cells: one tensor, one reduce at the end.
        seen = torch.stack([mask.new_tensor(input_ids.shape[0], dtype=torch.long), mask.sum()])
        counts = torch.cat([torch.stack(solved), torch.stack(cells), seen]).float()
        self.step_counts[stage] = counts + self.step_counts.get(stage, 0)

    def log_step_accuracy(self, stage: str) -> None:
        counts = self.step_counts.pop(stage, None)
        if counts is None:
            return
        steps = self.eval_steps
        flat = self.trainer.strategy.reduce(counts, reduce_op="sum") if self._trainer is not None else counts
        solved, cells, examples, labelled = flat[:steps], flat[steps : 2 * steps], flat[-2], flat[-1]
        for n in range(steps):
            self.log(f"{stage}/exact_match_step{n + 1}", solved[n] / examples.clamp(min=1))
            self.log(f"{stage}/cell_accuracy_step{n + 1}", cells[n] / labelled.clamp(min=1))

    def on_validation_epoch_end(self) -> None:
        self.log_step_accuracy("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self.log_step_accuracy("test")
        super().on_test_epoch_end()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"], puzzle_ids=batch.get("puzzle_ids")).argmax(-1)

    # -- the puzzle-id embedding: its own update ----------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None:
            check_puzzle_ids(self.config, getattr(data, "num_puzzle_ids", None))

    def parameter_groups(self) -> list[dict[str, Any]]:
        """``LoopedLM``'s groups without the puzzle embedding: ``on_before_optimizer_step`` updates it."""
        table = self.model.puzzle_embedding
        groups = super().parameter_groups()
        if table is None:
            return groups
        return [{**g, "params": [p for p in g["params"] if p is not table.weight]} for g in groups]

    @torch.no_grad()
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """TRM's and HRM's update of the puzzle embedding (their ``CastedSparseEmbeddingSignSGD``): SignSGD with
        decoupled weight decay, ``w ← w·(1 − lr·wd) − lr·sign(g)``, on the rows the step's examples used only, so
        an optimiser with state (Adam) never holds the table's 800k rows. The rows are those with a gradient (the
        same on every rank after DDP's all-reduce), the rate the schedule's factor of the main optimiser's."""
        table = self.model.puzzle_embedding
        if table is None or table.weight.grad is None:
            return
        group = optimizer.param_groups[0]
        lr = self.puzzle_embedding_lr * group["lr"] / group.get("initial_lr", group["lr"])
        weight, grad = table.weight, table.weight.grad
        used = (grad != 0).any(-1, keepdim=True)
        decayed = weight * (1 - lr * self.puzzle_embedding_weight_decay) - lr * grad.sign()
        weight.copy_(torch.where(used, decayed, weight))
        table.weight.grad = None  # not in the optimiser: nothing else clears it

    # -- exact resume: the carry and the exploration draws travel with the checkpoint -------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        carry = None if self.carry is None else vars(self.carry.to(torch.device("cpu")))
        checkpoint["deep_supervision"] = {"carry": carry, "explore": self.explore.get_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("deep_supervision")
        if saved is None:
            return  # a checkpoint of plain LoopedLM training: the carry starts empty
        self.carry = None if saved["carry"] is None else Carry(**saved["carry"])  # older ones: no puzzle_ids
        self.explore.set_state(saved["explore"])

    @property
    def flops_per_batch(self) -> int | None:
        """Training FLOPs of the last step: the step's forward, plus backward (2×) through the part with gradients."""
        if self._batch_shape is None:
            return None
        c, (batch, seq_len) = self.config, self._batch_shape
        seq_len += c.puzzle_embedding_len  # the prefix positions run through every layer too
        forward = self.model.flops_per_token(seq_len)
        share = {"loop": 1.0, "trm": 1 / c.answer_steps}.get(
            c.recursion, (c.block_layers + c.high_layers) / max(1, c.block_applications())
        )
        return int(batch * seq_len * forward * (1 + 2 * share))


def check_deep_supervision(
    config: LoopedConfig,
    supervision_steps: int,
    halting: str,
    exploration: float,
    eval_steps: int | None,
    kwargs: dict[str, Any],
) -> None:
    """``DeepSupervision``'s arguments that are wrong alone or with the model, named as a recipe sets them."""
    where = "model.init_args"
    for name, ok, need in (
        ("supervision_steps", supervision_steps >= 1, f">= 1, got {supervision_steps}"),
        ("halting", halting in ("trm", "hrm", "none"), f"trm, hrm or none, got {halting!r}"),
        ("exploration", 0.0 <= exploration <= 1.0, f"a probability in [0, 1], got {exploration}"),
        ("eval_steps", eval_steps is None or eval_steps >= supervision_steps, ">= supervision_steps or null"),
        ("puzzle_embedding_lr", kwargs.get("puzzle_embedding_lr", 0) >= 0, ">= 0"),
        ("puzzle_embedding_weight_decay", kwargs.get("puzzle_embedding_weight_decay", 0) >= 0, ">= 0"),
        ("ema_decay", kwargs.get("ema_decay") is None or 0 < kwargs["ema_decay"] < 1, "in (0, 1) or null"),
    ):
        if not ok:
            raise InputError(f"{where}.{name} must be {need}")
    if halting != "none" and not config.q_head:
        raise InputError(
            f"{where}.halting: {halting} trains a halting Q-head the model does not have; set "
            f"{MODEL_CONFIG}.q_head: true (or halting: none)"
        )
    for name in ("exit", "loop_schedule", "regularizer"):
        if kwargs.get(name) is not None:
            raise InputError(f"{where}.{name} is not combined with deep supervision yet; remove it")


def check_puzzle_ids(config: LoopedConfig, data_ids: int | None) -> None:
    """The puzzle embedding has a row for every id the data gives (``num_puzzle_ids``), named as a recipe sets it."""
    if config.puzzle_embedding_len == 0:
        return
    if data_ids is None:
        raise InputError(
            f"{MODEL_CONFIG}.puzzle_embedding_len: the data gives no puzzle_ids to embed; use a data module that "
            "has num_puzzle_ids (looped.datamodules.Arc) or set puzzle_embedding_len: 0"
        )
    if data_ids != config.puzzle_ids:
        raise InputError(
            f"puzzle id mismatch: the data has {data_ids} puzzle ids (data.num_puzzle_ids: its tasks and "
            f"augmentations) but {MODEL_CONFIG}.puzzle_ids={config.puzzle_ids}; drop the override and let the recipe "
            "link puzzle_ids from the data module, or train on the data the model was built for"
        )
