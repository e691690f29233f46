"""The token-mixer interface every attention variant implements, and the rotary embedding they share.

A mixer maps hidden states ``[b t d]`` to ``[b t d]`` and is causal: position
``t`` sees only positions ``<= t``. The model's layers call
``mixer(x, rope, cache)`` and never look inside, so linear, sparse or hybrid
attention plug in as a subclass of ``AttentionMixer`` in its own file, named in
the registry ``looped.model.mixers.MIXERS``, without touching the loop in ``model.py``.
With a ``LayerCache`` (decoding) ``x`` holds only the new positions, from
``cache.offset`` on; the mixer attends over everything the cache has seen and
extends it. With a ``Padding`` (a padded batch: left-padded prompts, say) each
token sits at its position among its row's tokens and no padding is attended to,
so a padded row computes what the row alone would.

Dimension letters: b batch, t time (sequence position), d model width,
h heads, e head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from looped.model.cache import DecodeCache, LayerCache, RaggedSlot, RowSlot, SharedKV


class Padding:
    """Which positions of a padded batch hold tokens, and each token's position among them.

    Made once per forward from an ``attention_mask`` ``[b s]`` (1 = token, 0 = padding) that
    covers every position a decode cache has seen plus the new ones. A token's position
    counts the tokens before it in its row, so RoPE, learned positions and position-based
    masks (sparse patterns) see a left-padded row exactly as they would see it unpadded.
    Padding positions still flow through the layers (their outputs are never read) but no
    token attends to them.
    """

    complete = False
    """Every key is a token and positions rise in index order (a router's gathered tokens with no gaps): a
    mixer whose ``visible`` is plain causality may then run its unpadded kernel at these positions."""

    def __init__(self, attention_mask: Tensor) -> None:
        self.keys = attention_mask.bool()  # [b s]
        self.positions = (self.keys.long().cumsum(-1) - 1).clamp(min=0)  # [b s]; padding before any token: 0

    @classmethod
    def gathered(cls, positions: Tensor, keys: Tensor | None = None) -> Padding:
        """Tokens gathered from a longer sequence in causal order (``looped.model.router``): each at its own
        ``positions`` ``[b s]``; ``keys`` ``[b s]`` marks the real ones (None: all are)."""
        gathered = cls.__new__(cls)
        gathered.positions = positions
        gathered.keys = torch.ones_like(positions, dtype=torch.bool) if keys is None else keys
        gathered.complete = keys is None
        return gathered

    def new(self, offset: int, t: int) -> Tensor:
        """Positions ``[b t]`` of the ``t`` new tokens after ``offset`` cached ones."""
        return self.positions[:, offset : offset + t]

    def rows(self, index: Tensor) -> Padding:
        """The padding of the batch rows ``index``."""
        narrowed = type(self).__new__(type(self))
        narrowed.positions, narrowed.keys, narrowed.complete = self.positions[index], self.keys[index], self.complete
        return narrowed


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), shared by every layer.

    The cos/sin tables are buffers built once for ``max_seq_len``; they are not
    saved in checkpoints (``persistent=False``) because they follow from the config.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Compute the tables in place, on their device (again after a model was built on the meta device)."""
        if self.cos.is_meta:
            return
        device, e = self.cos.device, self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, e, 2, dtype=torch.float32, device=device) / e))
        if self.scaling is not None:
            inv_freq = llama3_frequencies(inv_freq, **{k: v for k, v in self.scaling.items() if k != "rope_type"})
        angles = torch.outer(torch.arange(self.cos.shape[0], dtype=torch.float32, device=device), inv_freq)  # [t e/2]
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate ``x`` of shape ``[b h t e]`` whose first position is ``offset`` (or at ``positions`` ``[b t]``)."""
        if positions is None:
            t = x.shape[-2]
            cos = self.cos[offset : offset + t].to(x.dtype)
            sin = self.sin[offset : offset + t].to(x.dtype)
        else:
            cos, sin = self.angles(positions, x.dtype)
        return self.rotate(x, cos, sin)

    def angles(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``[b 1 t e/2]`` (broadcast over heads) of per-row positions ``[b t]``."""
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x`` ``[b h t e]`` rotated by the angles whose cos and sin are given (broadcast to ``[b h t e/2]``)."""
        x1, x2 = x[..., 0::2], x[..., 1::2]
        # Rotate each (even, odd) pair by its angle; interleave back to e.
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)


def llama3_frequencies(
    inv_freq: Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> Tensor:
    """Llama 3.1's RoPE scaling: frequencies whose wavelength exceeds ``original / low_freq_factor`` positions
    are slowed by ``factor``, those shorter than ``original / high_freq_factor`` kept, and the band between
    interpolated linearly in ``original / wavelength`` (the "llama3" ``rope_type`` of ``transformers``)."""
    wavelength = 2 * math.pi / inv_freq
    original = original_max_position_embeddings
    ramp = ((original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return torch.where(
        wavelength < original / high_freq_factor,
        inv_freq,
        torch.where(
            wavelength > original / low_freq_factor, inv_freq / factor, (1 - ramp) * inv_freq / factor + ramp * inv_freq
        ),
    )


class AttentionMixer(nn.Module):
    """Shared projections of every attention-style mixer.

    Q, K, V and O are separate ``nn.Linear`` layers (not one fused QKV) so that
    the block cosine-similarity regulariser and its callback can address each
    parameter group of the paper by name: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
    Subclasses implement ``attend(q, k, v)`` on ``[b h t e]`` tensors and, for
    decoding, say which keys a query sees (``visible``, for a KV cache) or
    override ``attend_cached`` (recurrent mixers, which set ``kv_cache = False``).

    With a ``SharedKV`` (``LoopedConfig.kv_sharing``) the first call projects keys and values
    and leaves them there; later loops project only queries and attend to those.
    """

    kv_cache = True
    """Decoding keeps keys and values per position (False: a recurrent state), so they can be
    shared across loops and copied between slots."""
    gathers = True
    """Runs on a gathered sub-sequence: tokens in causal order, each at its own position
    (``Padding.gathered``), as a router's loop gives it (``LoopedConfig.router``)."""
    bidirectional = False
    """Can also run non-causally (``causal=False``, ``LoopedConfig.causal``): every position sees every other,
    for inputs read whole (puzzles) and never decoded."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = False,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float | None = None,
        causal: bool = True,
    ) -> None:
        super().__init__()
        if not causal and not self.bidirectional:
            raise TypeError(f"{type(self).__name__} is causal only; non-causal attention needs a softmax mixer")
        self.causal = causal
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.dropout = dropout
        e = d_model // n_heads if head_dim is None else head_dim
        self.q_proj = nn.Linear(d_model, n_heads * e, bias=bias or qkv_bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * e, bias=bias or qkv_bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * e, bias=bias or qkv_bias)
        self.o_proj = nn.Linear(n_heads * e, d_model, bias=bias)
        # Qwen3's RMSNorm over each head's queries and keys, before RoPE (one scale of e numbers for all heads).
        self.q_norm = nn.RMSNorm(e, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(e, eps=norm_eps) if qk_norm else None

    def queries(self, x: Tensor) -> Tensor:
        """``[b h t e]`` queries of ``x`` ``[b t d]`` (q-normed when the model has q/k norm), before RoPE."""
        q = rearrange(self.q_proj(x), "b t (h e) -> b h t e", h=self.n_heads)
        return q if self.q_norm is None else self.q_norm(q)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[b h t e]`` keys (k-normed, before RoPE) and values, with grouped-query attention's kv heads
        repeated so that query head i reads kv head ``i // (h / kv heads)``. Repeating here, before RoPE (which
        acts on each head alike) and before any cache, keeps every attention path unchanged; the cache then
        holds h heads, so GQA saves no decoding memory in this code yet."""
        k = rearrange(self.k_proj(x), "b t (h e) -> b h t e", h=self.n_kv_heads)
        v = rearrange(self.v_proj(x), "b t (h e) -> b h t e", h=self.n_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.n_kv_heads != self.n_heads:
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return k, v

    def forward(
        self,
        x: Tensor,
        rope: RotaryEmbedding | None = None,
        cache: LayerCache | RowSlot | RaggedSlot | None = None,
        padding: Padding | None = None,
        shared: SharedKV | None = None,
    ) -> Tensor:
        if cache is not None and not self.causal:  # the model refuses this first (LoopedTransformer.forward)
            raise ValueError("non-causal attention has no decode cache: every position would see later ones")
        if isinstance(cache, RaggedSlot):
            out = self.attend_ragged(self.queries(x), *self.keys_values(x), rope, cache)
            return self.o_proj(rearrange(out, "b h t e -> b t (h e)"))
        offset = 0 if cache is None else cache.offset  # absolute position of x's first token
        positions = None if padding is None else padding.new(offset, x.shape[1])
        q = self.queries(x) if rope is None else rope(self.queries(x), offset, positions)
        if shared is not None and shared.kv is not None:
            k, v = shared.kv  # a later loop: loop 1's keys and values, already rotated
            if shared.routed:  # a router's tokens: their own positions over loop 1's keys of every position
                out = self.attend_shared(q, k, v, padding, shared.padding, cache)
                return self.o_proj(rearrange(out, "b h t e -> b t (h e)"))
        else:
            k, v = self.keys_values(x)
            if rope is not None:
                k = rope(k, offset, positions)
            if shared is not None:
                shared.kv, shared.padding = (k, v), padding
        if padding is not None and not (padding.complete and cache is None and self.plainly_causal):
            out = self.attend_padded(q, k, v, padding, cache)
        elif cache is None:
            out = self.attend(q, k, v)
        else:
            out = self.attend_cached(q, k, v, cache)
        return self.o_proj(rearrange(out, "b h t e -> b t (h e)"))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def plainly_causal(self) -> bool:
        """``visible`` is causality alone: order, not distance, decides, so gathered tokens in causal order
        need no mask beyond the unpadded kernel's."""
        return type(self).visible is AttentionMixer.visible and self.causal

    def visible(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """Boolean mask: may the query at absolute position ``q_idx`` see the key at ``kv_idx``."""
        return kv_idx <= q_idx if self.causal else torch.ones_like(kv_idx <= q_idx)

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

    def attend_padded(
        self, q: Tensor, k: Tensor, v: Tensor, padding: Padding, cache: LayerCache | None = None
    ) -> Tensor:
        """A padded batch (with or without a KV cache): ``visible`` at each token's own position, padding masked.

        Every query also sees its own column, so a padding query never has an empty row (its
        output is never read, but softmax over nothing would be NaN).
        """
        offset = 0 if cache is None else cache.offset
        if cache is not None:
            k, v = cache.append(k, v)
        t, s = q.shape[-2], k.shape[-2]
        q_pos, k_pos = padding.new(offset, t)[:, :, None], padding.positions[:, None, :s]  # [b t 1], [b 1 s]
        q_idx, kv_idx = DecodeCache.positions(offset, t, q.device)
        mask = (self.visible(q_pos, k_pos) & padding.keys[:, None, :s]) | (q_idx == kv_idx)
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=p)

    def attend_shared(
        self, q: Tensor, k: Tensor, v: Tensor, padding: Padding, keys: Padding | None, cache: LayerCache | None
    ) -> Tensor:
        """A router's tokens (``padding``: their positions, gathered or masked) over loop 1's keys and values of
        every position (``keys``: where those sit; ``kv_sharing`` with ``LoopedConfig.router``). Loop 1 ran every
        token, so each real query sees at least its own position's key; a place no token fills (a row's unused
        gathered places) sees every key, to keep softmax finite (its output is dropped)."""
        offset = 0 if cache is None else cache.offset
        if cache is not None:
            k, v = cache.append(k, v)  # the shared slot: loop 1 already wrote these very keys there
        t, s = q.shape[-2], k.shape[-2]
        q_pos = padding.new(offset, t)[:, :, None]  # [b t 1]
        if keys is None:
            k_pos, real = torch.arange(s, device=q.device)[None, None], torch.ones_like(q_pos, dtype=torch.bool)
        else:
            k_pos, real = keys.positions[:, None, :s], keys.keys[:, None, :s]
        mask = self.visible(q_pos, k_pos) & real & padding.keys[:, offset : offset + t, None]
        mask = mask | ~mask.any(-1, keepdim=True)
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=p)

    def attend_ragged(self, q: Tensor, k: Tensor, v: Tensor, rope: RotaryEmbedding | None, cache: RaggedSlot) -> Tensor:
        """One token per row, each at its own position (depth-wise decoding): the cache says which keys a row
        may weigh, ``visible`` which of those its position sees."""
        if rope is not None:
            cos, sin = cache.angles(rope, q.dtype)
            q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        keys, values, key_positions, allowed = cache.append(k, v)
        if type(self).visible is not AttentionMixer.visible:  # the causal default: `allowed` already is
            allowed = allowed & self.visible(cache.positions[:, None], key_positions)  # [b s]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None, None])

    def first_visible_key(self, offset: int) -> int:
        """A lower bound on the keys a query at ``offset`` or later can see (a sliding window's start)."""
        return 0
