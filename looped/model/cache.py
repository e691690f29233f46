"""Decoding state: one slot per *layer application*, so generation costs one token per step.

A looped model applies its shared block L times, and every application sees a
different residual stream, so it has its own keys and values (or recurrent
state): a block of k layers looped L times owns ``k·L`` slots, prelude and coda
layers one each. ``DecodeCache`` holds those slots in the order the forward pass
applies the layers; each mixer reads and extends its own ``LayerCache``.

A model with ``LoopedConfig.kv_sharing`` (Mixture-of-Recursions' recursive KV sharing) attends,
in every loop, to the keys and values its block computed in the *first* loop: the block's k slots
serve all L loops (``SharedKV`` carries loop 1's keys to the later loops), so the cache holds the
block's keys once instead of L times.

Adaptive decoding (``looped.decoding.per_token``) runs the rows still looping as a sub-batch: a
``RowSlot`` is the view of a slot that reads and writes only those rows. Depth-wise decoding
(``looped.decoding.depthwise``) runs every row at its own token and loop: its slots are ``RaggedSlot`` views.

Dimension letters: b batch, h heads, t time, e head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class LayerCache:
    """What one layer application has seen so far.

    ``offset`` is the number of positions already consumed (the absolute position
    of the next query, for RoPE and causal masks): the owning cache's ``length``,
    which the model advances once per forward and the cache copies into every slot
    (a slot keeps no reference to its cache: no cycle for a walker of the cache's
    tensors, such as ``transformers``' exporter, to follow forever). ``state``
    is the mixer's own: a recurrent state for linear attention, nothing for
    KV-cache mixers, which use ``append`` instead.
    """

    def __init__(self, capacity: int, offset: int = 0) -> None:
        self.capacity = capacity
        self.offset = offset
        self.state: Any = None
        self._keys: Tensor | None = None
        self._values: Tensor | None = None

    def rows(self, index: Tensor | None) -> LayerCache | RowSlot:
        """This slot restricted to the batch rows ``index`` (None: every row)."""
        return self if index is None else RowSlot(self, index)

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers (0 for a recurrent mixer's slot)."""
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values) if t is not None)

    def copy_position(self, source: LayerCache, rows: Tensor, position: int) -> None:
        """Give ``rows`` at ``position`` the keys and values ``source`` holds there (Huginn's "latest" fill)."""
        self._keys[rows, :, position] = source._keys[rows, :, position]
        self._values[rows, :, position] = source._values[rows, :, position]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store keys and values ``[b h t e]`` at positions ``offset..offset+t-1``; return all of them so far.

        The buffers are allocated once at ``capacity`` positions, so a step writes
        one position instead of copying the whole cache (``torch.cat`` would).
        """
        end = self.offset + k.shape[-2]
        if end > self.capacity:
            raise ValueError(f"decode cache is full: {end} positions requested, capacity {self.capacity}")
        if self._keys is None:
            b, h, _, e = k.shape
            # Zeros, not empty memory: a routed decode step leaves a skipped row's column unwritten, and attention
            # multiplies its masked weight, 0, by that value (never-written memory may hold NaN).
            self._keys = k.new_zeros(b, h, self.capacity, e)
            self._values = v.new_zeros(b, h, self.capacity, v.shape[-1])
        self._keys[:, :, self.offset : end] = k
        self._values[:, :, self.offset : end] = v
        return self._keys[:, :, :end], self._values[:, :, :end]


class RowSlot:
    """The rows ``index`` of a filled ``LayerCache``: what a sub-batch of still-looping rows reads and extends.

    Reading gathers those rows' keys (a copy, ``len(index)`` rows), so a row that stopped
    looping costs nothing in later loops' attention.
    """

    def __init__(self, slot: LayerCache, index: Tensor) -> None:
        if slot._keys is None:
            raise ValueError("a RowSlot views a filled slot: run the prefill forward first")
        self.slot, self.index = slot, index
        self.capacity = slot.capacity
        self.state = None

    @property
    def offset(self) -> int:
        return self.slot.offset

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.offset + k.shape[-2]
        keys, values, rows = self.slot._keys, self.slot._values, self.index
        keys[rows, :, self.offset : end] = k
        values[rows, :, self.offset : end] = v
        return keys[rows, :, :end], values[rows, :, :end]


class RaggedSlot:
    """A slot in a decoding step whose rows each read a token at their own position (``looped.decoding.depthwise``).

    The mixer rotates each row's query and key to ``positions`` and lets ``append`` decide what the row
    weighs: it stores each row's new keys and returns the keys the rows may attend to, with their positions
    (the mixer applies its own ``visible`` to those) and which of them each row is allowed.
    """

    positions: Tensor
    """``[a]`` the position of each row's token (its RoPE angle and its causal horizon)."""

    def angles(self, rope, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The rows' RoPE cos and sin (``RotaryEmbedding.angles`` of ``positions``)."""
        return rope.angles(self.positions[:, None], dtype)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Store keys and values ``[a h 1 e]``; return keys, values ``[a h s e]``, their positions ``[a s]`` and
        ``[a s]`` bool: which each row may attend to (causality included: a mixer's own ``visible`` narrows it)."""
        raise NotImplementedError  # pragma: no cover - interface


class SharedKV:
    """The keys and values one block layer computed in loop 1 for this forward's positions.

    Mixture-of-Recursions' recursive KV sharing (Bae et al. 2025): the later loops of that layer
    attend to these instead of projecting their own, so one cache slot serves every loop.
    ``rows`` views the same keys for a sub-batch of rows (adaptive decoding).
    """

    def __init__(self) -> None:
        self.kv: tuple[Tensor, Tensor] | None = None
        self.padding: Any = None
        """Where loop 1's keys sit: its ``looped.model.mixers.Padding`` (None: positions 0.. with nothing padded;
        not imported here, the mixers import this module)."""
        self.routed = False
        """A router runs the later loops (``looped.model.router``): their queries are a subset of the tokens,
        each at its own position, and attend to loop 1's keys of every position up to theirs."""

    def rows(self, index: Tensor | None) -> SharedKV:
        if index is None or self.kv is None:
            return self
        view = SharedKV()
        view.kv = (self.kv[0][index], self.kv[1][index])
        view.padding = None if self.padding is None else self.padding.rows(index)
        view.routed = self.routed
        return view


class DecodeCache:
    """Per-application decoding state of a ``LoopedTransformer`` (see module doc).

    Made empty with the longest sequence it will hold; the model fills it with a
    prefill ``model(prompt, cache=cache)`` and extends it with every later call.
    Every call must use the same loop count: the slots are bound to layer applications.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"DecodeCache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._length = 0
        self.layers: list[LayerCache] = []
        self.routed: Tensor | None = None
        """``[L b capacity]`` bool, a router's decoding (``looped.model.router``): the positions each loop ran on,
        the only keys that loop's slots show (recursion-wise caching)."""

    @property
    def length(self) -> int:
        """Positions every slot has seen; setting it moves every slot's ``offset`` (a crop sets it back)."""
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value
        for slot in self.layers:
            slot.offset = value

    @property
    def nbytes(self) -> int:
        """Bytes of every key and value buffer held."""
        return sum(slot.nbytes for slot in self.layers)

    def bind(self, applications: int) -> list[LayerCache]:
        """The slots for a forward pass with ``applications`` layer applications (made on first use)."""
        if not self.layers:
            self.layers = [LayerCache(self.capacity, self._length) for _ in range(applications)]
        elif len(self.layers) != applications:
            raise ValueError(
                f"this DecodeCache was filled by a forward with {len(self.layers)} layer applications, "
                f"this call has {applications}: keep `loops` the same for the whole generation"
            )
        return self.layers

    @staticmethod
    def positions(offset: int, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Query indices ``[t 1]`` (absolute, from ``offset``) and key indices ``[1 offset+t]``."""
        q_idx = torch.arange(offset, offset + t, device=device)[:, None]
        kv_idx = torch.arange(offset + t, device=device)[None, :]
        return q_idx, kv_idx
