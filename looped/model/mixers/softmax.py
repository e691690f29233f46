"""Softmax attention, the standard transformer's mixer: causal, or non-causal for inputs read whole.

Dimension letters: b batch, h heads, t time, e head width.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from looped.model.mixers.base import AttentionMixer


class SoftmaxAttention(AttentionMixer):
    """Softmax attention through ``F.scaled_dot_product_attention``, causal unless ``causal=False``.

    SDPA picks the fused flash / memory-efficient kernel on GPU and the fused
    CPU kernel here; no hand-written attention.
    """

    bidirectional = True

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
