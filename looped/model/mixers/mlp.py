"""An MLP over positions: the token mixer TRM uses for Sudoku instead of attention (``mlp_t``).

Jolicoeur-Martineau (2025, "Less is More: Recursive Reasoning with Tiny Networks") replaces
self-attention by a SwiGLU applied along the *sequence* axis: every channel's column of ``t``
values goes through the same ``t → f → t`` network, so position i's output mixes every
position with weights that depend on where the positions are, not on what they hold. On a
fixed-size puzzle read whole (81 cells) this beat attention (87% vs 75% on Sudoku-Extreme), and
it needs no position encoding: the weights are the positions. It is non-causal by construction
and only for one fixed length, so it needs ``LoopedConfig.causal: false`` and inputs of exactly
``max_seq_len`` positions, and it has no decode cache.

TRM's hidden width follows its SwiGLU rule, ``round(expansion · t · 2/3)`` rounded up to a multiple
of 256 (``multiple_of``). TRM's block is post-norm and normalises the mixer's output over the
positions; here the layer's own norm placement applies (``LoopedConfig.norm_placement``).

Dimension letters: b batch, t time (position), d model width (channel), f hidden width.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class PositionMLP(nn.Module):
    """SwiGLU over positions, shared by every channel: ``w2(silu(w1 x) * w3 x)`` on ``x`` ``[b d t]``."""

    kv_cache = False  # no decoding at all: see LoopedConfig.causal
    gathers = False  # a router's gathered tokens would sit at positions the weights do not know
    bidirectional = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = False,
        *,
        seq_len: int,
        causal: bool = True,
        expansion: float = 4.0,
        multiple_of: int = 256,
    ) -> None:
        super().__init__()
        if causal:
            raise TypeError("the MLP over positions sees every position; it needs causal: false")
        if seq_len < 1 or expansion <= 0 or multiple_of < 1:
            raise TypeError(f"needs seq_len, expansion, multiple_of > 0, got {seq_len}, {expansion}, {multiple_of}")
        self.seq_len, self.causal = seq_len, False
        hidden = multiple_of * math.ceil(round(expansion * seq_len * 2 / 3) / multiple_of)
        self.w1 = nn.Linear(seq_len, hidden, bias=bias)  # gate
        self.w3 = nn.Linear(seq_len, hidden, bias=bias)  # up
        self.w2 = nn.Linear(hidden, seq_len, bias=bias)  # down: the residual branch's output projection
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope=None, cache=None, padding=None, shared=None) -> Tensor:
        """``[b t d]`` → ``[b t d]``; ``rope`` is not needed (the weights know the positions)."""
        if cache is not None or padding is not None:
            raise ValueError("the MLP over positions takes whole, unpadded inputs: no decode cache, no padding")
        if x.shape[1] != self.seq_len:
            raise ValueError(
                f"the MLP over positions was built for {self.seq_len} positions (max_seq_len) but the input has "
                f"{x.shape[1]}; give it inputs of exactly max_seq_len positions"
            )
        h = rearrange(x, "b t d -> b d t")
        h = self.w2(self.dropout(F.silu(self.w1(h)) * self.w3(h)))
        return rearrange(h, "b d t -> b t d")

    def flops_per_token(self) -> int:
        """Matmul FLOPs per token: each channel's ``6 t f`` spread over its ``t`` tokens, times ``d`` channels
        (the model passes ``d`` by counting once per channel, see ``LoopedTransformer.flops_per_token``)."""
        return 6 * self.w1.out_features
