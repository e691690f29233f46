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
positions (TRM and HRM read a puzzle-embedding prefix position that these tasks do not have).

Dimension letters: s states, b batch, t time (position), d model width, v vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from looped.model.step import LoopStep


def initial_state(self, batch: int, length: int) -> Tensor:
    """``[s b t d]`` the state a fresh example starts from: zeros (``loop``) or TRM/HRM's fixed vectors."""
    d, weight = self.config.d_model, self.embed.weight
    if self.config.recursion == "loop":
        return weight.new_zeros(1, batch, length, d)
    return self.state_init[:, None, None, :].to(weight.dtype).expand(2, batch, length, d)


def reason(self, input_ids: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """One supervision step from ``state`` (None: a fresh one): ``(logits [b t v], Q-head logits [b 2] (halt,
    continue) or None, the new state [s b t d])``. The new state is *not* detached: the trainer detaches it
    between steps, so that a test can see it does. Runs through the model's ``forward`` (its hooks)."""
    return self(input_ids, carried=self.initial_state(*input_ids.shape) if state is None else state)


def supervision_step(self, input_ids: Tensor, state: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """``reason``'s body, called by ``LoopedTransformer.forward``."""
    c = self.config
    x = self.run_layers(self.prelude, self.embed_tokens(input_ids), None)
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
    logits = self.readout(answer)
    q = None if self.q_head is None else self.q_head(self.norm(answer).mean(1)).float()
    return logits, q, new
