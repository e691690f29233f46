"""One supervision step of a recursive reasoner: how the carried state is updated (``LoopedConfig.recursion``).

Deep supervision (``looped.training.deep_supervision``) carries a state from one supervision step to
the next and reads an answer out after each. What a step does is the model's business, and three
ideas of depth from shared weights meet here, each a schedule of ``loop_step`` calls (the one place
the block runs, ``looped/model/step.py``):

* ``loop``, ours: ``h = block^L(x + h)`` with the state ``h`` (0 at the start, so one step from a
  fresh state is the ordinary forward of ``(k⊗L)``); the answer is ``h``.
* ``trm``, the Tiny Recursive Model (Jolicoeur-Martineau 2025): one network (the block) updates the
  latent ``z ← net(z + y + x)`` n times (``latent_steps``), then the answer ``y ← net(y + z)``; that
  round runs T times (``answer_steps``), the first T−1 without autograd, so backpropagation sees
  only the last n+1 applications.
* ``hrm``, the Hierarchical Reasoning Model (Wang et al. 2025): a low module (the block) updates
  ``z_L ← L(z_L + z_H + x)`` n times, then the high module (``high_layers``) ``z_H ← H(z_H + z_L)``,
  T times; only the very last low and high update run with autograd (HRM's one-step gradient).

The state is one tensor ``[s b t d]`` (``loop``: s = 1, ``h``; ``trm``: ``(y, z)``; ``hrm``: ``(z_H, z_L)``), so
the trainer can swap a halted row's state for a fresh one with one ``where``. TRM and HRM start it from
two fixed random vectors (``LoopedTransformer.state_init``, their ``H_init`` and ``L_init``). The answer
state is read out by the model's head and, with ``q_head``, by the halting Q-head, averaged over the
positions.

With ``puzzle_embedding_len`` P > 0 (TRM's and HRM's puzzle-id embedding, for ARC) every step runs on P prefix
positions before the cells: the example's learned puzzle vector (``puzzle_embedding``, a row per puzzle id) laid
over them and padded with zeros. The state then has P + t positions; the logits are the t cells', and the
Q-head reads the first prefix position, as TRM and HRM do.

Dimension letters: s states, b batch, t time (position), d model width, v vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from looped.model.step import LoopStep


def initial_state(self, batch: int, length: int) -> Tensor:
    """``[s b t d]`` the state a fresh example starts from: zeros (``loop``) or TRM/HRM's fixed vectors."""
    d, weight = self.config.d_model, self.embed.weight
    length += self.config.puzzle_embedding_len  # the prefix positions carry a state too
    if self.config.recursion == "loop":
        return weight.new_zeros(1, batch, length, d)
    return self.state_init[:, None, None, :].to(weight.dtype).expand(2, batch, length, d)


def reason(
    self, input_ids: Tensor, state: Tensor | None = None, puzzle_ids: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One supervision step from ``state`` (None: a fresh one): ``(logits [b t v], Q-head logits [b 2] (halt,
    continue) or None, the new state [s b P+t d])``, ``puzzle_ids`` ``[b]`` choosing the prefix's puzzle vectors
    (None: id 0). The new state is *not* detached: the trainer detaches it between steps, so that a test can see
    it does. Runs through the model's ``forward`` (its hooks)."""
    state = self.initial_state(*input_ids.shape) if state is None else state
    return self(input_ids, carried=state, puzzle_ids=puzzle_ids)


def embed_with_prefix(self, input_ids: Tensor, puzzle_ids: Tensor | None) -> Tensor:
    """``[b P+t d]`` the puzzle prefix (TRM's ``_input_embeddings``: the puzzle vector, zero-padded to P·d),
    then the token embeddings, positions counted from the prefix's first."""
    tokens = self.embed(input_ids)
    if self.puzzle_embedding is None:
        return self.embed_tokens(None, embeds=tokens)
    b, _, d = tokens.shape
    if puzzle_ids is None:
        puzzle_ids = input_ids.new_zeros(b)
    vector = self.puzzle_embedding(puzzle_ids).to(tokens.dtype)
    prefix = torch.nn.functional.pad(vector, (0, self.config.puzzle_embedding_len * d - vector.shape[-1]))
    return self.embed_tokens(None, embeds=torch.cat((prefix.view(b, -1, d), tokens), dim=1))


def supervision_step(
    self, input_ids: Tensor, state: Tensor, puzzle_ids: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``reason``'s body, called by ``LoopedTransformer.forward``."""
    c = self.config
    x = self.run_layers(self.prelude, embed_with_prefix(self, input_ids, puzzle_ids), None)
    if c.recursion == "loop":
        h = x + state[0]
        for n in range(1, c.loops + 1):
            h = self.loop_step(h, LoopStep(n, x))
        answer, new = h, h[None]
    elif c.recursion == "trm":
        y, z = state

        def round_(y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
            for _ in range(c.latent_steps):
                z = self.loop_step(z + y + x)
            return self.loop_step(y + z), z

        with torch.no_grad():
            for _ in range(c.answer_steps - 1):
                y, z = round_(y, z)
        y, z = round_(y, z)
        answer, new = y, torch.stack((y, z))
    else:  # hrm
        high, low = state
        with torch.no_grad():
            for i in range(c.answer_steps):
                last_round = i == c.answer_steps - 1
                for _ in range(c.latent_steps - 1 if last_round else c.latent_steps):
                    low = self.loop_step(low + high + x)
                if not last_round:
                    high = self.loop_step(high + low, LoopStep(high=True))
        low = self.loop_step(low + high + x)  # the one-step gradient: these two updates only
        high = self.loop_step(high + low, LoopStep(high=True))
        answer, new = high, torch.stack((high, low))
    prefix = c.puzzle_embedding_len
    logits = self.readout(answer[:, prefix:])
    if self.q_head is None:
        return logits, None, new
    # TRM and HRM read the halting logits at the first prefix position; without a prefix, the positions' mean.
    read = self.norm(answer[:, 0]) if prefix else self.norm(answer).mean(1)
    return logits, self.q_head(read).float(), new
