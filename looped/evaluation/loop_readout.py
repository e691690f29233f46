"""Every loop's prediction at the labelled positions, from ONE forward: what every loop reader needs.

Per-loop accuracy and perplexity (``PerLoopAccuracy``), the exit rules (``AdaptiveExit``,
``looped.evaluation.exits``) and the loop dynamics (``LoopDynamics``) all read the same thing: the hidden
state after every loop, through the readout, at the labelled positions. ``per_loop_predictions``
computes it once per batch, as ``[n m]`` summaries per loop (never ``[n m v]`` distributions
beyond one chunk), and ``EvalPass`` shares it: ``LoopedLM``'s evaluation step runs each batch once,
to the deepest loop any callback reads (``looped.contract.ReadsLoops``), takes its own metrics at
the trained L from that pass and keeps it for the batch's callbacks (``loop_predictions``).

Dimension letters: n loop, b sample, m labelled position (over the whole batch), v vocabulary,
c loops read out together, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from looped.contract import IGNORE
from looped.decoding.exit_rules import entropy, kl_from_previous
from looped.training.halting import exit_distribution

READOUT_ELEMENTS = 1 << 24
"""Read out at most this many logits at once: a language model's labelled positions are every token, and
``[n m v]`` for 8 loops of 16 × 256 tokens and 4096 words would be half a gigabyte."""


@dataclass
class LoopPredictions:
    """What every loop predicts at the labelled positions of one batch."""

    preds: Tensor
    """``[n m]`` argmax after loop n+1."""
    kl: Tensor
    """``[n m]`` ``KL(p_{n+1} ‖ p_n)`` between consecutive loops; row 0 (no previous loop) is +inf."""
    correct: Tensor
    """``[n b]`` bool: every labelled position of sample b is right after loop n+1."""
    sample: Tensor
    """``[m]`` the sample each labelled position belongs to."""
    entropy: Tensor | None = None
    """``[n m]`` entropy ``H(p_{n+1})`` of the readout after loop n+1 (nats)."""
    exit_cdf: Tensor | None = None
    """``[n m]`` the learned gate's cumulative exit probability ``Σ_{j≤n+1} p(j)`` (models with ``exit_gate``)."""
    loss: Tensor | None = None
    """``[n m]`` cross-entropy of the label after loop n+1 (nats)."""
    top_prob: Tensor | None = None
    """``[n m]`` the probability of the argmax after loop n+1 (the logit lens' confidence)."""
    residual: Tensor | None = None
    """``[n m]`` the fixed-point residual ``‖h_{n+1} − h_n‖ / ‖h_n‖``; row 0 (no previous loop) is NaN."""

    @property
    def max_loops(self) -> int:
        return self.preds.shape[0]

    @property
    def batch_size(self) -> int:
        return self.correct.shape[1]

    def first(self, loops: int) -> LoopPredictions:
        """What the first ``loops`` loops predict (a deeper pass read by a shallower reader)."""
        if loops == self.max_loops:
            return self
        cut = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in cut.items():
            if name != "sample" and value is not None:
                cut[name] = value[:loops]
        return LoopPredictions(**cut)


def per_sample_all(flags: Tensor, sample: Tensor, batch_size: int) -> Tensor:
    """``[n m]`` bool → ``[n b]``: true where all of sample b's positions are (no positions: true)."""
    misses = torch.zeros(flags.shape[0], batch_size, device=flags.device)
    return misses.index_add_(1, sample, (~flags).float()) == 0


def per_sample_max(values: Tensor, sample: Tensor, batch_size: int) -> Tensor:
    """``[n m]`` → ``[n b]``: the largest value over sample b's positions (no positions: -inf)."""
    out = torch.full((values.shape[0], batch_size), float("-inf"), device=values.device, dtype=values.dtype)
    index = sample.expand_as(values)
    return out.scatter_reduce_(1, index, values, reduce="amax", include_self=True)


def labelled_states_suffice(model) -> bool:
    """Whether every loop's readout needs only the labelled positions' states: yes unless a coda, which
    attends over every position, sits between the loop and the head."""
    return len(model.coda) == 0


def readout_chunks(model, states: list[Tensor], picked: list[Tensor], mask: Tensor):
    """``[c m v]`` logits of consecutive loops at the labelled positions ``mask``, a chunk at a time, from the
    loop states ``[b t d]`` or, without a coda, their labelled positions ``picked`` ``[m d]``."""
    if labelled_states_suffice(model):
        # Several loops through the head at once: the labelled positions are usually few, so n small
        # readouts would cost n times the launches (on a busy CPU, the thread-pool wake-ups) for the
        # same arithmetic.
        labelled = len(picked[0]) if picked else 0
        per_call = max(1, READOUT_ELEMENTS // max(1, labelled * model.config.vocab_size))
        for i in range(0, len(picked), per_call):
            yield model.readout(torch.stack(picked[i : i + per_call]))
    else:  # the coda attends over every position, so each loop needs its own readout
        for state in states:
            yield model.readout(state, positions=mask)[None]


@torch.no_grad()
def per_loop_predictions(
    model,
    input_ids: Tensor,
    labels: Tensor,
    max_loops: int,
    states: list[Tensor] | None = None,
    picked: bool = False,
) -> LoopPredictions:
    """Read every loop out at the labelled positions; the model runs once for ``max_loops`` loops
    unless ``states`` (its loop states of this batch, from such a forward) are given — ``picked``: already
    at the labelled positions only (``[m d]`` each, ``forward(state_positions=...)``; models without a coda)."""
    mask = labels != IGNORE
    if states is None:
        _, states = model(input_ids, loops=max_loops, return_loop_states=True)
    states = states[:max_loops]
    at_labels = states if picked else [state[mask] for state in states]  # [m d] per loop
    sample = mask.nonzero()[:, 0]
    target = labels[mask]
    summaries: dict[str, list[Tensor]] = {key: [] for key in ("preds", "kl", "entropy", "loss", "top_prob")}
    previous = None
    for chunk in readout_chunks(model, states, at_labels, mask):
        # float32: a KL threshold of 1e-3 is below bf16's resolution of a log-probability.
        logprobs = chunk.float().log_softmax(-1)  # [c m v]
        top, preds = logprobs.max(-1)
        summaries["preds"].append(preds)
        summaries["top_prob"].append(top.exp())
        summaries["entropy"].append(entropy(logprobs))
        summaries["loss"].append(-logprobs.gather(-1, target.expand(len(logprobs), -1)[..., None]).squeeze(-1))
        before = torch.cat([logprobs[:1] if previous is None else previous[None], logprobs[:-1]])
        kl = kl_from_previous(logprobs, before)
        if previous is None:
            kl[0] = float("inf")
        summaries["kl"].append(kl)
        previous = logprobs[-1]
    out = {key: torch.cat(values) for key, values in summaries.items()}
    picked = torch.stack(at_labels).float()  # [n m d]
    residual = torch.full(picked.shape[:2], float("nan"), device=picked.device)
    residual[1:] = (picked[1:] - picked[:-1]).norm(dim=-1) / picked[:-1].norm(dim=-1).clamp(min=1e-12)
    exit_cdf = None
    if getattr(model, "exit_gate", None) is not None:
        halts = torch.stack([model.halt_logits(state) for state in at_labels])
        exit_cdf = exit_distribution(halts.float()).cumsum(0)
    return LoopPredictions(
        correct=per_sample_all(out["preds"] == target, sample, len(labels)),
        sample=sample,
        exit_cdf=exit_cdf,
        residual=residual,
        **out,
    )


class EvalPass:
    """One evaluation batch run once, to ``depth`` loops; its per-loop readout made once, on first use."""

    def __init__(self, model, input_ids: Tensor, labels: Tensor, states: list[Tensor], picked: bool = False) -> None:
        self.model, self.input_ids, self.labels, self.states, self.picked = model, input_ids, labels, states, picked
        self._predictions: LoopPredictions | None = None

    @property
    def depth(self) -> int:
        return len(self.states)

    def predictions(self, loops: int) -> LoopPredictions:
        if self._predictions is None:
            self._predictions = per_loop_predictions(
                self.model, self.input_ids, self.labels, self.depth, self.states, self.picked
            )
        return self._predictions.first(loops)


def loop_predictions(pl_module, batch: dict[str, Tensor], loops: int) -> LoopPredictions:
    """Every loop's readout of ``batch`` up to ``loops``: from the module's shared ``EvalPass`` of this batch
    when it ran one deep enough, else from a forward of its own."""
    shared = getattr(pl_module, "eval_pass", None)
    if isinstance(shared, EvalPass) and shared.input_ids is batch["input_ids"] and shared.depth >= loops:
        return shared.predictions(loops)
    return per_loop_predictions(pl_module.model, batch["input_ids"], batch["labels"], loops)
