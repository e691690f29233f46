"""Token mixers: the interface (``AttentionMixer``), one file per mixer, and the registry that names them.

``LoopedConfig.attention`` names a mixer (or a per-layer pattern of names) from
``MIXERS``. A new mixer is one file here with a subclass of ``AttentionMixer``
plus one line in ``MIXERS``: the registry is an explicit dict, so a mixer is
available exactly when it is listed, not when some module happens to import it.
``PositionMLP`` is no attention at all but takes the same call and class attributes.
"""

from __future__ import annotations

from torch import nn

from looped.errors import MODEL_CONFIG, InputError
from looped.model.mixers.base import AttentionMixer, Padding, RotaryEmbedding
from looped.model.mixers.linear import LinearAttention
from looped.model.mixers.mlp import PositionMLP
from looped.model.mixers.softmax import SoftmaxAttention
from looped.model.mixers.sparse import SparseAttention

MIXERS: dict[str, type[AttentionMixer] | type[PositionMLP]] = {
    "softmax": SoftmaxAttention,  # SDPA, causal or not (LoopedConfig.causal)
    "linear": LinearAttention,  # Katharopoulos et al. 2020: chunked parallel form, recurrent decoding
    "sparse": SparseAttention,  # Sparse Transformer patterns: local, strided, fixed
    "mlp": PositionMLP,  # TRM's MLP over positions (mlp_t), non-causal, one fixed length
}


def build_mixer(name: str, d_model: int, n_heads: int, dropout: float, bias: bool, **options) -> nn.Module:
    """A mixer by name; ``options`` come from ``LoopedConfig.mixer_options[name]``."""
    if name not in MIXERS:
        raise InputError(f"{MODEL_CONFIG}.attention: unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    try:
        return MIXERS[name](d_model=d_model, n_heads=n_heads, dropout=dropout, bias=bias, **options)
    except TypeError as err:
        raise InputError(f"{MODEL_CONFIG}.mixer_options.{name}: {err}") from err


__all__ = [
    "MIXERS",
    "AttentionMixer",
    "LinearAttention",
    "Padding",
    "PositionMLP",
    "RotaryEmbedding",
    "SoftmaxAttention",
    "SparseAttention",
    "build_mixer",
]
