"""``LoopedHFConfig``: a ``LoopedConfig`` as a ``transformers`` configuration (``config.json``, ``model_type: looped``).

Every ``LoopedConfig`` field is a field here, under its own name (``d_model``, ``block_layers``,
``loops``...), declared from the dataclass itself so the two never drift apart; the usual
``transformers`` names (``hidden_size``, ``num_attention_heads``, ``max_position_embeddings``...)
are aliases of them, which is what generic tools such as lm-evaluation-harness read.
``LoopedConfig`` validates the values: a bad field fails here with its own message.

Imports only ``transformers.configuration_utils``, so ``AutoConfig`` can learn the model type
without loading the modelling code (see ``looped/hf/__init__.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from looped.model import LoopedConfig

MODEL_TYPE = "looped"


def declare_looped_fields(namespace: dict[str, Any]) -> None:
    """Declare every ``LoopedConfig`` field and its default in a class body (transformers configs are dataclasses)."""
    annotations = namespace.setdefault("__annotations__", {})
    for f in dataclasses.fields(LoopedConfig):
        annotations[f.name] = f.type
        namespace[f.name] = dataclasses.field(default=f.default, default_factory=f.default_factory)


class LoopedHFConfig(PreTrainedConfig):
    """The architecture of a looped transformer ``(k⊗L)`` (every ``LoopedConfig`` field) plus its special tokens."""

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",  # what lm-eval's `hf` model reads as the context length
        "tie_word_embeddings": "tie_embeddings",
    }
    declare_looped_fields(locals())  # a class body's locals() is the namespace the dataclass reads
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.looped_config()  # LoopedConfig checks every field and names the bad one

    @property
    def num_hidden_layers(self) -> int:
        """Layer *applications* in one forward at the trained L (``p + k·L + c``): the decode-cache slots, and
        what a per-layer count means for a looped model. ``hidden_states`` holds one state per loop, not per
        application (``LoopedForCausalLM``)."""
        return self.looped_config().applications()

    def looped_config(self) -> LoopedConfig:
        """The ``LoopedConfig`` these fields describe (a fresh one: editing it leaves this config alone)."""
        return LoopedConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoopedConfig)})

    @classmethod
    def from_looped_config(cls, config: LoopedConfig, **kwargs) -> LoopedHFConfig:
        """This config with ``config``'s fields; ``kwargs`` set the rest (``eos_token_id=...``)."""
        return cls(**dataclasses.asdict(config), **kwargs)
