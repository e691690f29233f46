"""Depth-wise batching: every row of a batch decodes at its own token and its own loop, so the shared
block always runs for the whole batch and a token that stops early saves one block application.

The synchronous schedule (``looped.decoding.per_token.AdaptiveDecoder``) steps the batch token by token: a
token's rows loop together and those that stop leave the sub-batch. That saves their arithmetic, but
every loop still reads the block's weights and pays its per-call overhead while *any* row loops, so a
step costs what its deepest row costs. Mixture-of-Recursions (Bae et al. 2025) answers with depth-wise
batching: a row whose token stopped starts its next token at once, and each application of the block
runs one *tick* for every row, each at its own loop and position. Decoding then costs, per row, the sum
of its tokens' loops, and the batch as many ticks as its busiest row needs. That beats the synchronous
schedule when the rows' total depths are alike (a serving queue refilling finished rows); on a fixed batch
whose rows differ it does not, and the synchronous schedule is ``generate``'s default (measured:
``docs/benchmarks.md``, "Adaptive depth and KV sharing").

Rows at different loops read different layer applications' keys. Each block layer keeps its slots of
every loop in one buffer (``LoopSlots``, position-indexed, as the prefill left them), and a tick reads
each row's own loop's slot (a gathered copy) and writes its token's key there. When a token stops early,
the loops it skipped get the keys of its last loop at its column (Huginn's "latest", as the synchronous
schedule fills them). With recursive KV sharing (``kv_sharing``) there is one slot, written in loop 1
and read by every loop: nothing to gather or fill.

A model with a Mixture-of-Recursions router (``LoopedConfig.router``, ``generate(exit="router",
schedule="depthwise")``) decides before each of a token's loops, by its causal router
(``looped.model.router.RowRouting``), whether the token runs it; a token not routed to its next loop stops
there, and a routed one moves by its weighted update. Its cache is recursion-wise as in training: a loop's
keys are those of the tokens routed to that loop (``routed``), nothing is filled (with ``kv_sharing``: loop 1's
keys, which every token has). Prelude and coda layers, applied once per token, keep
their position-indexed slots (``ColumnSlot``). Both schedules decode the same tokens (tested); they only
order the work differently.

Dimension letters: b batch, h heads, c cache columns, e head width, v vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from looped.model.cache import DecodeCache, LayerCache, RaggedSlot
from looped.model.step import LoopStep


class TokenColumns:
    """Per row, what each position of a position-indexed slot holds: its token's position among the row's
    tokens (left padding shifts it) and whether it holds a token yet (``[b c]`` each)."""

    def __init__(self, capacity: int, prompt_positions: Tensor, prompt_mask: Tensor) -> None:
        b, p = prompt_mask.shape
        self.positions = torch.zeros(b, capacity, dtype=torch.long, device=prompt_mask.device)
        self.filled = torch.zeros(b, capacity, dtype=torch.bool, device=prompt_mask.device)
        self.positions[:, :p], self.filled[:, :p] = prompt_positions, prompt_mask
        self.prompt = p


def clear_after(column: int, *buffers: Tensor) -> None:
    """Zero the key or value buffers ``[b h c e]`` from ``column`` on. A row weighs only columns it wrote, but
    attention multiplies the others' weight, 0, by their values: never-written memory may hold NaN."""
    for buffer in buffers:
        buffer[:, :, column:] = 0


class ColumnSlot(RaggedSlot):
    """Rows ``rows`` of a position-indexed slot (a prelude or coda layer), each row writing its token at its
    own column and weighing every token column it has filled."""

    def __init__(self, slot: LayerCache, columns: TokenColumns, rows: Tensor, at: Tensor, span: int) -> None:
        self.slot, self.columns, self.rows, self.at, self.span = slot, columns, rows, at, span
        self.positions = columns.positions[rows, at]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        keys, values, rows, s = self.slot._keys, self.slot._values, self.rows, self.span
        keys[rows, :, self.at], values[rows, :, self.at] = k[:, :, 0], v[:, :, 0]
        return keys[rows, :, :s], values[rows, :, :s], self.columns.positions[rows, :s], self.columns.filled[rows, :s]


class LoopSlots:
    """One block layer's keys and values for every loop, position-indexed (``[L·b h c e]``, loop-major: row r's
    slot of loop n is ``n·b + r``), and the view each decoding tick reads: each row its own loop's slot.

    With recursive KV sharing (``kv_sharing``) there is one loop's slot, written in loop 1 and read in all.
    """

    def __init__(self, prompt_slots: list[LayerCache], columns: TokenColumns) -> None:
        self.keys = torch.cat([slot._keys for slot in prompt_slots])  # the prefill's slots, loop after loop
        self.values = torch.cat([slot._values for slot in prompt_slots])
        clear_after(columns.prompt, self.keys, self.values)
        self.loops, self.rows, self.columns = len(prompt_slots), len(self.keys) // len(prompt_slots), columns

    def fill_latest(self, rows: Tensor, stopped_at: Tensor, at: Tensor) -> None:
        """Huginn's "latest": the slots of the loops ``rows`` skipped get, at their token's column, the keys of the
        loop each stopped at (``stopped_at``, 1-based)."""
        later = torch.arange(self.loops, device=rows.device)[None, :]  # [1 L]
        source = torch.minimum(later, stopped_at[:, None] - 1) * self.rows + rows[:, None]  # [a L]
        target = later * self.rows + rows[:, None]
        column = at[:, None].expand_as(target)
        self.keys[target, :, column] = self.keys[source, :, column]
        self.values[target, :, column] = self.values[source, :, column]


class Tick:
    """One application of the block in depth-wise decoding, the same for its k layers: row r reads its token at
    column ``at[r]`` in loop ``loop[r]`` (1-based). Made once, so each layer only writes and reads its keys."""

    def __init__(
        self,
        columns: TokenColumns,
        loops: int,
        batch: int,
        loop: Tensor,
        at: Tensor,
        active: Tensor,
        routed: Tensor | None = None,
    ) -> None:
        rows = torch.arange(len(at), device=at.device)
        self.at, self.span = at, int(at.max()) + 1
        self.positions = columns.positions[rows, at]
        self.key_positions = columns.positions[:, : self.span]
        later = torch.arange(self.span, device=at.device)[None, :] <= at[:, None]
        self.allowed = later & columns.filled[:, : self.span]  # [b s]: every token up to the row's own
        if routed is not None:  # a router's recursion-wise cache: row r sees the tokens routed to its loop
            self.allowed = self.allowed & routed[torch.clamp(loop, max=len(routed)) - 1, rows, : self.span]
        if loops == 1:  # one slot (kv_sharing): written in loop 1, read by every loop
            self.write, self.read = ((loop == 1) & active).nonzero().squeeze(1), None
        else:  # row r of loop n is slot n·b + r; a row that has finished writes nothing
            self.read = (torch.clamp(loop, max=loops) - 1) * batch + rows
            self.write = self.read[active]
        self.write_rows = self.write % batch
        self.write_at = at[self.write_rows]
        self._angles: tuple[Tensor, Tensor] | None = None

    def angles(self, rope, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._angles is None:
            self._angles = rope.angles(self.positions[:, None], dtype)
        return self._angles


class LoopSlotView(RaggedSlot):
    """What one block layer reads and writes in one tick: each row its own loop's slot of ``LoopSlots``."""

    def __init__(self, slots: LoopSlots, tick: Tick) -> None:
        self.slots, self.tick, self.positions = slots, tick, tick.positions

    def angles(self, rope, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.tick.angles(rope, dtype)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        slots, tick = self.slots, self.tick
        slots.keys[tick.write, :, tick.write_at] = k[tick.write_rows, :, 0]
        slots.values[tick.write, :, tick.write_at] = v[tick.write_rows, :, 0]
        keys, values = slots.keys[:, :, : tick.span], slots.values[:, :, : tick.span]
        if tick.read is not None:  # a copy: rows read different slots
            keys, values = keys.index_select(0, tick.read), values.index_select(0, tick.read)
        return keys, values, tick.key_positions, tick.allowed


class DepthwiseDecoder:
    """Greedy decoding of a prefilled batch, every row at its own token and loop (see the module doc)."""

    def __init__(
        self, model, decide, loops: int, cache: DecodeCache, attention_mask: Tensor | None, routing=None
    ) -> None:
        """``decide``: an ``OnlineExit`` (an exit rule after every loop); or ``routing``, a ``RowRouting`` (a
        router's decision before every loop) with ``decide`` None."""
        config = model.config
        b, p = cache.layers[0]._keys.shape[0], cache.length
        mask = torch.ones(b, p, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        mask = mask.to(cache.layers[0]._keys.device)
        self.model, self.decide, self.loops, self.prompt = model, decide, loops, p
        self.columns = TokenColumns(cache.capacity, (mask.long().cumsum(-1) - 1).clamp(min=0), mask)
        slots = model.decode_slots(cache, loops)
        self.prelude_slots, self.coda_slots = slots.prelude, slots.coda
        for slot in self.prelude_slots + self.coda_slots:
            clear_after(p, slot._keys, slot._values)
        block_slots = slots.loops[:1] if config.kv_sharing else slots.loops  # with sharing, one slot for every loop
        self.block_slots = [LoopSlots([loop[j] for loop in block_slots], self.columns) for j in range(len(model.block))]
        self.routing = routing
        # [L b c]: which tokens each loop's slot shows (a router without kv_sharing), from the prefill on
        self.routed = None if routing is None or config.kv_sharing else cache.routed.clone()

    def decode(self, first: Tensor, max_new_tokens: int, eos_id: int | None) -> tuple[Tensor, Tensor]:
        """The ``[b n]`` new tokens after the prefill's ``first`` ``[b]``, and the loops each used (the first's:
        full depth; after a row's EOS: 0, not computed)."""
        model, b, device = self.model, len(first), first.device
        tokens = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
        used = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
        tokens[:, 0], used[:, 0] = first, self.loops
        count = torch.ones(b, dtype=torch.long, device=device)  # tokens emitted per row
        done = count >= max_new_tokens if eos_id is None else (first == eos_id) | (count >= max_new_tokens)
        at = torch.full((b,), self.prompt, dtype=torch.long, device=device)  # the column of each row's token
        loop = torch.ones(b, dtype=torch.long, device=device)
        everyone = torch.arange(b, device=device)
        x = self.start(first, everyone, at)
        loop_input = x

        def emit(stop: Tensor, logits: Tensor | None) -> None:
            """The rows ``stop`` stopped their token (after loop ``loop - 1``): read it out, start the next one."""
            nonlocal x, loop_input
            rows = stop.nonzero().squeeze(1)
            chosen = (logits[rows] if logits is not None else self.read_out(x[rows], rows, at[rows])).argmax(-1)
            latest = not model.config.kv_sharing and self.routing is None  # a router's cache hides, not fills
            if latest and bool((loop[rows] <= self.loops).any()):
                for slots in self.block_slots:
                    slots.fill_latest(rows, loop[rows] - 1, at[rows])
            tokens[rows, count[rows]], used[rows, count[rows]] = chosen, loop[rows] - 1
            count[rows] += 1
            finished = count[rows] >= max_new_tokens
            if eos_id is not None:
                finished |= chosen == eos_id
            done[rows] = finished
            go_on = rows[~finished]
            if len(go_on):  # the stopped rows start their next token, in loop 1, at the next tick
                at[go_on], loop[go_on] = at[go_on] + 1, 1
                started = self.start(chosen[~finished], go_on, at[go_on])
                x, loop_input = x.index_copy(0, go_on, started), loop_input.index_copy(0, go_on, started)
            if self.decide is not None:
                self.decide.restart(stop)

        while not bool(done.all()):
            weight = None
            while self.routing is not None:  # a token its router does not route to its next loop stops before it
                keep, weight = self.routing.decide(x, loop)
                stop = ~keep & ~done
                if not bool(stop.any()):
                    break
                emit(stop, None)  # its next token may stop at once too (not routed to loop 1): decide again
            if bool(done.all()):
                break
            if self.routed is not None:  # this tick's tokens show their keys to their own loop's slot
                self.routed[torch.clamp(loop, max=self.loops) - 1, everyone, at] |= ~done
            tick = Tick(self.columns, self.block_slots[0].loops, b, loop, at, ~done, self.routed)
            views = [LoopSlotView(slots, tick) for slots in self.block_slots]
            out = model.loop_step(x, LoopStep(loop, loop_input, views))
            x = out if weight is None else x + weight[:, None, None].to(out.dtype) * (out - x)  # the router's weight
            if self.routing is not None:
                logits, stop = None, (loop == self.loops) & ~done
            else:
                logits = self.read_out(x, everyone, at) if self.decide.rule.reads_prediction else None
                logprobs = None if logits is None else logits.float().log_softmax(-1)
                halts = model.halt_logits(x[:, -1]) if self.decide.rule.kind == "gate" else None
                stop = (self.decide.stop(logprobs, halts) | (loop == self.loops)) & ~done
            loop = loop + 1
            if bool(stop.any()):
                emit(stop, logits)
        if eos_id is not None:  # a row that emitted EOS keeps emitting it, as generate does
            emitted = torch.arange(max_new_tokens, device=device)[None, :] >= count[:, None]
            tokens = tokens.masked_fill(emitted, eos_id)
            tokens, used = tokens[:, : int(count.max())], used[:, : int(count.max())]
        return tokens, used

    def start(self, token: Tensor, rows: Tensor, at: Tensor) -> Tensor:
        """``[a 1 d]``: the rows' new tokens ``[a]`` embedded at their columns and through the prelude."""
        self.columns.filled[rows, at] = True  # a new token's position: one after the row's previous token
        self.columns.positions[rows, at] = self.columns.positions[rows, at - 1] + 1
        x = self.model.embed_tokens(token[:, None], positions=self.columns.positions[rows, at][:, None])
        span = int(at.max()) + 1
        slots = [ColumnSlot(slot, self.columns, rows, at, span) for slot in self.prelude_slots]
        return self.model.run_layers(self.model.prelude, x, slots)

    def read_out(self, x: Tensor, rows: Tensor, at: Tensor) -> Tensor:
        """Logits ``[a v]`` of the rows ``rows`` from their states ``x`` ``[a 1 d]`` (the coda writes their columns)."""
        span = int(at.max()) + 1
        coda = [ColumnSlot(slot, self.columns, rows, at, span) for slot in self.coda_slots]
        return self.model.readout(x, slots=coda)[:, -1]
