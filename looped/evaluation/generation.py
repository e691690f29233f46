"""Scoring by generation: greedy decoding of a prompt, the final answer, and readable samples.

A task scored by generation (the chain-of-thought DP tasks) has evaluation batches with
``prompt_len`` [b] (prompts left-padded to one length) and ``answer`` [b] (the gold final
token): the model continues ``input_ids[:, :prompt_len]`` greedily with its decode cache, and
its answer is the token right before the first ``eos_id``. ``LoopedLM`` calls these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from looped.model import LoopedTransformer


def final_answer(continuation: Tensor, eos_id: int) -> Tensor:
    """The token right before the first ``eos_id`` of each row of ``[b n]``; -1 when there is none."""
    if continuation.shape[1] == 0:  # nothing was generated (prompt_len == t): no answer
        return continuation.new_full(continuation.shape[:1], -1)
    is_eos = continuation == eos_id
    first = is_eos.int().argmax(dim=1)  # index of the first eos (0 when there is none)
    before = continuation.gather(1, (first - 1).clamp(min=0)[:, None])[:, 0]
    return torch.where(is_eos.any(dim=1) & (first > 0), before, torch.full_like(before, -1))


def generate_answers(model: LoopedTransformer, batch: dict[str, Tensor], eos_id: int | None) -> tuple[Tensor, Tensor]:
    """Greedy continuation ``[b n]`` of each prompt and its final answer ``[b]`` (-1: no eos emitted).

    The prompt is ``input_ids[:, :prompt_len]``; decoding runs with the model's decode cache
    for at most the gold sequence's remaining ``t - prompt_len`` tokens.
    """
    if eos_id is None:
        raise ValueError(
            "the evaluation batches carry prompt_len (a task scored by generation) but LoopedLM.eos_id is None; "
            "give the data module an eos_id attribute (LoopedCLI links it) or set model.init_args.eos_id"
        )
    input_ids, prompt_len = batch["input_ids"], batch["prompt_len"]
    p = int(prompt_len[0])
    if not bool((prompt_len == p).all()):
        raise ValueError(
            f"prompt_len differs within a batch ({sorted(set(prompt_len.tolist()))}); the data module must "
            "left-pad the prompts of an evaluation set to one length"
        )
    out = model.generate(input_ids[:, :p], max_new_tokens=input_ids.shape[1] - p, eos_id=eos_id)
    continuation = out[:, p:]
    return continuation, final_answer(continuation, eos_id)


def sample_rows(
    decode: Callable[[list[int]], str],
    batch: dict[str, Tensor],
    preds: Tensor | None = None,
    continuation: Tensor | None = None,
    n: int = 4,
    chars: int = 400,
) -> list[str]:
    """Markdown rows of the first ``n`` samples: prompt / generated / gold, or input / predicted / gold.

    Without a ``continuation`` the prediction is ``preds`` (argmax) at the labelled positions
    (labels ≥ 0; the rest hold the ignore label).
    Each text keeps its last ``chars`` characters: the end holds the answer.
    """
    text = lambda ids: decode(ids.tolist())[-chars:]  # noqa: E731
    ids, labels = batch["input_ids"][:n].cpu(), batch["labels"][:n].cpu()
    if continuation is not None:
        p = int(batch["prompt_len"][0])
        return [
            f"prompt: `{text(row[:p])}`  \ngenerated: `{text(gen)}`  \ngold: `{text(row[p:])}`"
            for row, gen in zip(ids, continuation[:n].cpu())
        ]
    return [
        f"input: `{text(row)}`  \npredicted: `{text(pred[lab >= 0])}`  \ngold: `{text(lab[lab >= 0])}`"
        for row, pred, lab in zip(ids, preds[:n].cpu(), labels)
    ]
