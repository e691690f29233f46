"""The one loop step: loop n of the shared block, applied to the rows still looping.

Every path that applies the block — the training forward, evaluation's shared pass (the same
forward), both decoding schedules (``looped.decoding``) and the ``transformers`` model (``looped.hf``,
our forward) — calls ``LoopedTransformer.loop_step(x, LoopStep(...))``, and that method is the only
place the block's k layers run. A ``LoopStep`` is everything an application depends on besides the
hidden state: which loop it is, the loop's input (for input injection), the cache slot of each block
layer, the padding, loop 1's keys (KV sharing) and which rows of the batch are active. What depends
on the loop belongs there, once: the per-loop LoRA (``looped/model/lora.py``) reads ``step.loop``; a router that
picks tokens gathers them there (``routing``: ``looped.model.router`` selects the tokens, the step gathers
them with their positions, runs the block and scatters the weighted updates back).

``DecodeSlots`` lays a ``DecodeCache``'s slots out as the forward uses them: the prelude's, one list
of k per loop, the coda's (``LoopedTransformer.decode_slots``).

Dimension letters: b batch, a active rows, t time, d model width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from looped.model.cache import LayerCache, RaggedSlot, RowSlot, SharedKV
from looped.model.mixers import Padding
from looped.model.router import Routing

Slot = LayerCache | RowSlot | RaggedSlot | None  # what one layer application reads and extends


@dataclass
class LoopStep:
    """One application of the shared block (``LoopedTransformer.loop_step``)."""

    loop: int | Tensor = 1
    """n, 1-based: which loop this is; ``[a]`` when every row is at its own loop (depth-wise decoding)."""
    loop_input: Tensor | None = None
    """``[a t d]`` the loop's input, re-added before every loop after the first (``input_injection: add``)."""
    slots: Sequence[Slot] | None = None
    """The decode-cache slot of each of the block's k layers for this application (None: no cache)."""
    padding: Padding | None = None
    """The active rows' padding (a padded batch), None when nothing is padded."""
    shared: Sequence[SharedKV | None] | None = None
    """Loop 1's keys and values per block layer (``kv_sharing``), for the whole batch."""
    rows: Tensor | None = None
    """The active rows (indices into the batch; None: every row). ``x`` holds just those rows; the step
    narrows ``slots`` and ``shared`` to them, so a row that stopped looping costs nothing."""
    high: bool = False
    """Run HRM's high-level module (``LoopedTransformer.high``, ``recursion: hrm``) instead of the block."""
    routing: Routing | None = None
    """This forward's token router (``LoopedConfig.router``): the block then runs on the tokens it selects
    for this loop, gathered in causal order, and their weighted updates are scattered back."""

    def layer_slots(self, k: int) -> list[tuple[Slot, SharedKV | None]]:
        """Per block layer: its cache slot and shared keys, narrowed to the active rows."""
        slots = [None] * k if self.slots is None else [None if s is None else narrow(s, self.rows) for s in self.slots]
        shared = [None] * k if self.shared is None else [None if s is None else s.rows(self.rows) for s in self.shared]
        return list(zip(slots, shared, strict=True))


def narrow(slot: Slot, rows: Tensor | None) -> Slot:
    """A slot restricted to ``rows`` (a ragged slot already addresses each row itself)."""
    return slot.rows(rows) if isinstance(slot, LayerCache) else slot


@dataclass
class DecodeSlots:
    """A ``DecodeCache``'s slots in the order a forward with ``len(loops)`` loops applies its layers."""

    prelude: list[LayerCache]
    loops: list[list[LayerCache]]
    """``[loop][block layer]``: with ``kv_sharing`` every loop holds the same k slots."""
    coda: list[LayerCache]

    @classmethod
    def split(cls, slots: list[LayerCache], prelude: int, block: int, loops: int, shared: bool) -> DecodeSlots:
        """From the cache's flat list: one slot per layer application, or per layer with ``shared`` (KV sharing)."""
        block_slots = slots[prelude : prelude + block]
        per_loop = (
            [block_slots] * loops
            if shared
            else [slots[prelude + n * block : prelude + (n + 1) * block] for n in range(loops)]
        )
        return cls(slots[:prelude], per_loop, slots[prelude + (1 if shared else loops) * block :])
