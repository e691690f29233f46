"""Recursive initialisations: an N-layer source's layers as a ``(p⊗1, k⊗L, c⊗1)`` with ``p + k·L + c ≤ N``.

The prelude is the source's first p layers, the coda its last c, copied. The M = N − p − c layers between
are the *middle*; the looped block's k·L applications stand for k·L of them spread evenly,
``int(linspace(p, N − c − 1, k·L))`` (all of them when k·L = M; the rest are dropped, as retrofitted
recurrence drops the layers between prelude, block and coda). Application a = n·k + j (loop n + 1, block
layer j) stands for middle layer ``stands_for[a]``. The k shared layers start as (Bae et al., *Relaxed
Recursive Transformers*, and Encode–Think–Decode):

* ``stepwise`` — the middle layers at ``int(linspace(p, N − c − 1, k))``: evenly spaced, the middle's first
  and last kept (truncated as numpy's ``astype(int)``: N = 18, k = 9 gives 0, 2, 4, 6, 8, 10, 12, 14, 17);
* ``lower`` — the middle's first k; ``upper`` — its last k;
* ``average`` — shared layer j is the mean of the layers its L applications stand for
  (``stands_for[n·k + j]`` over n), every weight and norm scale;
* ``random`` — a fresh initialisation (``LoopedTransformer.init_parameter``);
* ``angular`` — the k consecutive middle layers whose input and output hidden states on calibration text
  are closest in angle (mean over tokens of ``arccos(cos(x_in, x_out)) / π``): the span that changes the
  state least, looped (Encode–Think–Decode). Every candidate's distance is returned for the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from looped.errors import InputError
from looped.model import LoopedConfig, LoopedTransformer
from looped.model.lora import init_from_difference

INITS = ("stepwise", "lower", "upper", "average", "random", "angular")


@dataclass
class Shape:
    """``(p⊗1, k⊗L, c⊗1)`` cut from an N-layer source."""

    prelude: int
    block: int
    loops: int
    coda: int

    def check(self, n: int) -> None:
        """One-line ``InputError`` naming the flag when this shape cannot be cut from ``n`` layers."""
        for flag, value, least in (("--prelude", self.prelude, 0), ("--block", self.block, 1),
                                   ("--loops", self.loops, 1), ("--coda", self.coda, 0)):  # fmt: skip
            if value < least:
                raise InputError(f"{flag}: must be >= {least}, got {value}")
        used = self.prelude + self.block * self.loops + self.coda
        if used > n:
            raise InputError(
                f"--prelude/--block/--loops/--coda: p + k·L + c = {self.prelude} + {self.block}·{self.loops} + "
                f"{self.coda} = {used} exceeds the source's {n} layers; pick a shape with p + k·L + c <= {n}"
            )

    def stands_for(self, n: int) -> list[int]:
        """The source layer each of the block's k·L applications stands for (application n·k + j)."""
        return spread(self.prelude, n - self.coda - 1, self.block * self.loops)


def spread(first: int, last: int, count: int) -> list[int]:
    """``count`` layer indices evenly from ``first`` to ``last``, truncated: ``int(linspace(first, last, count))``."""
    if count == 1:
        return [first]
    return [int(first + a * (last - first) / (count - 1) + 1e-9) for a in range(count)]


@dataclass
class Recursive:
    """A retrofitted model's config and weights, and how its block was chosen."""

    config: LoopedConfig
    state: dict[str, Tensor]
    block_from: list[list[int]]
    """Per shared layer, the source layers its weights came from (one; L for average; none for random)."""
    stands_for: list[int]
    """Per application n·k + j, the source layer it replaces (what per-loop LoRA is initialised towards)."""
    distances: dict[int, float] = field(default_factory=dict)
    """angular: the distance of every candidate span, by its first layer."""


def recursive_init(
    config: LoopedConfig,
    layers: list[dict[str, Tensor]],
    globals_: dict[str, Tensor],
    shape: Shape,
    init: str,
    distances: dict[int, float] | None = None,
    seed: int = 0,
) -> Recursive:
    """The ``(p⊗1, k⊗L, c⊗1)`` state from the source's per-layer weights (``looped.convert.llama.Source``).

    ``angular`` needs ``distances`` (``angular_distances`` on calibration text), by a span's first layer.
    """
    if init not in INITS:
        raise InputError(f"--init: {init!r} is not one; choose from {', '.join(INITS)}")
    n = len(layers)
    shape.check(n)
    p, k, loops, c = shape.prelude, shape.block, shape.loops, shape.coda
    new = replace(config, prelude_layers=p, block_layers=k, loops=loops, coda_layers=c)
    stands_for = shape.stands_for(n)
    if init == "stepwise":
        block_from = [[i] for i in spread(p, n - c - 1, k)]
    elif init == "lower":
        block_from = [[p + j] for j in range(k)]
    elif init == "upper":
        block_from = [[n - c - k + j] for j in range(k)]
    elif init == "average":
        block_from = [[stands_for[m * k + j] for m in range(loops)] for j in range(k)]
    elif init == "angular":
        if not distances:
            raise InputError("--init angular: needs calibration text to measure spans on (--calibration FILE)")
        start = min(distances, key=distances.get)
        block_from = [[start + j] for j in range(k)]
    else:
        block_from = [[] for _ in range(k)]
    state = dict(globals_)
    for i in range(p):
        state.update({f"prelude.{i}.{name}": w for name, w in layers[i].items()})
    for i in range(c):
        state.update({f"coda.{i}.{name}": w for name, w in layers[n - c + i].items()})
    if init == "random":
        torch.manual_seed(seed)
        with torch.device("meta"):
            fresh = LoopedTransformer(replace(new, vocab_size=1, max_seq_len=1))
        for name, p_ in fresh.block.named_parameters():
            w = torch.empty(p_.shape)
            fresh.init_parameter(f"block.{name}", w)
            state[f"block.{name}"] = w
    else:
        for j, sources in enumerate(block_from):
            for name in layers[sources[0]]:
                state[f"block.{j}.{name}"] = torch.stack([layers[s][name] for s in sources]).mean(0)
    return Recursive(new, state, block_from, stands_for, dict(distances or {}))


@torch.no_grad()
def angular_distances(
    model: LoopedTransformer, input_ids: Tensor, span: int, first: int, last: int
) -> dict[int, float]:
    """Per candidate span of ``span`` consecutive layers within ``first..last`` of a plain ``(N⊗1)`` ``model``: the
    mean over tokens of ``arccos(cos(x_in, x_out)) / π`` between the span's input and output hidden states on
    ``input_ids`` ``[b t]``, by the span's first layer. One forward; hooks read every layer's output."""
    outputs: list[Tensor] = []
    hooks = [model.embed.register_forward_hook(lambda _m, _i, out: outputs.append(out))]
    hooks += [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in model.block]
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    # outputs[i] is the input of layer i (outputs[0]: the embeddings), outputs[i + 1] its output
    distances = {}
    for start in range(first, last - span + 2):
        cos = torch.nn.functional.cosine_similarity(outputs[start], outputs[start + span], dim=-1)
        distances[start] = float(torch.arccos(cos.clamp(-1.0, 1.0)).mean() / math.pi)
    return distances


@torch.no_grad()
def relax(model: LoopedTransformer, recursive: Recursive, layers: list[dict[str, Tensor]]) -> None:
    """Initialise ``model``'s per-loop LoRA (``lora_rank > 0``) from the layers each application replaces:
    loop n's adapters on block layer j make it ``layers[stands_for[n·k + j]]`` as far as the rank allows."""
    k = model.config.block_layers
    for n, per_layer in enumerate(model.lora.loops):
        for j, relaxation in enumerate(per_layer):
            shared = {name: p.detach() for name, p in model.block[j].named_parameters()}
            init_from_difference(relaxation, shared, layers[recursive.stands_for[n * k + j]])
