"""``LoopedLM``: the LightningModule that trains a ``LoopedTransformer`` on ``{input_ids, labels}`` batches.

Loss is cross-entropy on ``labels`` (-100 = no loss). Metrics (torchmetrics):
exact match (a sample counts only if every labelled position is right), token
accuracy and perplexity; with a data module's ``eval_names`` also per named
evaluation set (``val/exact_match_n8``); for tasks scored by generation (batches
with ``prompt_len``) the greedy-decoded final answer's accuracy (``looped.evaluation.generation``). A new task
subclasses this in a few lines (override ``compute_loss`` or the ``*_step``
hooks; see README).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict, is_dataclass
from types import FrameType
from typing import Any, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.parsing import get_init_args
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassExactMatch

from looped.contract import IGNORE, DataModuleContract, ReadsLoops, batch_size, batch_tokens, check_data_module
from looped.errors import MODEL_CONFIG, InputError
from looped.evaluation.generation import generate_answers, sample_rows
from looped.evaluation.loop_readout import EvalPass, labelled_states_suffice
from looped.model import LoopedConfig, LoopedTransformer

# batch_size and batch_tokens are named by recipes as looped.module.batch_size / batch_tokens (looped.moved).
from looped.training.checkpoint import check_same_data, load_weights
from looped.training.halting import ExitObjective, expected_loops
from looped.training.loop_schedule import LoopSchedule
from looped.training.regularizer import BlockRegularizer

__all__ = [
    "IGNORE",
    "LoopedLM",
    "NonFiniteLossError",
    "Perplexity",
    "adamw",
    "batch_size",
    "batch_tokens",
    "transformer_on_meta",
    "warmup_cosine",
]

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
T = TypeVar("T")


def adamw(params: Iterable) -> torch.optim.Optimizer:
    """The default optimiser (recipes usually name one: ``class_path: torch.optim.Adafactor``)."""
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


class Perplexity(MeanMetric):
    """``exp`` of the token-weighted mean loss: update it like the loss, with ``weight`` = labelled tokens.

    Reuses the loss already computed; ``torchmetrics.text.Perplexity`` would run a
    second softmax over the whole vocabulary.
    """

    def compute(self) -> Tensor:
        return super().compute().exp()


class NonFiniteLossError(InputError, FloatingPointError):
    """The loss became NaN or inf; raised so the run stops instead of training on garbage.

    An ``InputError``: what makes a loss diverge is a setting the user chose (learning rate, warmup,
    precision), so the command line prints the message, which names the step and those settings.
    """


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``decay_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def as_dataclass(cls: type[T], value: T | dict | None) -> T | None:
    """``value`` as ``cls``: a dict (from a checkpoint's hyper-parameters) becomes one, an instance or None stays."""
    return cls(**value) if isinstance(value, dict) else value


def plain_data(**values: Any) -> dict[str, Any]:
    """The hyper-parameters as a checkpoint stores them: dataclasses as dicts, everything else as it is."""
    return {name: asdict(v) if is_dataclass(v) else v for name, v in values.items()}


def subclass_arguments(module: nn.Module, frame: FrameType | None, skip: set[str]) -> dict[str, Any]:
    """The ``__init__`` arguments of ``module``'s subclasses, read from the frames that called ``frame``'s
    ``__init__`` (each ``super().__init__(...)`` call below ``type(module).__init__``), as plain data.

    Callables (an optimiser factory, a function) are left out: the run's ``config.yaml`` records them and a
    checkpoint's hyper-parameters load with ``torch.load(weights_only=True)``.
    """
    found: dict[str, Any] = {}
    frame = frame.f_back if frame is not None else None
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is module:
        arguments = {k: v for k, v in get_init_args(frame).items() if k not in skip and not callable(v)}
        found = {**plain_data(**arguments), **found}  # the outermost subclass's value wins, as its __init__ ran last
        frame = frame.f_back
    return found


def check_options(
    config: LoopedConfig,
    warmup_steps: int,
    decay_steps: int | None,
    min_lr_ratio: float,
    loop_schedule: LoopSchedule | None,
    exit: ExitObjective | None,
    activation_checkpointing: bool,
) -> None:
    """``LoopedLM``'s arguments that are wrong alone or together, each named as a recipe sets it, with the fix."""
    for name, value, ok, need in (
        ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"),
        ("decay_steps", decay_steps, decay_steps is None or decay_steps >= 1, ">= 1 or null (trainer.max_steps)"),
        ("min_lr_ratio", min_lr_ratio, 0.0 <= min_lr_ratio <= 1.0, "in [0, 1], a fraction of the peak"),
    ):
        if not ok:
            raise InputError(f"model.init_args.{name} must be {need}, got {value}")
    if exit is not None and not config.exit_gate:
        raise InputError(
            "model.init_args.exit trains a halting gate the model does not have; set "
            "model.init_args.config.exit_gate: true (or remove model.init_args.exit)"
        )
    if exit is not None and loop_schedule is not None and loop_schedule.per_loop_loss_weight > 0:
        raise InputError(
            "model.init_args.loop_schedule.per_loop_loss_weight: the exit objective already weights every "
            "loop's loss; set it to 0 (or remove model.init_args.exit)"
        )
    if activation_checkpointing and config.lora_rank > 0:
        # The checkpoint hooks recompute a layer with its own (shared) weights, not loop n's W + B·A.
        raise InputError(
            "model.init_args.activation_checkpointing: cannot recompute a block applied with per-loop LoRA "
            f"({MODEL_CONFIG}.lora_rank: {config.lora_rank}); turn one of the two off"
        )
    if activation_checkpointing and config.kv_sharing:
        # Recomputing loop 1's layers in backward would read the keys the first forward left in SharedKV.
        raise InputError(
            "model.init_args.activation_checkpointing: cannot recompute a block whose later loops read loop 1's "
            f"keys ({MODEL_CONFIG}.kv_sharing: true); turn one of the two off"
        )


_TRANSFORMER_ON_META: ContextVar[bool] = ContextVar("transformer_on_meta", default=False)


@contextmanager
def transformer_on_meta(enabled: bool = True) -> Iterator[None]:
    """``LoopedLM``s built inside get their transformer on the meta device (no memory, no init).

    For FSDP2 (``ModelParallelStrategy``): ``configure_model`` shards the empty model and each rank
    materialises only its shards, so no rank ever holds the full model. Unlike
    ``trainer.init_module(empty_init=True)`` this leaves the rest of the module (metrics) real, and
    it needs no trainer, so ``LoopedCLI`` wraps the recipe's instantiation in it.
    """
    token = _TRANSFORMER_ON_META.set(enabled)
    try:
        yield
    finally:
        _TRANSFORMER_ON_META.reset(token)


class LoopedLM(L.LightningModule):
    """Train and evaluate a looped transformer.

    Args:
        config: the architecture (``vocab_size`` and ``max_seq_len`` are linked from the data module).
        optimizer: a callable that builds the optimiser from parameter groups, e.g. in a recipe
            ``{class_path: torch.optim.Adafactor, init_args: {lr: 0.001}}``. Weight decay applies only
            to matrices; norms, biases and embeddings get none.
        warmup_steps: linear warmup length in optimiser steps.
        decay_steps: end of the cosine decay (default: ``trainer.max_steps``).
        min_lr_ratio: learning rate at the end of the decay, as a fraction of the peak.
        regularizer: the paper's block cosine regulariser (Table 4), for an unshared model
            (``loops: 1``); None: off.
        loop_schedule: random loop counts, truncated backpropagation and a per-loop loss
            for training; None: always the config's L with full backpropagation (the paper).
        eos_id: end-of-sequence token of a task scored by generation (linked from the data
            module's ``eos_id`` by ``LoopedCLI``); evaluation batches with ``prompt_len`` are then
            greedily decoded and the token before the first ``eos_id`` is scored against ``answer``.
        activation_checkpointing: recompute each layer application in backward (``looped.training.parallel``).
        compile: ``torch.compile`` each layer (``looped.training.parallel``).
        exit: train the model's halting gate (``config.exit_gate``) with a learned-exit objective
            (``looped.training.halting.ExitObjective``: ouro, pondernet or act) in place of the last loop's loss;
            ``ouro_stage2`` trains the gate alone, every other parameter frozen.
        init_weights: start training from this checkpoint's weights (a ``.ckpt`` file), not from a fresh
            initialisation — not its optimiser, step or data position (``--ckpt_path`` resumes those). For a
            second stage, e.g. Ouro's gate training on a first-stage model; the checkpoint may lack the exit gate.
            A ``looped retrofit`` checkpoint starts a retrofitted model this way (docs/retrofit.md).
        train_only: train only the transformer's parameters whose names start with one of these, every other
            frozen, e.g. ``[lora.]``: a relaxed model's per-loop LoRA trained alone. None: all train.
    """

    def __init__(
        self,
        config: LoopedConfig,
        optimizer: OptimizerFactory = adamw,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        regularizer: BlockRegularizer | None = None,
        loop_schedule: LoopSchedule | None = None,
        eos_id: int | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        exit: ExitObjective | None = None,
        init_weights: str | None = None,
        train_only: list[str] | None = None,
    ) -> None:
        super().__init__()
        # A checkpoint's hyper-parameters are plain dicts (they load with torch.load(weights_only=True)).
        config = as_dataclass(LoopedConfig, config)
        regularizer = as_dataclass(BlockRegularizer, regularizer)
        loop_schedule = as_dataclass(LoopSchedule, loop_schedule)
        exit = as_dataclass(ExitObjective, exit)
        check_options(config, warmup_steps, decay_steps, min_lr_ratio, loop_schedule, exit, activation_checkpointing)
        # The optimiser is a callable: the run's config.yaml records it, the checkpoint does not.
        # A subclass's own arguments are saved too, so load_from_checkpoint rebuilds the subclass.
        own = plain_data(
            config=config,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            min_lr_ratio=min_lr_ratio,
            regularizer=regularizer,
            loop_schedule=loop_schedule,
            eos_id=eos_id,
            activation_checkpointing=activation_checkpointing,
            compile=compile,
            exit=exit,
            init_weights=init_weights,
            train_only=train_only,
        )
        self.save_hyperparameters({**subclass_arguments(self, inspect.currentframe(), skip={*own, "optimizer"}), **own})
        self.config, self.optimizer_factory, self.eos_id = config, optimizer, eos_id
        self.warmup_steps, self.decay_steps, self.min_lr_ratio = warmup_steps, decay_steps, min_lr_ratio
        self.regularizer, self.loop_schedule, self.exit = regularizer, loop_schedule or LoopSchedule(), exit
        self.init_weights = init_weights
        # Scaling out (looped.training.parallel): applied in configure_model, where the strategy's mesh is known.
        self.activation_checkpointing, self.compile_layers = activation_checkpointing, compile
        with torch.device("meta") if _TRANSFORMER_ON_META.get() else nullcontext():
            self.model = LoopedTransformer(config)
        if exit is not None and exit.trains_only_the_gate:
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith("exit_gate."))
        if train_only is not None:
            names = [name for name, _ in self.model.named_parameters()]
            unknown = [prefix for prefix in train_only if not any(n.startswith(prefix) for n in names)]
            if unknown:
                raise InputError(
                    f"model.init_args.train_only: {unknown} names no parameter of this model; give prefixes of its "
                    f"parameter names, such as {sorted({n.split('.')[0] + '.' for n in names})}"
                )
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith(tuple(train_only)))
        if regularizer is not None:
            regularizer.check(self.model.block)
        self.val_metrics, self.test_metrics = self.make_metrics(), self.make_metrics()
        # Per named evaluation set, made in setup() from the data module's eval_names: {stage: {name: metrics}}.
        self.eval_names: list[str] = []
        self.eval_set_metrics = nn.ModuleDict({"val": nn.ModuleDict(), "test": nn.ModuleDict()})
        self._batch_shape: tuple[int, int] | None = None
        self._samples_logged = False  # decoded samples go to TensorBoard once per evaluation
        self._loops_this_step = config.loops  # what the last training step ran (random with a loop_schedule)
        self.training_flops = 0.0  # counted so far, every rank (train/flops): MoR's equal-training-FLOPs axis
        self.eval_pass: EvalPass | None = None  # this evaluation batch's one forward, for the loop readers

    def make_metrics(self) -> nn.ModuleDict:
        """One fresh set of evaluation metrics (per stage, and per named evaluation set)."""
        vocab = self.config.vocab_size
        # On the CPU, not on init_module(empty_init=True)'s meta device: metric states cannot be re-initialised.
        with torch.device("cpu"):
            metrics = {
                "exact_match": MulticlassExactMatch(num_classes=vocab, ignore_index=IGNORE),
                "token_accuracy": MulticlassAccuracy(num_classes=vocab, ignore_index=IGNORE, average="micro"),
                "loss": MeanMetric(),
                "perplexity": Perplexity(),
            }
            if self.eos_id is not None:
                metrics["answer_accuracy"] = MeanMetric()  # mean of 0/1 correctness = accuracy
            return nn.ModuleDict(metrics)

    # -- forward and loss -------------------------------------------------------
    def forward(self, input_ids: Tensor, loops: int | None = None, return_loop_states: bool = False):
        return self.model(input_ids, loops=loops, return_loop_states=return_loop_states)

    def compute_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._batch_shape = tuple(batch["input_ids"].shape)
        schedule = self.loop_schedule
        loops = schedule.sample(self.config.loops, self.global_step)
        grad_loops = schedule.grad_loops_at(self.global_step)
        self._loops_this_step = loops
        labels = batch["labels"]
        router = self.model.router
        if router is not None:
            router.step = self.global_step  # the capacity warm-up's clock
        if self.exit is not None:
            loss = self.exit_loss(batch["input_ids"], labels, loops, grad_loops)
        elif schedule.per_loop_loss_weight > 0:
            logits, states = self.model(batch["input_ids"], loops=loops, return_loop_states=True, grad_loops=grad_loops)
            loss = self.compute_loss(logits, labels)
            trained = states[-(grad_loops or loops) : -1]  # loops with gradients, but the last
            if trained:
                aux = torch.stack([self.compute_loss(self.model.readout(s), labels) for s in trained]).mean()
                self.log("train/per_loop_loss", aux)
                loss = loss + schedule.per_loop_loss_weight * aux
        else:
            logits = self.model(batch["input_ids"], loops=loops, grad_loops=grad_loops)
            loss = self.compute_loss(logits, labels)
        if router is not None:  # Mixture-of-Recursions' auxiliary and z-losses of this forward
            self.log_dict({f"train/router_{name}": value.detach() for name, value in router.losses.items()})
            loss = loss + router.loss()
        if self.regularizer is not None:
            penalty = self.regularizer.penalty(self.model.block)
            self.log("train/regularizer", penalty)
            loss = loss + self.regularizer.weight * penalty
        if schedule.distribution != "fixed" or schedule.curriculum != "none":
            self.log("train/loops", float(loops))
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.count_training_flops()
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """Stop before a non-finite loss updates the weights, naming what to change."""
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {self.global_step}, so training stopped before this "
                "step's update. Lower the learning rate (model.init_args.optimizer.init_args.lr), lengthen "
                "model.init_args.warmup_steps, or train in trainer.precision 32-true or bf16-mixed instead of "
                "16-mixed, and start again: resuming restores the checkpoint's optimiser and learning rate and "
                "replays the same batches, so it would stop here again"
            )

    def count_training_flops(self) -> None:
        """Add this step's FLOPs (every rank's) to ``train/flops``. Called after the forward: a token-choice
        router's loop sizes are this batch's (``flops_per_token`` reads them)."""
        ranks = self.trainer.world_size if self._trainer is not None else 1
        self.training_flops += self.flops_per_batch * ranks
        self.log("train/flops", self.training_flops, reduce_fx="max")

    def exit_loss(self, input_ids: Tensor, labels: Tensor, loops: int, grad_loops: int | None = None) -> Tensor:
        """The ``exit`` objective (``looped.training.halting``) from each loop's loss and halting logit at the
        labels."""
        _, states = self.model(input_ids, loops=loops, return_loop_states=True, grad_loops=grad_loops)
        mask = labels != IGNORE
        target = labels[mask]
        losses = torch.stack(
            [F.cross_entropy(self.model.readout(s, positions=mask).float(), target, reduction="none") for s in states]
        )
        halts = torch.stack([self.model.halt_logits(s[mask]) for s in states])
        self.log("train/exit_expected_loops", expected_loops(halts.detach()))
        self.log("train/last_loop_loss", losses[-1].detach().mean())
        return self.exit.loss(losses, halts)

    def eval_depth(self, stage: str) -> int | None:
        """Loops of the shared evaluation pass: the deepest any loop-reading callback reads at ``stage``
        (``"val"``, ``"test"``), at least the trained L; None when no callback reads loops then."""
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        readers = [cb.loops_to_read(self, stage) for cb in callbacks if isinstance(cb, ReadsLoops)]
        readers = [loops for loops in readers if loops > 0]
        return max([self.config.loops, *readers]) if readers else None

    def _eval_step(self, batch: dict[str, Tensor], metrics: nn.ModuleDict, stage: str, dataloader_idx: int = 0) -> None:
        labels = batch["labels"]
        depth, loops = self.eval_depth(stage), self.config.loops
        if depth is None:
            logits = self(batch["input_ids"])
        else:  # one pass for this step's metrics (read at L) and every loop-reading callback
            # The readers need each loop's state at the labelled positions only (unless a coda follows).
            picked = labelled_states_suffice(self.model)
            logits, states = self.model(
                batch["input_ids"],
                loops=depth,
                return_loop_states=True,
                readout_after=loops,
                state_positions=labels != IGNORE if picked else None,
            )
            self.eval_pass = EvalPass(self.model, batch["input_ids"], labels, states, picked)
        answer_right = self.answer_correct(batch) if "prompt_len" in batch else None
        self.update_metric_groups(batch, logits, metrics, stage, dataloader_idx, answer_right)

    def update_metric_groups(
        self,
        batch: dict[str, Tensor],
        logits: Tensor,
        metrics: nn.ModuleDict,
        stage: str,
        dataloader_idx: int,
        answer_right: Tensor | None = None,
    ) -> None:
        """Count one batch's ``logits`` towards the stage's overall metrics and those of its named set."""
        labels = batch["labels"]
        loss, tokens = self.compute_loss(logits, labels), (labels != IGNORE).sum()
        # Exact match over the whole sequence: positions with no label count as right.
        preds = logits.argmax(-1)
        if answer_right is None:
            self.maybe_log_samples(batch, preds)
        groups = [metrics]
        if self.eval_names:
            groups.append(self.eval_set_metrics[stage][self.eval_set_name(dataloader_idx)])
        for group in groups:
            group["loss"].update(loss, weight=tokens)
            group["perplexity"].update(loss, weight=tokens)
            group["exact_match"].update(preds, labels)
            group["token_accuracy"].update(preds, labels)
            if answer_right is not None:
                group["answer_accuracy"].update(answer_right.float())

    def _log_eval_metrics(self, metrics: nn.ModuleDict, stage: str) -> None:
        """``{stage}/{metric}`` over all batches and ``{stage}/{metric}_{name}`` per named set.

        Logged once per epoch, not per step: Lightning refuses one key logged from
        several dataloaders, and the overall metric spans all of them.
        """
        groups = [("", metrics), *((f"_{name}", group) for name, group in self.eval_set_metrics[stage].items())]
        for suffix, group in groups:
            for name, metric in group.items():
                if metric.update_called:  # answer_accuracy only for tasks scored by generation
                    self.log(f"{stage}/{name}{suffix}", metric, prog_bar=name == "exact_match" and not suffix)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_metrics, "val", dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics, "test", dataloader_idx)

    def eval_set_name(self, dataloader_idx: int) -> str:
        if dataloader_idx >= len(self.eval_names):
            raise ValueError(
                f"evaluation dataloader {dataloader_idx} has no name: the data module's eval_names "
                f"{self.eval_names} must name every loader its val_dataloader()/test_dataloader() returns"
            )
        return self.eval_names[dataloader_idx]

    # -- scoring by generation -------------------------------------------------------
    def generate_answers(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Greedy continuation ``[b n]`` of each prompt and its final answer ``[b]``
        (``looped.evaluation.generation``)."""
        return generate_answers(self.model, batch, self.eos_id)

    def answer_correct(self, batch: dict[str, Tensor]) -> Tensor:
        """Bool ``[b]``: the greedy-decoded final answer equals ``batch["answer"]``."""
        continuation, predicted = self.generate_answers(batch)
        self.maybe_log_samples(batch, continuation=continuation)
        return predicted == batch["answer"]

    def maybe_log_samples(
        self, batch: dict[str, Tensor], preds: Tensor | None = None, continuation: Tensor | None = None
    ) -> None:
        """Log samples from the first evaluation batch of each validation or test run (not the sanity check)."""
        if self._trainer is None or self.trainer.sanity_checking or self._samples_logged:
            return
        self._samples_logged = True
        self.log_samples(batch, preds, continuation)

    def log_samples(
        self,
        batch: dict[str, Tensor],
        preds: Tensor | None = None,
        continuation: Tensor | None = None,
        n: int = 4,
        chars: int = 400,
    ) -> None:
        """A few samples, ``decode``d by the data module, with the model's answers as TensorBoard text.

        Tasks scored by generation show prompt, greedy continuation and gold; the others show the
        input and, at the labelled positions, the model's argmax prediction and the gold tokens.
        """
        data: DataModuleContract | None = self.trainer.datamodule
        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if data is None or not loggers or not self.trainer.is_global_zero:
            return
        rows = sample_rows(data.decode, batch, preds, continuation, n, chars)
        stage = "test" if self.trainer.testing else "val"
        for logger in loggers:
            logger.experiment.add_text(f"{stage}/samples", "\n\n".join(rows), global_step=self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._samples_logged = False

    def on_test_epoch_start(self) -> None:
        self._samples_logged = False

    def on_validation_epoch_end(self) -> None:  # after the callbacks' (Lightning calls them first)
        self._log_eval_metrics(self.val_metrics, "val")
        self.eval_pass = None

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics(self.test_metrics, "test")
        self.eval_pass = None

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"]).argmax(-1)

    # -- scaling out -------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2 under ``ModelParallelStrategy`` (its ``device_mesh``), plus checkpointing/compile if asked.

        A model built on the meta device (``with trainer.init_module(empty_init=True): LoopedLM(...)``)
        is sharded first, then each rank materialises only its shards. Without a mesh and
        without those flags this does nothing. Idempotent: fit then test shards once.
        """
        from looped.training.parallel import is_meta, materialize, mixed_precision_policy, parallelize

        if getattr(self, "_parallelized", False):
            return
        mesh = self.device_mesh
        if mesh is None and not (self.activation_checkpointing or self.compile_layers):
            return
        meta = is_meta(self.model)
        precision = self.trainer.precision if self._trainer is not None else "32-true"
        policy = mixed_precision_policy(precision) if mesh is not None else None
        parallelize(self.model, mesh, self.activation_checkpointing, self.compile_layers, mp_policy=policy)
        if meta:
            materialize(self.model, self.trainer.strategy.root_device if self._trainer is not None else self.device)
        self._parallelized = True

    # -- checks before compute ----------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_weights:  # a resumed run's --ckpt_path restores over these later
            if any(p.is_meta for p in self.model.parameters()):
                raise InputError(
                    "model.init_args.init_weights: a model built on the meta device for FSDP2 cannot load full "
                    "weights; run the second stage on one device (trainer.strategy: auto)"
                )
            load_weights(self, self.init_weights, "model.init_args.init_weights", may_lack=("model.exit_gate.",))
        data: DataModuleContract | None = self.trainer.datamodule if self._trainer is not None else None
        if data is None:
            return  # trained on bare dataloaders: nothing to check
        check_data_module(data)
        self.set_eval_names(list(data.eval_names))
        if data.vocab_size > self.config.vocab_size:
            raise InputError(
                f"vocabulary mismatch: the data has {data.vocab_size} token ids but "
                f"model.init_args.config.vocab_size={self.config.vocab_size}; drop the override and let the "
                "recipe link vocab_size from the data module"
            )
        if data.seq_len > self.config.max_seq_len:
            raise InputError(
                f"the data's sequences have {data.seq_len} positions but model.init_args.config.max_seq_len="
                f"{self.config.max_seq_len}; raise max_seq_len or shorten the data"
            )

    def set_eval_names(self, names: list[str]) -> None:
        """Metrics per named evaluation set. Runs in ``setup``, before Lightning moves the module to its device."""
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n and "." not in n for n in names):
            raise InputError(f"data.eval_names must be distinct non-empty names without '.', got {names}")
        if names == self.eval_names:
            return
        self.eval_names = names
        for stage in ("val", "test"):
            self.eval_set_metrics[stage] = nn.ModuleDict({name: self.make_metrics() for name in names})

    # -- optimisation ---------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices of linear layers only (not norms, biases or embeddings)."""
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay, seen = [], [], set()
        for p in self.model.parameters():
            if id(p) in seen or not p.requires_grad:
                continue  # tied weights appear twice
            seen.add(id(p))
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        decay_steps = self.decay_steps
        if decay_steps is None:
            # max_steps, not estimated_stepping_batches: reading the latter builds the
            # train dataloader early, which drops a streaming loader's restored state.
            decay_steps = self.trainer.max_steps
            if decay_steps is None or decay_steps < 0:
                raise InputError(
                    "the cosine schedule needs an end: set trainer.max_steps or model.init_args.decay_steps"
                )
        # max(step, global_step): an optimiser rebuilt mid-run (gradual stacking) continues
        # the schedule where training is, instead of warming up again.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(max(step, self.global_step), self.warmup_steps, decay_steps, self.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_end(self) -> None:
        # The total at the last step: the logger connector writes only every log_every_n_steps.
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({"train/flops": self.training_flops}, step=self.global_step)

    # -- exact resume ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores weights, optimiser, schedule and loop counters but not the
        # RNG that dropout draws from; without it a resumed run diverges at once.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        # The tokenizer the data was prepared with (data modules that have one, e.g. the Pile's), so that
        # a later run on differently tokenized data is refused (looped.training.checkpoint.check_same_data).
        sha = getattr(self.trainer.datamodule, "tokenizer_sha256", None) if self._trainer is not None else None
        if sha:
            checkpoint["data"] = {"tokenizer_sha256": sha}
        checkpoint["training_flops"] = self.training_flops

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # before the weights load: a mismatch is named, not a shape error
            check_same_data(checkpoint, self.trainer.datamodule, self.config, where="the checkpoint")
        self.training_flops = checkpoint.get("training_flops", 0.0)
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

    # -- throughput ---------------------------------------------------------------------
    @property
    def flops_per_batch(self) -> int | None:
        """Training FLOPs of the last batch (3 × forward), read by Lightning's ThroughputMonitor for MFU."""
        if self._batch_shape is None:
            return None
        batch, seq_len = self._batch_shape
        return 3 * batch * seq_len * self.model.flops_per_token(seq_len, loops=self._loops_this_step)
