"""Sparse causal attention: each query sees a fixed, data-independent subset of keys.

Three patterns, all causal (key ``s`` is visible from query ``t`` only if ``s <= t``):

* ``local`` — a sliding window of the last ``window`` positions:
  ``t - window < s <= t``.
* ``strided`` — the Sparse Transformer's strided pattern (Child et al. 2019, §4.2):
  ``s <= t`` and (``t - s < stride`` or ``(t - s) % stride == 0``); one head
  pattern attends to the previous ``stride`` positions, the other to every
  ``stride``-th position before — here merged into one mask.
* ``fixed`` — the Sparse Transformer's fixed pattern (Child et al. 2019, §4.2):
  ``s <= t`` and (``s // stride == t // stride`` or ``s % stride == stride - 1``);
  a query sees its own block of ``stride`` positions plus the last position of
  every earlier block ("summary" columns).

Every pattern keeps the diagonal ``s == t``, so no row is empty and softmax
never divides by zero.

The mask is one ``mask_mod`` (FlexAttention's signature) used twice: on CUDA it
becomes a block mask for the compiled ``flex_attention`` kernel, which skips
fully masked tiles; on CPU (FlexAttention has no CPU backward) it is evaluated
on index grids into a dense boolean ``[t t]`` mask for
``F.scaled_dot_product_attention``.

Dimension letters: b batch, h heads, t time, e head width.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from looped.errors import MODEL_CONFIG, InputError
from looped.model.mixers.base import AttentionMixer

PATTERNS = ("local", "strided", "fixed")

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def sparse_mask_mod(pattern: str, window: int, stride: int) -> MaskMod:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for a sparse pattern (see module doc)."""
    if pattern == "local":

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    elif pattern == "strided":

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            dist = q_idx - kv_idx
            return (dist >= 0) & ((dist < stride) | (dist % stride == 0))

    elif pattern == "fixed":

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            same_block = kv_idx // stride == q_idx // stride
            summary = kv_idx % stride == stride - 1
            return (kv_idx <= q_idx) & (same_block | summary)

    else:
        raise InputError(f"{MODEL_CONFIG}.mixer_options.sparse.pattern: unknown {pattern!r}; choose one of {PATTERNS}")
    return mask_mod


@lru_cache(maxsize=64)
def dense_mask(pattern: str, window: int, stride: int, t: int, device: torch.device) -> Tensor:
    """The pattern as a boolean ``[t t]`` mask (True = visible), for SDPA."""
    idx = torch.arange(t, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return sparse_mask_mod(pattern, window, stride)(zero, zero, idx[:, None], idx[None, :])


@lru_cache(maxsize=64)
def block_mask(pattern: str, window: int, stride: int, t: int, device: torch.device):
    """The pattern as a FlexAttention ``BlockMask`` for sequence length ``t``."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = sparse_mask_mod(pattern, window, stride)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=device)


_compiled_flex: Callable | None = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """``flex_attention`` compiled once per process; uncompiled it materialises the full score matrix."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _compiled_flex = torch.compile(flex)
    return _compiled_flex(q, k, v, block_mask=mask)


class SparseAttention(AttentionMixer):
    """Causal attention restricted to a ``local``, ``strided`` or ``fixed`` sparsity pattern.

    Options (``LoopedConfig.mixer_options.sparse``): ``pattern``, ``window``
    (keys seen by ``local``), ``stride`` (period of ``strided`` and ``fixed``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = False,
        pattern: str = "local",
        window: int = 64,
        stride: int = 64,
        **heads,
    ) -> None:
        super().__init__(d_model, n_heads, dropout, bias, **heads)
        if pattern not in PATTERNS:
            raise InputError(
                f"{MODEL_CONFIG}.mixer_options.sparse.pattern: unknown {pattern!r}; choose one of {list(PATTERNS)}"
            )
        for name, value in (("window", window), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{MODEL_CONFIG}.mixer_options.sparse.{name}: must be an int >= 1, got {value!r}")
        self.pattern = pattern
        self.window = window
        self.stride = stride

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, window={self.window}, stride={self.stride}"

    def visible(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """The pattern at absolute positions: decoding with a KV cache masks exactly as training does."""
        zero = torch.zeros((), dtype=torch.long, device=q_idx.device)
        return sparse_mask_mod(self.pattern, self.window, self.stride)(zero, zero, q_idx, kv_idx)

    def first_visible_key(self, offset: int) -> int:
        # A sliding window reads only its last `window` keys: O(window) work per decoded token.
        return max(0, offset - self.window + 1) if self.pattern == "local" else 0

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        t = q.shape[-2]
        p = self.dropout if self.training else 0.0
        # FlexAttention has no attention-probability dropout; with dropout on, take the dense path.
        if q.device.type == "cuda" and p == 0.0:
            return flex_attention(q, k, v, block_mask(self.pattern, self.window, self.stride, t, q.device))
        mask = dense_mask(self.pattern, self.window, self.stride, t, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
