"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

With a positive feature map φ, position ``t`` reads

    out_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps),   S_t = Σ_{s≤t} φ(k_s) v_sᵀ,   z_t = Σ_{s≤t} φ(k_s)

(Eq. 16-20 of the paper). Two equal ways to compute it:

* training, ``attend``: the *chunked parallel form*. Cut time into chunks of
  ``c``; inside a chunk use the masked quadratic form ``(φQ φKᵀ ⊙ M) V``; across
  chunks add the state of all earlier chunks, an exclusive cumsum over
  per-chunk summaries ``φK_nᵀ V_n``. Cost O(t·c·e + t·e²), no loop over time.
* decoding, ``step``: the *recurrent form*, an O(1) state ``(S, z)`` per token.

In a padded batch the padding keys get ``φ(k) = 0``: they add nothing to ``S``
or ``z``, so a padded row reads exactly what it would alone.

RoPE is applied to q and k by ``AttentionMixer`` *before* φ. That is fine:
the rotated vectors are still just vectors, φ keeps the scores positive, and
causality and the equality of the two forms do not depend on what q and k are.
(It is not the "relative position" guarantee RoPE gives softmax attention.)

There is no attention-probability matrix, so the mixer's ``dropout`` is not
applied here; the layer's residual dropout still is.

Dimension letters: b batch, h heads, t time, n chunk index, c position within
a chunk (``s`` a second one), e head width (``f`` a second one, for ``e×e`` states).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from looped.errors import MODEL_CONFIG, InputError
from looped.model.cache import LayerCache
from looped.model.mixers.base import AttentionMixer, Padding

FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": lambda x: F.elu(x) + 1.0,  # the paper's choice: positive, smooth, gradient everywhere
    "relu": F.relu,
}

State = tuple[Tensor, Tensor]  # (S [b h e e], z [b h e])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: sums over thousands of positions overflow bf16's 8-bit mantissa."""
    return torch.promote_types(dtype, torch.float32)


class LinearAttention(AttentionMixer):
    """Causal linear attention with a positive feature map; chunked for training, recurrent for decoding."""

    kv_cache = False  # decoding keeps the recurrent state (S, z), not keys per position

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = False,
        feature_map: str = "elu",
        chunk_size: int = 64,
        eps: float = 1e-6,
        **heads,
    ) -> None:
        super().__init__(d_model, n_heads, dropout, bias, **heads)
        if feature_map not in FEATURE_MAPS:
            raise InputError(
                f"{MODEL_CONFIG}.mixer_options.linear.feature_map: {feature_map!r} is not a positive "
                f"feature map; choose one of {sorted(FEATURE_MAPS)}"
            )
        if chunk_size < 1:
            raise InputError(f"{MODEL_CONFIG}.mixer_options.linear.chunk_size: must be >= 1, got {chunk_size}")
        if eps <= 0:
            raise InputError(f"{MODEL_CONFIG}.mixer_options.linear.eps: must be > 0, got {eps}")
        self.feature_map = feature_map
        self.phi = FEATURE_MAPS[feature_map]
        self.chunk_size = chunk_size
        self.eps = eps

    def features(self, k: Tensor, key_mask: Tensor | None) -> Tensor:
        """``φ(k)`` in the compute dtype, zero at padding keys (``key_mask`` ``[b t]``, False = padding)."""
        phi_k = self.phi(k.to(compute_dtype(k.dtype)))
        if key_mask is not None:
            # [b t] -> [b 1 t 1] against k [b h t e]; [b] -> [b 1 1] against a step's k [b h e]
            phi_k = phi_k * key_mask.reshape(key_mask.shape[0], 1, *key_mask.shape[1:], 1).to(phi_k.dtype)
        return phi_k

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Chunked parallel form on ``[b h t e]``; returns ``[b h t e]`` in ``v``'s dtype."""
        out_dtype = v.dtype
        dtype = compute_dtype(out_dtype)
        t, c = q.shape[-2], self.chunk_size
        # Autocast would push the einsums back to bf16; the normaliser needs float32.
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = self.phi(q.to(dtype)), self.features(k, key_mask), v.to(dtype)
            # Zero-pad time to a multiple of c *after* φ: padded keys are then exactly
            # zero, and padding sits at the end, so no real position ever sees it.
            pad = -t % c
            if pad:
                q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            q, k, v = (rearrange(x, "b h (n c) e -> b h n c e", c=c) for x in (q, k, v))

            # Inside each chunk: the masked quadratic form, s <= c.
            scores = einsum(q, k, "b h n c e, b h n s e -> b h n c s")
            scores = scores * torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
            num = einsum(scores, v, "b h n c s, b h n s e -> b h n c e")
            den = scores.sum(-1)

            # Across chunks: state of all *earlier* chunks = exclusive cumsum of summaries.
            kv = einsum(k, v, "b h n c e, b h n c f -> b h n e f")
            kz = k.sum(-2)  # [b h n e]
            # Shift a cumsum right by one chunk (not cumsum - own term: that cancels badly in float32).
            s_prev = F.pad(kv.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
            z_prev = F.pad(kz.cumsum(2)[:, :, :-1], (0, 0, 1, 0))
            num = num + einsum(q, s_prev, "b h n c e, b h n e f -> b h n c f")
            den = den + einsum(q, z_prev, "b h n c e, b h n e -> b h n c")

            # φ > 0 (relu: >= 0) keeps den >= 0, so den + eps >= eps: a clamped denominator.
            out = num / (den.unsqueeze(-1) + self.eps)
            out = rearrange(out, "b h n c e -> b h (n c) e")[:, :, :t]
        return out.to(out_dtype)

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> State:
        """Empty recurrent state ``(S [b h e e], z [b h e])``, kept in at least float32."""
        e = self.q_proj.out_features // self.n_heads
        dtype = compute_dtype(dtype)
        s = torch.zeros(batch, self.n_heads, e, e, device=device, dtype=dtype)
        z = torch.zeros(batch, self.n_heads, e, device=device, dtype=dtype)
        return s, z

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: State, key_mask: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """One decoding step on ``[b h e]`` (q, k already rotated by RoPE at this position).

        Returns the output ``[b h e]`` in ``v``'s dtype and the new state; the state is
        not modified in place, so autograd can run through a sequence of steps.
        ``key_mask`` ``[b]`` (False = padding) keeps a padding position out of the state.
        """
        s, z = state
        dtype = s.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, vv = self.phi(q.to(dtype)), self.features(k, key_mask), v.to(dtype)
            s = s + einsum(k, vv, "b h e, b h f -> b h e f")
            z = z + k
            num = einsum(q, s, "b h e, b h e f -> b h f")
            den = einsum(q, z, "b h e, b h e -> b h")
            out = num / (den.unsqueeze(-1) + self.eps)
        return out.to(v.dtype), (s, z)

    def attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, key_mask: Tensor | None = None
    ) -> Tensor:
        """Decoding: the recurrent state ``(S, z)`` is the cache, O(1) per token.

        A prefill (empty cache, several positions) runs the chunked form and sums its
        keys into the state; every later position goes through ``step``.
        """
        if cache.state is None and q.shape[-2] > 1:
            out = self.attend(q, k, v, key_mask)
            dtype = compute_dtype(v.dtype)
            with torch.autocast(device_type=q.device.type, enabled=False):
                phi_k = self.features(k, key_mask)
                cache.state = (einsum(phi_k, v.to(dtype), "b h t e, b h t f -> b h e f"), phi_k.sum(-2))
            return out
        if cache.state is None:
            cache.state = self.init_state(q.shape[0], q.device, v.dtype)
        outs = []
        for i in range(q.shape[-2]):
            mask = None if key_mask is None else key_mask[:, i]
            out, cache.state = self.step(q[:, :, i], k[:, :, i], v[:, :, i], cache.state, mask)
            outs.append(out)
        return torch.stack(outs, dim=-2)

    def attend_padded(
        self, q: Tensor, k: Tensor, v: Tensor, padding: Padding, cache: LayerCache | None = None
    ) -> Tensor:
        """A padded batch: padding keys are zeroed after φ, so they never enter the sums (see module doc)."""
        offset = 0 if cache is None else cache.offset
        key_mask = padding.keys[:, offset : offset + q.shape[-2]]
        return self.attend(q, k, v, key_mask) if cache is None else self.attend_cached(q, k, v, cache, key_mask)

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map!r}, chunk_size={self.chunk_size}, eps={self.eps}"
