"""The looped transformer ``(k⊗L)``: a block of k layers applied L times with shared weights.

One class covers every row of the papers this project reproduces:

* ``(kL⊗1)``, the plain deep model: ``block_layers=k*L, loops=1``;
* ``(k⊗L)``, the looped model: ``block_layers=k, loops=L``;
* middle looping ``(p⊗1, k⊗L, c⊗1)``: ``prelude_layers=p, coda_layers=c``;
* the unshared model the block regulariser acts on: ``loops=1``.

Generation (``generate``) decodes one token per step from a ``DecodeCache``
with one slot per layer application (``looped/cache.py``). An ``attention_mask``
(1 = token, 0 = padding) makes a padded batch, such as left-padded prompts, compute
each row as it would alone (``looped.mixers.Padding``).

Dimension letters: b batch, t time (sequence position), d model width,
f feed-forward width, v vocabulary, n loop index.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from looped.adaptive_decode import AdaptiveDecoding, generate_adaptive, greedy_loop
from looped.cache import DecodeCache, LayerCache, RowSlot, SharedKV
from looped.errors import MODEL_CONFIG, InputError
from looped.mixers import MIXERS, Padding, RotaryEmbedding, build_mixer

Slots = Iterator[LayerCache | None]  # one decode-cache slot per layer application, in order
NO_CACHE: Slots = itertools.repeat(None)


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
    (``halt_logits``), trained by ``LoopedLM``'s ``exit`` objective (``looped.halting``)."""
    kv_sharing: bool = False
    """Mixture-of-Recursions' recursive KV sharing: every loop of the block attends to the keys and
    values its layers computed in loop 1 (later loops project only queries). Decoding then caches the
    block once, not L times (``looped/cache.py``), and a token that exits early leaves no slot to fill.
    Changes the model's function: train with it. Needs KV-cache mixers (softmax, sparse)."""

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


def make_norm(config: LoopedConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model)
    return nn.LayerNorm(config.d_model, bias=config.bias)


class FeedForward(nn.Module):
    """Two-layer MLP ``w2(act(w1 x))``, or SwiGLU ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: LoopedConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.w3 = nn.Linear(config.d_model, config.d_ff, bias=config.bias) if config.activation == "swiglu" else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        if self.w3 is not None:
            h = F.silu(h) * self.w3(x)
        else:
            h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[self.activation](h)
        return self.w2(h)


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer: ``x + mix(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, config: LoopedConfig, mixer: str) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = build_mixer(
            mixer, config.d_model, config.n_heads, config.dropout, config.bias, **config.mixer_options.get(mixer, {})
        )
        self.ffn_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: RotaryEmbedding | None = None,
        cache: LayerCache | RowSlot | None = None,
        padding: Padding | None = None,
        shared: SharedKV | None = None,
    ) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, cache, padding, shared))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class LoopedTransformer(nn.Module):
    """Decoder-only, pre-norm, causal transformer whose middle block is looped.

    ``embed → prelude → (block of k layers) × L → coda → norm → head``
    """

    def __init__(self, config: LoopedConfig) -> None:
        super().__init__()
        for name in ("vocab_size", "max_seq_len"):
            if getattr(config, name) is None:
                raise ValueError(
                    f"LoopedConfig.{name} is not set: recipes link it from the data module; "
                    f"when building the model by hand pass {name}=..."
                )
        self.config = config
        pattern = config.attention_pattern

        def layers(n: int) -> nn.ModuleList:
            return nn.ModuleList(TransformerLayer(config, pattern[i % len(pattern)]) for i in range(n))

        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.pos_encoding == "learned" else None
        self.rope = (
            RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base)
            if config.pos_encoding == "rope"
            else None
        )
        self.prelude = layers(config.prelude_layers)
        self.block = layers(config.block_layers)  # the shared block, applied `loops` times
        self.coda = layers(config.coda_layers)
        self.norm = make_norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.exit_gate = nn.Linear(config.d_model, 1) if config.exit_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # GPT-2's depth scaling, with depth = layer *applications*: a looped block
        # adds to the residual stream L times, like L unshared layers would.
        residual_std = std / math.sqrt(2 * self.config.effective_depth)
        for name, p in self.named_parameters():
            if p.dim() < 2:  # norms and biases keep their own defaults
                continue
            is_residual_out = name.endswith(("o_proj.weight", "w2.weight"))
            nn.init.normal_(p, mean=0.0, std=residual_std if is_residual_out else std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        loops: int | None = None,
        return_loop_states: bool = False,
        grad_loops: int | None = None,
        cache: DecodeCache | None = None,
        attention_mask: Tensor | None = None,
        readout_after: int | None = None,
        state_positions: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits ``[b t v]`` after ``loops`` applications of the block (default: the trained L).

        With ``return_loop_states=True`` also returns the hidden state ``[b t d]``
        after each loop, so ``readout(loop_states[n])`` is the prediction of loop
        ``n + 1`` — every loop's prediction from one forward pass.
        ``grad_loops=m`` runs all but the last ``m`` loops without autograd
        (truncated backpropagation through the loop).

        With a ``cache`` (decoding), ``input_ids`` are the positions after the
        ``cache.length`` already seen, and every layer application reads and
        extends its own slot; the logits equal those of the full sequence's forward.

        ``attention_mask`` ``[b cache.length + t]`` (1 = token, 0 = padding, over the cached
        positions too) runs a padded batch: each token at its position among its row's
        tokens, padding never attended to, so every row's logits at its tokens are those of
        the row alone (the logits at padding positions mean nothing). A mask of all ones
        takes the unpadded path.

        ``readout_after=n`` (with ``return_loop_states``, without a cache) returns the logits of loop n
        instead of the last: one pass that is read at the trained L and runs deeper for its loop states
        (``LoopedLM``'s shared evaluation pass) reads out once, not twice.

        ``state_positions`` ``[b t]`` bool (with ``return_loop_states``) keeps only those positions of each
        loop state, ``[m d]``: an evaluation pass that reads a few labelled positions after every loop then
        holds no full ``[b t d]`` state per loop (holding them slowed its forward by ~10%, measured: every
        loop's activations went to fresh memory instead of the buffers the last loop freed).
        """
        loops = self.config.loops if loops is None else loops
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        if readout_after is not None and (
            cache is not None or not return_loop_states or not 1 <= readout_after <= loops
        ):
            raise ValueError(f"readout_after={readout_after} needs return_loop_states, no cache and 1..loops={loops}")
        if state_positions is not None and not return_loop_states:
            raise ValueError("state_positions picks positions of the loop states: it needs return_loop_states=True")
        offset = 0 if cache is None else cache.length  # absolute position of input_ids[:, 0]
        t = input_ids.shape[1]
        if offset + t > self.config.max_seq_len:
            raise ValueError(
                f"input has {offset + t} positions but LoopedConfig.max_seq_len={self.config.max_seq_len}; "
                "raise max_seq_len or shorten the data's sequence length (or the generation)"
            )
        padding = self.padding(attention_mask, input_ids.shape[0], offset + t)
        slots = NO_CACHE if cache is None else iter(self.decode_slots(cache, loops))
        shared = self.shared_kv()
        x = self.embed_tokens(input_ids, offset, padding)
        for layer in self.prelude:
            x = layer(x, self.rope, next(slots), padding)
        loop_input = x
        loop_states, read = [], x
        first_with_grad = 0 if grad_loops is None else max(0, loops - grad_loops)
        for n in range(loops):
            if self.config.input_injection == "add" and n > 0:
                x = x + loop_input
            with torch.set_grad_enabled(torch.is_grad_enabled() and n >= first_with_grad):
                x = self.apply_block(x, slots, padding, shared)
            if return_loop_states:
                loop_states.append(x if state_positions is None else x[state_positions])
            if n + 1 == (readout_after or loops):
                read = x
        logits = self.readout(read, slots=slots, padding=padding)
        if cache is not None:
            cache.length += t
        return (logits, loop_states) if return_loop_states else logits

    def embed_tokens(
        self, input_ids: Tensor, offset: int = 0, padding: Padding | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """``[b t d]`` token embeddings (plus learned positions) of ``input_ids`` placed after ``offset`` positions
        (or at ``positions`` ``[b t]``)."""
        x = self.embed(input_ids)
        if self.pos_embed is None:
            return x
        t = input_ids.shape[1]
        if positions is None and padding is not None:
            positions = padding.new(offset, t)
        return x + (self.pos_embed.weight[offset : offset + t] if positions is None else self.pos_embed(positions))

    @staticmethod
    def padding(attention_mask: Tensor | None, batch: int, length: int) -> Padding | None:
        """The ``Padding`` of a batch from its ``attention_mask`` ``[batch length]``; None when nothing is padded."""
        if attention_mask is None:
            return None
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but must be [batch, cached + new positions] "
                f"= {[batch, length]}: one entry per position the decode cache holds plus the new input_ids"
            )
        return None if bool(attention_mask.all()) else Padding(attention_mask)

    def apply_block(
        self,
        x: Tensor,
        slots: Slots = NO_CACHE,
        padding: Padding | None = None,
        shared: list[SharedKV] | list[None] | None = None,
    ) -> Tensor:
        """One application of the shared block; ``shared`` (one per block layer) carries loop 1's keys."""
        for layer, kv in zip(self.block, shared or [None] * len(self.block), strict=True):
            x = layer(x, self.rope, next(slots), padding, kv)
        return x

    def shared_kv(self) -> list[SharedKV] | list[None]:
        """One fresh ``SharedKV`` per block layer for a forward (``kv_sharing``), else Nones."""
        return [SharedKV() if self.config.kv_sharing else None for _ in self.block]

    def decode_slots(self, cache: DecodeCache, loops: int) -> list[LayerCache]:
        """The decode-cache slot of every layer application of a forward with ``loops`` loops, in order.

        One per application; with ``kv_sharing`` the block's k slots serve every loop.
        """
        c = self.config
        if not c.kv_sharing:
            return cache.bind(self.applications(loops))
        slots = cache.bind(c.unique_layers)
        p, k = c.prelude_layers, c.block_layers
        return slots[:p] + slots[p : p + k] * loops + slots[p + k :]

    def readout(
        self,
        hidden: Tensor,
        positions: Tensor | None = None,
        slots: Slots = NO_CACHE,
        padding: Padding | None = None,
    ) -> Tensor:
        """Logits from a hidden state: ``coda → norm → head``.

        ``positions`` (a boolean mask ``[b t]``) keeps only those positions' logits,
        ``[n v]``; without a coda this skips the head everywhere else, which is what
        makes per-loop evaluation nearly free.
        """
        if positions is not None and len(self.coda) == 0:
            hidden = hidden[positions]
        for layer in self.coda:
            hidden = layer(hidden, self.rope, next(slots), padding)
        if positions is not None and len(self.coda) > 0:
            hidden = hidden[positions]
        return self.head(self.norm(hidden))

    def halt_logits(self, state: Tensor) -> Tensor:
        """``[...]`` logit of the exit gate's halting probability λ_n for a loop state ``[... d]`` (``exit_gate``)."""
        if self.exit_gate is None:
            raise ValueError("this model has no exit gate; build it with LoopedConfig(exit_gate=True)")
        return self.exit_gate(self.norm(state)).squeeze(-1)

    def applications(self, loops: int | None = None) -> int:
        """Layer applications in one forward pass with ``loops`` loops (decode-cache slots)."""
        return self.config.applications(loops)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        eos_id: int | None = None,
        loops: int | None = None,
        attention_mask: Tensor | None = None,
        exit: str | None = None,
        return_loops: bool = False,
        schedule: str = "synchronous",
    ) -> Tensor | AdaptiveDecoding:
        """Greedy continuation of ``prompt`` ``[b p]``: ``[b p+n]`` with ``n <= max_new_tokens``.

        One forward over the prompt fills a ``DecodeCache``; each later token costs
        one position per layer application. With ``eos_id``, a row that has emitted
        it keeps emitting it, and decoding stops once every row has. Prompts of different
        lengths go left-padded, with ``attention_mask`` ``[b p]`` (0 at the padding).
        Dropout follows the module's mode: call ``eval()`` first for deterministic output.

        ``exit`` (``entropy_0.5``, ``kl_0.01``, ``stable_2``, ``gate_0.5``, ``fixed``) lets every
        new token stop at its own loop, ``loops`` at most (``looped.adaptive_decode``);
        ``return_loops=True`` then returns an ``AdaptiveDecoding`` with the loops each token used.
        ``schedule`` says how a batch's rows share the block: ``synchronous`` (a token's rows loop together,
        stopped rows leave) or ``depthwise`` (each row at its own token and loop, ``looped.depthwise``); the
        tokens are the same.
        """
        b, p = prompt.shape
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if p < 1:
            raise ValueError("generate needs a prompt of at least one token")
        if p + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt of {p} tokens + max_new_tokens={max_new_tokens} exceeds LoopedConfig.max_seq_len="
                f"{self.config.max_seq_len}; lower max_new_tokens to at most {self.config.max_seq_len - p} "
                "or raise max_seq_len"
            )
        if exit is not None or return_loops:
            decoding = generate_adaptive(
                self, prompt, max_new_tokens, exit or "fixed", eos_id, loops, attention_mask, schedule
            )
            return decoding if return_loops else decoding.tokens
        if max_new_tokens == 0:
            return prompt
        cache = DecodeCache(capacity=p + max_new_tokens)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: no mask to extend
        first = self(prompt, loops=loops, cache=cache, attention_mask=attention_mask)[:, -1].argmax(-1)

        def step(token: Tensor, mask: Tensor | None) -> Tensor:
            return self(token, loops=loops, cache=cache, attention_mask=mask)[:, -1].argmax(-1)

        tokens = [prompt, *greedy_loop(first, step, max_new_tokens, eos_id, attention_mask)]
        return torch.cat(tokens, dim=1)

    def flops_per_token(self, seq_len: int, loops: int | None = None) -> int:
        """Matmul FLOPs of one *forward* pass per token, counting the block ``loops`` times.

        Per layer application: Q, K, V, O (``8d²``), the FFN (``4df``, ``6df`` for
        SwiGLU) and attention scores and values (``4td``, counted over the full
        ``t × t`` square as SDPA's FLOP formula does). Plus the head (``2dv``).
        Training costs three times this (backward = 2 × forward).
        """
        c = self.config
        ffn = (6 if c.activation == "swiglu" else 4) * c.d_model * c.d_ff
        per_layer = 8 * c.d_model**2 + ffn + 4 * seq_len * c.d_model
        return self.applications(loops) * per_layer + 2 * c.d_model * c.vocab_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
