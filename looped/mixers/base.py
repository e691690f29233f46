"""The token-mixer interface every attention variant implements, and the rotary embedding they share.

A mixer maps hidden states ``[b t d]`` to ``[b t d]`` and is causal: position
``t`` sees only positions ``<= t``. The model's layers call
``mixer(x, rope, cache)`` and never look inside, so linear, sparse or hybrid
attention plug in as a subclass of ``AttentionMixer`` in its own file, named in
the registry ``looped.mixers.MIXERS``, without touching the loop in ``model.py``.
With a ``LayerCache`` (decoding) ``x`` holds only the new positions, from
``cache.offset`` on; the mixer attends over everything the cache has seen and
extends it.

Dimension letters: b batch, t time (sequence position), d model width,
h heads, e head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from looped.cache import DecodeCache, LayerCache


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), shared by every layer.

    The cos/sin tables are buffers built once for ``max_seq_len``; they are not
    saved in checkpoints (``persistent=False``) because they follow from the config.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [t e/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` of shape ``[b h t e]`` whose first position is ``offset``."""
        t = x.shape[-2]
        cos = self.cos[offset : offset + t].to(x.dtype)
        sin = self.sin[offset : offset + t].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        # Rotate each (even, odd) pair by its angle; interleave back to e.
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)


class AttentionMixer(nn.Module):
    """Shared projections of every attention-style mixer.

    Q, K, V and O are separate ``nn.Linear`` layers (not one fused QKV) so that
    the block cosine-similarity regulariser and its callback can address each
    parameter group of the paper by name: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
    Subclasses implement ``attend(q, k, v)`` on ``[b h t e]`` tensors and, for
    decoding, say which keys a query sees (``visible``, for a KV cache) or
    override ``attend_cached`` (recurrent mixers).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: Tensor, rope: RotaryEmbedding | None = None, cache: LayerCache | None = None) -> Tensor:
        q, k, v = (
            rearrange(proj(x), "b t (h e) -> b h t e", h=self.n_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        offset = 0 if cache is None else cache.offset  # absolute position of x's first token
        if rope is not None:
            q, k = rope(q, offset), rope(k, offset)
        if cache is None:
            out = self.attend(q, k, v)
        else:
            out = self.attend_cached(q, k, v, cache)
        return self.o_proj(rearrange(out, "b h t e -> b t (h e)"))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def visible(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """Boolean mask: may the query at absolute position ``q_idx`` see the key at ``kv_idx``."""
        return kv_idx <= q_idx

    def attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache) -> Tensor:
        """KV-cache decoding: queries at ``cache.offset..`` over every key cached so far plus these.

        The prefill (empty cache) runs the training kernel, ``attend``; later calls
        apply ``visible`` at the queries' absolute positions.
        """
        offset = cache.offset
        keys, values = cache.append(k, v)
        if offset == 0:
            return self.attend(q, k, v)
        q_idx, kv_idx = DecodeCache.positions(offset, q.shape[-2], q.device)
        start = self.first_visible_key(offset)  # keys before it are masked for every query: skip them
        mask = self.visible(q_idx, kv_idx[:, start:])
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, keys[:, :, start:], values[:, :, start:], attn_mask=mask, dropout_p=p)

    def first_visible_key(self, offset: int) -> int:
        """A lower bound on the keys a query at ``offset`` or later can see (a sliding window's start)."""
        return 0
