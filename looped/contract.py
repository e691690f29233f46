"""What data modules, ``LoopedLM`` and the callbacks agree on, in one place that imports none of them.

A batch is ``{"input_ids": [b t], "labels": [b t]}`` (int64), with ``labels``
``IGNORE`` where there is no loss. Batches of tasks scored by generation also
carry ``prompt_len`` ``[b]`` and ``answer`` ``[b]`` (``looped.evaluation.generation``).

A data module is any ``LightningDataModule`` that also has the members of
``DataModuleContract``: the CLI links ``vocab_size``, ``seq_len`` and
``eos_id`` into the model, ``LoopedLM`` names its per-set metrics after
``eval_names`` and shows ``decode``d samples in TensorBoard.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

IGNORE = -100
"""Label of positions without loss (PyTorch ``cross_entropy``'s ``ignore_index``)."""


class DataModuleContract(Protocol):
    """The members ``LoopedLM``, ``LoopedCLI`` and the callbacks read from a data module."""

    vocab_size: int
    """Token ids are ``0 .. vocab_size - 1``; linked into ``LoopedConfig.vocab_size``."""
    seq_len: int
    """Positions of every ``input_ids`` row; linked into ``LoopedConfig.max_seq_len``."""
    eval_names: list[str]
    """Names of the validation/test loaders, in order (``val/exact_match_<name>``); ``[]``: one unnamed loader."""
    eos_id: int | None
    """The token that ends a sequence or an answer (tasks scored by generation decode up to it); None: none."""

    def decode(self, ids: Sequence[int]) -> str:
        """Readable text of a row of token ids (for the samples logged to TensorBoard)."""
        ...


@runtime_checkable
class ReadsLoops(Protocol):
    """A callback that reads every loop's prediction of each evaluation batch (``PerLoopAccuracy``,
    ``AdaptiveExit``, ``LoopDynamics``). ``LoopedLM`` runs each evaluation batch once, to the deepest
    loop any of them reads at that stage, and shares the pass (``looped.evaluation.loop_readout``)."""

    def loops_to_read(self, pl_module: Any, stage: str) -> int:
        """Loops it reads at ``stage`` (``"val"`` or ``"test"``); 0: none."""
        ...


CONTRACT_MEMBERS = ("vocab_size", "seq_len", "eval_names", "eos_id", "decode")


def check_data_module(data: object) -> None:
    """Raise a ``TypeError`` naming every member of ``DataModuleContract`` that ``data`` lacks.

    Looked up statically (``inspect.getattr_static``): a property such as the Pile module's
    ``vocab_size`` reads files, and its errors belong to the moment it is read, not to this check.
    """
    missing = []
    for name in CONTRACT_MEMBERS:
        try:
            inspect.getattr_static(data, name)
        except AttributeError:
            missing.append(name)
    if missing:
        raise TypeError(
            f"data: {type(data).__name__} lacks {', '.join(missing)} of looped.contract.DataModuleContract; "
            "subclass looped.datamodules.SyntheticTask, or add them (eval_names = [] and eos_id = None "
            "when the task has neither)"
        )


def batch_size(batch: dict[str, Tensor]) -> int:
    """Samples in a batch (for Lightning's ``ThroughputMonitor(batch_size_fn=...)``)."""
    return batch["input_ids"].shape[0]


def batch_tokens(batch: dict[str, Tensor]) -> int:
    """Tokens in a batch (for ``ThroughputMonitor(length_fn=...)``: tokens/s)."""
    return batch["input_ids"].numel()
