"""The looped transformer ``(k⊗L)``: a block of k layers applied L times with shared weights.

One class covers every row of the papers this project reproduces:

* ``(kL⊗1)``, the plain deep model: ``block_layers=k*L, loops=1``;
* ``(k⊗L)``, the looped model: ``block_layers=k, loops=L``;
* middle looping ``(p⊗1, k⊗L, c⊗1)``: ``prelude_layers=p, coda_layers=c``;
* the unshared model the block regulariser acts on: ``loops=1``.

The loop is a plain ``for`` over ``loop_step``, the one place the shared block is applied
(``looped.model.step``). Generation (``generate``, ``looped.decoding``) decodes one token per step
from a ``DecodeCache`` with one slot per layer application (``looped.model.cache``). An
``attention_mask`` (1 = token, 0 = padding) makes a padded batch, such as left-padded prompts,
compute each row as it would alone (``looped.model.mixers.Padding``).

Dimension letters: b batch, t time (sequence position), d model width,
f feed-forward width, v vocabulary, n loop index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from looped.decoding import greedy
from looped.model import recursion
from looped.model.cache import DecodeCache, LayerCache, RaggedSlot, RowSlot, SharedKV
from looped.model.config import LoopedConfig
from looped.model.lora import LoopRelaxation
from looped.model.mixers import Padding, PositionMLP, RotaryEmbedding, build_mixer
from looped.model.router import Router
from looped.model.step import DecodeSlots, LoopStep, Slot


def make_norm(config: LoopedConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(
        config.d_model, bias=config.bias, **({} if config.norm_eps is None else {"eps": config.norm_eps})
    )


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
    """Pre-norm decoder layer: ``x + mix(norm(x))`` then ``x + ffn(norm(x))``; post-norm (``norm_placement:
    post``, TRM and HRM): ``norm(x + mix(x))`` then ``norm(x + ffn(x))``.

    ``gradient_checkpointing`` (with ``_gradient_checkpointing_func``, e.g. ``torch.utils.checkpoint``): every
    application recomputed in backward instead of stored. ``transformers``' ``gradient_checkpointing_enable``
    sets these two by name (``looped.hf``); the Lightning path checkpoints with hooks instead (``parallel.py``).
    """

    gradient_checkpointing = False

    def __init__(self, config: LoopedConfig, mixer: str) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = build_mixer(
            mixer, config.d_model, config.n_heads, config.dropout, config.bias, **config.mixer_kwargs(mixer)
        )
        self.ffn_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)
        self.post_norm = config.norm_placement == "post"

    def forward(
        self,
        x: Tensor,
        rope: RotaryEmbedding | None = None,
        cache: LayerCache | RowSlot | RaggedSlot | None = None,
        padding: Padding | None = None,
        shared: SharedKV | None = None,
    ) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(self.apply_layer, x, rope, cache, padding, shared)
        return self.apply_layer(x, rope, cache, padding, shared)

    def apply_layer(
        self,
        x: Tensor,
        rope: RotaryEmbedding | None,
        cache: LayerCache | RowSlot | RaggedSlot | None,
        padding: Padding | None,
        shared: SharedKV | None,
    ) -> Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.dropout(self.attn(x, rope, cache, padding, shared)))
            return self.ffn_norm(x + self.dropout(self.ffn(x)))
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
        self.pos_embed = nn.Embedding(config.positions, config.d_model) if config.pos_encoding == "learned" else None
        self.rope = (
            RotaryEmbedding(config.head_dim, config.positions, config.rope_base, config.rope_scaling)
            if config.pos_encoding == "rope"
            else None
        )
        self.prelude = layers(config.prelude_layers)
        self.block = layers(config.block_layers)  # the shared block, applied `loops` times by loop_step
        self.high = layers(config.high_layers)  # HRM's high-level module (recursion: hrm), also run by loop_step
        self.coda = layers(config.coda_layers)
        self.norm = make_norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.exit_gate = nn.Linear(config.d_model, 1) if config.exit_gate else None
        concat = config.input_injection == "concat"
        self.adapter = nn.Linear(2 * config.d_model, config.d_model, bias=False) if concat else None
        # per-loop LoRA and vectors on the block (relaxation), read by loop_step only
        self.lora = LoopRelaxation(self.block, config.loops, config.lora_rank) if config.lora_rank > 0 else None
        self.router = Router(config) if config.router != "none" else None
        # The recursive reasoners (looped/model/recursion.py): the halting Q-head and the fixed vectors the carried
        # states start from (TRM's and HRM's H_init, L_init: drawn once, never trained, saved with the weights).
        self.q_head = nn.Linear(config.d_model, 2) if config.q_head else None
        if config.recursion != "loop":
            self.register_buffer("state_init", torch.empty(2, config.d_model))
        # TRM's and HRM's puzzle-id embedding, read as a prefix of every supervision step (recursion.py).
        self.puzzle_embedding = None
        if config.puzzle_embedding_len > 0:
            if config.puzzle_ids is None:
                raise ValueError(
                    "LoopedConfig.puzzle_ids is not set: recipes link it from the data module's num_puzzle_ids; "
                    "when building the model by hand pass puzzle_ids=..."
                )
            self.puzzle_embedding = nn.Embedding(config.puzzle_ids, config.puzzle_embedding_dim or config.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            self.init_parameter(name, p)
        if self.config.recursion != "loop" and not self.state_init.is_meta:
            with torch.no_grad():
                nn.init.trunc_normal_(self.state_init, std=1.0, a=-2.0, b=2.0)

    @torch.no_grad()
    def init_parameter(self, name: str, p: Tensor) -> None:
        """``p``'s initial value, by its name in this module: every parameter has one, so a checkpoint that
        lacks some (``transformers``' loader initialises each missing one alone) never leaves memory unset."""
        if name.startswith("lora."):  # fresh adapters change nothing: B = 0, each loop's vectors the shared ones'
            if ".vectors." in name:
                nn.init.ones_(p) if name.endswith("norm__weight") else nn.init.zeros_(p)
            else:
                nn.init.zeros_(p) if ".b." in name else nn.init.normal_(p, std=self.config.init_std)
            return
        if name == "puzzle_embedding.weight":  # TRM: zero, so a new puzzle's prefix starts as every other's
            nn.init.zeros_(p)
            return
        if name.startswith("q_head."):  # TRM, HRM: halting starts (almost) never chosen, sigmoid(-5) ≈ 0.007
            nn.init.zeros_(p) if name.endswith("weight") else nn.init.constant_(p, -5.0)
            return
        if name == "adapter.weight":  # [I | 0]: every loop starts from the loop input, as without a state
            d = self.config.d_model
            p.copy_(torch.cat((torch.eye(d), torch.zeros(d, d)), dim=1))
            return
        if p.dim() < 2:  # norm scales start at 1, biases and norm shifts at 0 (their modules' own defaults)
            nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            return
        std = self.config.init_std
        # GPT-2's depth scaling, with depth = layer *applications*: a looped block
        # adds to the residual stream L times, like L unshared layers would.
        if name.endswith(("o_proj.weight", "w2.weight")):
            std = std / math.sqrt(2 * self.config.effective_depth)
        nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        input_ids: Tensor | None,
        loops: int | None = None,
        return_loop_states: bool = False,
        grad_loops: int | None = None,
        cache: DecodeCache | None = None,
        attention_mask: Tensor | None = None,
        readout_after: int | None = None,
        state_positions: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        carried: Tensor | None = None,
        puzzle_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]] | tuple[Tensor, Tensor | None, Tensor]:
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

        ``inputs_embeds`` ``[b t d]`` instead of ``input_ids`` (``input_ids=None``): vectors that stand where token
        embeddings would (soft prompts, a multimodal front end, continuous thoughts); learned positions are
        still added.

        ``carried`` ``[s b t d]``: one supervision step of a recursive reasoner from that state instead, returning
        ``(logits, Q-head logits or None, new state)`` (``reason``, ``looped/model/recursion.py``). It runs through
        ``forward`` so that what hooks the root module (FSDP2's unsharding, memory trackers) sees it. ``puzzle_ids``
        ``[b]`` pick the rows of the puzzle embedding its prefix reads (``puzzle_embedding_len``; None: id 0).
        """
        if carried is not None:
            return recursion.supervision_step(self, input_ids, carried, puzzle_ids)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass input_ids (token ids [b t]) or inputs_embeds ([b t d_model] vectors), not both")
        if cache is not None and not self.config.causal:
            raise ValueError(
                "this model is non-causal (LoopedConfig.causal: false): it reads inputs whole and cannot decode "
                "with a cache or generate; build it with causal: true to generate"
            )
        if self.config.recursion != "loop" or self.puzzle_embedding is not None:
            raise ValueError(
                f"a recursion: {self.config.recursion} model (or one with a puzzle embedding) runs supervision steps, "
                "not loops: call "
                "model.reason(input_ids, state) (looped/model/recursion.py) or train it with DeepSupervision"
            )
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
        b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if offset + t > self.config.max_seq_len:
            raise ValueError(
                f"input has {offset + t} positions but LoopedConfig.max_seq_len={self.config.max_seq_len}; "
                "raise max_seq_len or shorten the data's sequence length (or the generation)"
            )
        padding = self.padding(attention_mask, b, offset + t)
        slots = None if cache is None else self.decode_slots(cache, loops)
        x = self.embed_tokens(input_ids, offset, padding, embeds=inputs_embeds)
        x = self.run_layers(self.prelude, x, None if slots is None else slots.prelude, padding)
        loop_input, shared = x, self.shared_kv()
        loop_states, read = [], x
        first_with_grad = 0 if grad_loops is None else max(0, loops - grad_loops)
        routing = None if self.router is None else self.router.begin(padding, loops, cache)
        for n in range(1, loops + 1):
            slot = None if slots is None else slots.loops[n - 1]
            step = LoopStep(n, loop_input, slot, padding, shared, routing=routing)
            with torch.set_grad_enabled(torch.is_grad_enabled() and n > first_with_grad):
                x = self.loop_step(x, step)
            if return_loop_states:
                loop_states.append(x if state_positions is None else x[state_positions])
            if n == (readout_after or loops):
                read = x
        logits = self.readout(read, slots=None if slots is None else slots.coda, padding=padding)
        if cache is not None:
            cache.length += t
        return (logits, loop_states) if return_loop_states else logits

    def loop_step(self, x: Tensor, step: LoopStep | None = None) -> Tensor:
        """Loop ``step.loop`` of the shared block on the active rows ``x`` ``[a t d]``: input injection, then the
        block's k layers with their cache slots, padding and shared keys. The only place the block is applied
        (``looped.model.step``); without a ``step``, one plain application (loop 1, no cache)."""
        step = LoopStep() if step is None else step
        full, selection = x, None
        if step.routing is not None:  # a router's tokens only: gathered, run, scattered back weighted
            selection = step.routing.select(x, step.loop)
            x, step = selection.gather(x), selection.narrow(step)
        if self.config.state_noise > 0:  # the state starts as noise at loop 1 (retrofitted recurrence)
            x = start_state(x, step.loop, self.config.state_noise)
        if self.config.input_injection == "add":
            x = inject(x, step.loop_input, step.loop)
        elif self.config.input_injection == "concat":
            x = self.adapter(torch.cat((step.loop_input, x), dim=-1))
        if self.lora is not None and not isinstance(step.loop, int):
            raise ValueError("per-loop LoRA needs every row at the same loop: depth-wise decoding is not supported")
        slots = step.layer_slots(len(self.high if step.high else self.block))
        for j, (layer, (slot, kv)) in enumerate(zip(self.high if step.high else self.block, slots, strict=True)):
            if self.lora is None:
                x = layer(x, self.rope, slot, step.padding, kv)
            else:  # loop n's weights W + B·A and vectors, the layer's own code (looped/model/lora.py)
                if layer.gradient_checkpointing and torch.is_grad_enabled():
                    raise ValueError("per-loop LoRA cannot be recomputed by gradient checkpointing; turn it off")
                tensors = self.lora.tensors(step.loop, j, layer)
                x = functional_call(layer, tensors, (x, self.rope, slot, step.padding, kv))
        return x if selection is None else selection.scatter(full, x)

    def run_layers(
        self, layers: nn.ModuleList, x: Tensor, slots: Sequence[Slot] | None, padding: Padding | None = None
    ) -> Tensor:
        """The unshared prelude or coda layers, once each, with their cache slots."""
        for layer, slot in zip(layers, [None] * len(layers) if slots is None else slots, strict=True):
            x = layer(x, self.rope, slot, padding)
        return x

    def embed_tokens(
        self,
        input_ids: Tensor | None,
        offset: int = 0,
        padding: Padding | None = None,
        positions: Tensor | None = None,
        embeds: Tensor | None = None,
    ) -> Tensor:
        """``[b t d]`` token embeddings (plus learned positions) of ``input_ids`` placed after ``offset`` positions
        (or at ``positions`` ``[b t]``); ``embeds`` stand in for the token embeddings when given."""
        x = self.embed(input_ids) if embeds is None else embeds
        if self.pos_embed is None:
            return x
        t = x.shape[1]
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
        if torch.compiler.is_compiling():  # a traced graph cannot branch on the mask's values: the padded
            return Padding(attention_mask)  # path, exact for any mask, ones included
        return None if bool(attention_mask.all()) else Padding(attention_mask)

    def shared_kv(self) -> list[SharedKV] | None:
        """One fresh ``SharedKV`` per block layer for a forward (``kv_sharing``), else None."""
        return [SharedKV() for _ in self.block] if self.config.kv_sharing else None

    def decode_slots(self, cache: DecodeCache, loops: int) -> DecodeSlots:
        """The decode-cache slots of a forward with ``loops`` loops: one per layer application, or with
        ``kv_sharing`` one per layer (the block's k slots serve every loop)."""
        c = self.config
        count = c.unique_layers if c.kv_sharing else self.applications(loops)
        return DecodeSlots.split(cache.bind(count), c.prelude_layers, c.block_layers, loops, c.kv_sharing)

    def readout(
        self,
        hidden: Tensor,
        positions: Tensor | None = None,
        slots: Sequence[Slot] | None = None,
        padding: Padding | None = None,
    ) -> Tensor:
        """Logits from a hidden state: ``coda → norm → head`` (``slots``: the coda's decode-cache slots).

        ``positions`` (a boolean mask ``[b t]``) keeps only those positions' logits,
        ``[n v]``; without a coda this skips the head everywhere else, which is what
        makes per-loop evaluation nearly free.
        """
        if positions is not None and len(self.coda) == 0:
            hidden = hidden[positions]
        hidden = self.run_layers(self.coda, hidden, slots, padding)
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

    # Greedy decoding with a cache, every token at full depth or stopping at its own loop (its docstring says how).
    generate = greedy.generate
    # One supervision step of a recursive reasoner from a carried state, and the state it starts from.
    reason = recursion.reason
    initial_state = recursion.initial_state

    def flops_per_token(self, seq_len: int, loops: int | None = None) -> float:
        """Matmul FLOPs of one *forward* pass per token, counting the block ``loops`` times.

        Per layer application: Q, K, V, O (``8d²``; ``4d(h + g)e`` with h query and g key/value heads of
        width e), the FFN (``4df``, ``6df`` for SwiGLU) and attention scores and values (``4td``, ``4the``,
        counted over the full ``t × t`` square as SDPA's FLOP formula does). Plus the head (``2dv``).
        Training costs three times this (backward = 2 × forward). A layer whose mixer is the MLP over positions
        costs ``6fd`` per token for its mixer instead. With a ``recursion`` other than ``loop``: one supervision
        step's applications (TRM's T·(n+1)·k, HRM's T·(n·k + k_H)), whatever ``loops`` says.

        With a router (``LoopedConfig.router``) loop n runs on ``m_n`` of the ``t`` tokens, attention over
        those ``m_n`` (``routed_tokens``), plus the routers' own ``2d`` per scored token and output. With
        ``kv_sharing`` the loops after the first project no keys or values and attend to loop 1's ``t``.
        """
        c = self.config
        loops = c.loops if loops is None else loops
        ffn = (6 if c.activation == "swiglu" else 4) * c.d_model * c.d_ff
        heads, kv = c.n_heads * c.head_dim, (c.n_kv_heads or c.n_heads) * c.head_dim  # d and d without GQA
        adapter = 4 * c.d_model**2 if c.input_injection == "concat" else 0  # [input; state] -> d, once per loop
        mlp_width = next((m.flops_per_token() for m in self.modules() if isinstance(m, PositionMLP)), 0)

        def per_layer(keys: int, mixer: str = "softmax", project_kv: bool = True) -> int:  # per token, `keys` keys
            if mixer == "mlp":  # the MLP over positions (mixers/mlp.py): 6·f per channel and token
                return mlp_width * c.d_model + ffn
            return 4 * c.d_model * (heads + (kv if project_kv else 0)) + ffn + 4 * keys * heads

        def layers(n: int, keys: int = seq_len, project_kv: bool = True) -> int:  # n layers of the pattern
            pattern = c.attention_pattern
            return sum(per_layer(keys, pattern[i % len(pattern)], project_kv) for i in range(n))

        def block_per_token(n: int, m: int) -> int:  # loop n on m of the t tokens (kv_sharing: loop 1's t keys)
            shared = c.kv_sharing and n > 1
            return layers(c.block_layers, seq_len if shared else m, project_kv=not shared) + adapter

        unshared = layers(c.prelude_layers) + layers(c.coda_layers) + 2 * c.d_model * c.vocab_size
        if self.router is None:
            if c.recursion == "hrm":
                block = c.answer_steps * (c.latent_steps * layers(c.block_layers) + layers(c.high_layers))
                return unshared + block + loops * adapter
            if c.recursion != "loop":  # TRM's T·(n+1) applications of the block
                block = c.block_applications(loops) // c.block_layers * layers(c.block_layers)
                return unshared + block + loops * adapter
            return unshared + sum(block_per_token(n, seq_len) for n in range(1, loops + 1))
        tokens = self.routed_tokens(seq_len, loops)
        block = sum(m * block_per_token(n, m) for n, m in enumerate(tokens, start=1))
        if c.router == "expert_choice":  # loop n scores the tokens loop n-1 kept (a second router: twice)
            scorers = 1 if c.router_aux_loss == "bce" else 2
            routers = scorers * 2 * c.d_model * sum([seq_len, *tokens[:-1]])
        else:  # one logit per depth, once, for every token
            routers = 2 * c.d_model * c.loops * seq_len
        return unshared + (block + routers) / seq_len

    def routed_tokens(self, seq_len: int, loops: int | None = None) -> list[int]:
        """Tokens each loop runs on per sequence: expert-choice's ``ceil(c_n · t)`` from the capacity schedule
        (as warmed up now); token-choice's from the last forward (its depths depend on the data)."""
        loops = self.config.loops if loops is None else loops
        if self.router is None:
            return [seq_len] * loops
        if self.config.router == "token_choice":
            return self.router.tokens_per_loop[:loops]
        tokens, kept = [], seq_len
        schedule = self.router.capacities()
        for capacity in schedule[:loops] + schedule[-1:] * (loops - len(schedule)):  # past L: the last loop's
            kept = min(kept, max(1, math.ceil(capacity * seq_len)))
            tokens.append(kept)
        return tokens

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def inject(x: Tensor, loop_input: Tensor | None, loop: int | Tensor) -> Tensor:
    """``input_injection: add``: the loop's input re-added before every loop after the first (per row when
    ``loop`` is ``[a]``)."""
    if isinstance(loop, int):
        return x + loop_input if loop > 1 else x
    return torch.where((loop > 1)[:, None, None], x + loop_input, x)


def start_state(x: Tensor, loop: int | Tensor, std: float) -> Tensor:
    """``state_noise``: at loop 1 the state is Gaussian noise of std ``std`` instead of ``x`` (per row when ``loop``
    is ``[a]``)."""
    if isinstance(loop, int):
        return torch.randn_like(x) * std if loop == 1 else x
    return torch.where((loop == 1)[:, None, None], torch.randn_like(x) * std, x)
