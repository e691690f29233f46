"""``LoopedConfig``: the architecture of a looped transformer ``(k⊗L)``, every field documented and checked.

A bad value fails in ``__post_init__`` with an ``InputError`` naming the recipe key
(``model.init_args.config.<field>``) and the fix, when the recipe is parsed, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from looped.errors import MODEL_CONFIG, InputError
from looped.model.mixers import MIXERS, build_mixer


@dataclass
class LoopedConfig:
    """Architecture of a looped transformer. Every field has the paper's meaning."""

    vocab_size: int | None = None
    """Number of token ids. Linked from the data module in recipes, never typed twice."""
    max_seq_len: int | None = None
    """Longest input the model accepts (RoPE / learned-position tables). Linked from the data module."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 8
    """Attention heads; must divide ``d_model``."""
    d_ff: int = 512
    """Hidden width of the feed-forward network."""
    block_layers: int = 1
    """k: layers in the shared block."""
    loops: int = 1
    """L: how many times the block is applied in training (override per call with ``forward(loops=...)``)."""
    prelude_layers: int = 0
    """Unshared layers before the loop (middle looping)."""
    coda_layers: int = 0
    """Unshared layers after the loop (middle looping)."""
    pos_encoding: Literal["rope", "learned"] = "rope"
    """Rotary embedding in every attention layer, or one learned absolute table at the input."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation before each sublayer (pre-norm) and before the head."""
    activation: Literal["gelu", "relu", "silu", "swiglu"] = "gelu"
    """Feed-forward non-linearity; ``swiglu`` adds a gate projection ``w3``."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    bias: bool = False
    """Bias terms in linear layers."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    input_injection: Literal["none", "add"] = "none"
    """``none`` as in the paper; ``add`` re-adds the loop input before every loop after the first."""
    attention: str | list[str] = "softmax"
    """Token mixer, or a per-layer pattern cycled within the prelude, the block and the coda."""
    mixer_options: dict = field(default_factory=dict)
    """Keyword options for the mixers, by mixer name: ``{linear: {feature_map: elu}, sparse: {window: 64}}``."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual output projections are scaled by 1/sqrt(2·depth)."""
    exit_gate: bool = False
    """A learned halting gate: a linear layer giving each token an exit probability after every loop
    (``halt_logits``), trained by ``LoopedLM``'s ``exit`` objective (``looped.training.halting``)."""
    kv_sharing: bool = False
    """Mixture-of-Recursions' recursive KV sharing: every loop of the block attends to the keys and
    values its layers computed in loop 1 (later loops project only queries). Decoding then caches the
    block once, not L times (``looped/model/cache.py``), and a token that exits early leaves no slot to fill.
    Changes the model's function: train with it. Needs KV-cache mixers (softmax, sparse)."""

    # Mixture-of-Recursions routers (Bae et al. 2025, ``looped/model/router.py``): the block runs, loop by
    # loop, on the tokens a router keeps, gathered in causal order, so a loop costs what its tokens cost.
    router: Literal["none", "expert_choice", "token_choice"] = "none"
    """``expert_choice``: before every loop a per-loop router keeps the top ``router_capacity`` of the
    tokens still active; ``token_choice``: one router gives every token its depth (1..L) up front."""
    router_capacity: float | list[float] = 1.0
    """Expert-choice: the fraction of each sequence's tokens loop n keeps, in (0, 1]; one value for every
    loop or one per loop, not growing with depth (MoR keeps ``(L-n+1)/L``: ``[1.0, 0.67, 0.33]``)."""
    router_warmup_steps: int = 0
    """Expert-choice: training steps over which every loop's capacity falls linearly from 1 to its value."""
    router_aux_loss: Literal["bce", "stop_grad"] = "bce"
    """Expert-choice: ``bce`` trains the router's own logits toward top-k membership (its sigmoid > 0.5 is
    then the causal decision when decoding); ``stop_grad`` trains a second router on detached states instead."""
    router_aux_weight: float = 0.01
    """Weight of the auxiliary loss in ``LoopedLM``'s loss (expert-choice: the BCE; token-choice: balancing)."""
    router_z_weight: float = 0.001
    """Weight of the router z-loss (the squared log-sum-exp of its logits), which keeps the logits small."""

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:  # named as a recipe sets it: model.init_args.config.<field>
                raise InputError(f"{MODEL_CONFIG}.{field}: {msg}")

        for name in ("d_model", "n_heads", "d_ff", "block_layers", "loops"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("prelude_layers", "coda_layers"):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        need(
            self.d_model % self.n_heads == 0,
            "d_model",
            f"{self.d_model} is not divisible by n_heads={self.n_heads}; "
            f"pick d_model as a multiple of n_heads (e.g. {self.n_heads * max(1, round(self.d_model / self.n_heads))})",
        )
        head_dim = self.d_model // self.n_heads
        need(
            self.pos_encoding != "rope" or head_dim % 2 == 0,
            "n_heads",
            f"RoPE needs an even head width, but d_model/n_heads = {self.d_model}/{self.n_heads} = {head_dim}; "
            "pick n_heads so that the head width is even, or set pos_encoding: learned",
        )
        need(0.0 <= self.dropout < 1.0, "dropout", f"must lie in [0, 1), got {self.dropout}")
        for name in self.attention_pattern:
            need(name in MIXERS, "attention", f"unknown mixer {name!r}; choose from {sorted(MIXERS)}")
        for name in self.mixer_options:
            need(name in MIXERS, "mixer_options", f"options for unknown mixer {name!r}; choose from {sorted(MIXERS)}")
        for name in set(self.attention_pattern):
            # Build each mixer once on the meta device (no memory, no compute): a bad
            # option fails here, when the recipe is parsed, not when the model is built.
            with torch.device("meta"):
                build_mixer(
                    name, self.d_model, self.n_heads, self.dropout, self.bias, **self.mixer_options.get(name, {})
                )
        for name in ("vocab_size", "max_seq_len"):
            value = getattr(self, name)
            need(value is None or value >= 1, name, f"must be >= 1, got {value}")
        recurrent = [name for name in self.attention_pattern if not MIXERS[name].kv_cache]
        need(
            not (self.kv_sharing and recurrent),
            "kv_sharing",
            f"shares keys and values across loops, but {recurrent[:1]} attention keeps a recurrent state "
            "instead (already constant in size); use softmax or sparse attention, or kv_sharing: false",
        )
        if self.router != "none":
            self.check_router(need)

    def check_router(self, need) -> None:
        """The router's fields: a capacity schedule the loops can follow, mixers that take gathered tokens."""
        need(
            self.router in ("expert_choice", "token_choice"),
            "router",
            f"unknown router {self.router!r}; choose none, expert_choice or token_choice",
        )
        capacity = self.router_capacity
        if isinstance(capacity, list | tuple):
            need(
                len(capacity) == self.loops,
                "router_capacity",
                f"gives {len(capacity)} capacities for loops={self.loops}; give one per loop or a single float",
            )
        schedule = self.capacity_schedule
        need(
            all(0.0 < c <= 1.0 for c in schedule),
            "router_capacity",
            f"every capacity must lie in (0, 1] (a fraction of the tokens), got {capacity}",
        )
        need(
            all(a >= b for a, b in zip(schedule, schedule[1:])),
            "router_capacity",
            f"{capacity} grows with depth, but a loop keeps only tokens the loop before kept; make it non-increasing",
        )
        need(self.router_warmup_steps >= 0, "router_warmup_steps", f"must be >= 0, got {self.router_warmup_steps}")
        for name in ("router_aux_weight", "router_z_weight"):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        cannot = [name for name in self.attention_pattern if not MIXERS[name].gathers]
        need(
            not cannot,
            "router",
            f"runs the block on gathered tokens, but {cannot[:1]} attention cannot take a gathered sub-sequence; "
            "use softmax, linear or sparse attention, or router: none",
        )
        need(
            not self.kv_sharing,
            "kv_sharing",
            "is not yet combined with a router (later loops' tokens would attend to loop 1's gathered keys); "
            "set kv_sharing: false or router: none",
        )

    @property
    def capacity_schedule(self) -> list[float]:
        """Expert-choice: the fraction of tokens each loop 1..L keeps (all 1.0 without a router)."""
        c = self.router_capacity
        return [float(v) for v in c] if isinstance(c, list | tuple) else [float(c)] * self.loops

    @property
    def attention_pattern(self) -> list[str]:
        return [self.attention] if isinstance(self.attention, str) else list(self.attention)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_depth(self) -> int:
        """Layer applications in one forward pass at the trained loop count."""
        return self.applications()

    def applications(self, loops: int | None = None) -> int:
        """Layer applications in one forward pass with ``loops`` loops (default: the trained count)."""
        return self.prelude_layers + self.block_layers * (self.loops if loops is None else loops) + self.coda_layers

    @property
    def unique_layers(self) -> int:
        return self.prelude_layers + self.block_layers + self.coda_layers
