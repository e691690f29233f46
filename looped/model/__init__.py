"""The looped transformer itself, torch only: ``import looped.model`` loads no Lightning and no ``transformers``.

* ``config`` — ``LoopedConfig``, every field documented and checked when a recipe is parsed;
* ``transformer`` — ``LoopedTransformer``: embed → prelude → (block of k layers) × L → coda → head;
* ``step`` — ``LoopStep``, the one loop step every path applies the block through (per-loop adapters
  and routers belong there);
* ``cache`` — ``DecodeCache``: one decoding slot per layer application;
* ``recursion`` — one supervision step of a recursive reasoner (TRM, HRM, or ``(k⊗L)`` on a carried state);
* ``mixers/`` — the token mixers (softmax, linear, sparse, the MLP over positions) behind one interface, and RoPE.
"""

from looped.model.config import LoopedConfig
from looped.model.step import LoopStep
from looped.model.transformer import FeedForward, LoopedTransformer, TransformerLayer, make_norm

__all__ = ["FeedForward", "LoopStep", "LoopedConfig", "LoopedTransformer", "TransformerLayer", "make_norm"]
