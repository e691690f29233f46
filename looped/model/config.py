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
    """Attention heads; must divide ``d_model`` unless ``head_width`` is set."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention: each serves ``n_heads / n_kv_heads`` query heads, as in Llama 3,
    SmolLM2, Qwen); must divide ``n_heads``. None: ``n_heads`` (multi-head attention)."""
    head_width: int | None = None
    """Width of one attention head. None: ``d_model / n_heads``. Qwen3 sets it apart from the model width
    (0.6B: 16 heads of 128 in a width of 1024): q, k, v project to ``heads × head_width``, o back to ``d_model``."""
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
    """RoPE frequency base θ (``rope_theta`` in a ``transformers`` config)."""
    rope_scaling: dict | None = None
    """Llama 3.1's RoPE frequency scaling, as its ``config.json`` states it: ``{rope_type: llama3, factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings}``. None: plain RoPE."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation before each sublayer (pre-norm) and before the head."""
    norm_placement: Literal["pre", "post"] = "pre"
    """``pre``: ``x + f(norm(x))`` (GPT-2 on); ``post``: ``norm(x + f(x))`` (the original transformer, TRM and HRM,
    whose recursions add states together and need every update's output normalised to stay bounded)."""
    norm_eps: float | None = None
    """ε of every normalisation (``rms_norm_eps`` in a ``transformers`` config). None: torch's default (1e-5 for
    layernorm; the dtype's machine epsilon for rmsnorm)."""
    qk_norm: bool = False
    """Qwen3's RMSNorm over each head's queries and keys, before RoPE."""
    activation: Literal["gelu", "relu", "silu", "swiglu"] = "gelu"
    """Feed-forward non-linearity; ``swiglu`` adds a gate projection ``w3``."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    bias: bool = False
    """Bias terms in linear layers."""
    qkv_bias: bool = False
    """Bias on the query, key and value projections alone (Qwen2), whatever ``bias`` says."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    input_injection: Literal["none", "add", "concat"] = "none"
    """``none`` as in the paper; ``add`` re-adds the loop input before every loop after the first; ``concat``
    (retrofitted recurrence, McLeish et al. 2025) maps ``[loop input; state]`` back to d with a linear adapter
    (``adapter``, 2d → d) before every loop, initialised to pass the loop input: ``[I | 0]``."""
    state_noise: float = 0.0
    """Std of the Gaussian noise the loop state starts from (retrofitted recurrence, Huginn); 0: the prelude's
    output. Needs ``input_injection`` add or concat, or the loop would never see the input."""
    attention: str | list[str] = "softmax"
    """Token mixer, or a per-layer pattern cycled within the prelude, the block and the coda; ``mlp`` is TRM's MLP
    over positions (needs ``causal: false``)."""
    causal: bool = True
    """Each position sees only the positions before it. False: every position sees every other, for inputs read
    whole and never decoded (puzzles); such a model cannot generate or use a decode cache."""
    mixer_options: dict = field(default_factory=dict)
    """Keyword options for the mixers, by mixer name: ``{linear: {feature_map: elu}, sparse: {window: 64}}``."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual output projections are scaled by 1/sqrt(2·depth)."""
    exit_gate: bool = False
    """A learned halting gate: a linear layer giving each token an exit probability after every loop
    (``halt_logits``), trained by ``LoopedLM``'s ``exit`` objective (``looped.training.halting``)."""
    lora_rank: int = 0
    """Relaxation: a LoRA of rank r per loop on every linear weight of the shared block (clipped to each weight's
    full rank min(in, out)), and each loop's own copy of the block's vectors (norms, biases); 0: none. Loops
    beyond L reuse loop L's (``looped/model/lora.py``). ``looped retrofit --lora-rank`` initialises them."""
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

    # Recursive reasoners (looped/model/recursion.py), trained with deep supervision
    # (looped.training.deep_supervision.DeepSupervision): what one supervision step does to the carried state.
    recursion: Literal["loop", "trm", "hrm"] = "loop"
    """``loop``: the block ``loops`` times on the carried state plus the input, ``(k⊗L)``; ``trm`` (TRM): the latent z
    updated ``latent_steps`` times from ``z + y + x``, then the answer y from ``y + z``, all of it ``answer_steps``
    times, backpropagating through the last round only; ``hrm`` (HRM): the block (the low module) ``latent_steps``
    times from ``z_L + z_H + x``, then the high module (``high_layers``) from ``z_H + z_L``, ``answer_steps`` times,
    backpropagating through the last low and high update only (HRM's one-step gradient)."""
    latent_steps: int = 6
    """n: TRM's latent updates per answer update (Sudoku 6, mazes and ARC 4); HRM's low cycles per high cycle."""
    answer_steps: int = 3
    """T: TRM's answer updates per supervision step (3); HRM's high cycles (2)."""
    high_layers: int = 0
    """HRM's high-level module: its own layers (HRM: 4), applied after every ``latent_steps`` low updates."""
    q_head: bool = False
    """A halting Q-head: ``Linear(d, 2)`` on the answer state averaged over positions (on its first position when
    ``puzzle_embedding_len`` > 0, as TRM and HRM), giving (halt, continue) logits after every supervision step
    (weight 0, bias -5 at the start, as TRM and HRM)."""
    puzzle_embedding_len: int = 0
    """TRM's and HRM's puzzle-id embedding: prefix positions put before the puzzle's cells in every supervision step
    (TRM on ARC: 16; HRM: 1), holding the example's learned puzzle vector; the logits are the cells' only. 0: off.
    Needs batches with ``puzzle_ids`` (``looped.datamodules.Arc``) and ``DeepSupervision``."""
    puzzle_embedding_dim: int | None = None
    """Width of a puzzle's vector (their ``puzzle_emb_ndim``), laid over the prefix positions in order and padded
    with zeros: TRM's 512 in 16 positions of width 512 fills the first position only. None: ``d_model``."""
    puzzle_ids: int | None = None
    """Rows of the puzzle embedding (id 0 is "none"). Linked from the data module's ``num_puzzle_ids``."""

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:  # named as a recipe sets it: model.init_args.config.<field>
                raise InputError(f"{MODEL_CONFIG}.{field}: {msg}")

        for name in ("d_model", "n_heads", "d_ff", "block_layers", "loops"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("prelude_layers", "coda_layers", "lora_rank"):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("n_kv_heads", "head_width"):
            value = getattr(self, name)
            need(value is None or value >= 1, name, f"must be >= 1 (or null), got {value}")
        need(
            self.n_kv_heads is None or self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"{self.n_kv_heads} does not divide n_heads={self.n_heads}; each key/value head serves a whole group "
            f"of query heads: pick a divisor of {self.n_heads}",
        )
        need(self.norm_eps is None or self.norm_eps > 0, "norm_eps", f"must be > 0 (or null), got {self.norm_eps}")
        self.check_rope_scaling(need)
        need(
            self.head_width is not None or self.d_model % self.n_heads == 0,
            "d_model",
            f"{self.d_model} is not divisible by n_heads={self.n_heads}; "
            f"pick d_model as a multiple of n_heads (e.g. {self.n_heads * max(1, round(self.d_model / self.n_heads))})",
        )
        head_dim = self.head_dim
        need(
            self.pos_encoding != "rope" or head_dim % 2 == 0,
            "n_heads",
            f"RoPE needs an even head width, but the head width is {head_dim}; "
            "pick n_heads so that the head width is even, or set pos_encoding: learned",
        )
        need(0.0 <= self.dropout < 1.0, "dropout", f"must lie in [0, 1), got {self.dropout}")
        need(self.state_noise >= 0.0, "state_noise", f"must be >= 0, got {self.state_noise}")
        need(
            self.state_noise == 0.0 or self.input_injection != "none",
            "state_noise",
            "a loop state that starts as noise never sees the input without input_injection: set add or concat",
        )
        for name in self.attention_pattern:
            need(name in MIXERS, "attention", f"unknown mixer {name!r}; choose from {sorted(MIXERS)}")
        for name in self.mixer_options:
            need(name in MIXERS, "mixer_options", f"options for unknown mixer {name!r}; choose from {sorted(MIXERS)}")
        self.check_recursion(need)  # before the mixers are built: a causal-only mixer asked to be non-causal
        for name in set(self.attention_pattern):
            if name == "mlp" and self.max_seq_len is None:
                continue  # its size is the sequence length, linked from the data module: built with the model
            # Build each mixer once on the meta device (no memory, no compute): a bad
            # option fails here, when the recipe is parsed, not when the model is built.
            with torch.device("meta"):
                build_mixer(name, self.d_model, self.n_heads, self.dropout, self.bias, **self.mixer_kwargs(name))
        for name in ("vocab_size", "max_seq_len", "puzzle_ids", "puzzle_embedding_dim"):
            value = getattr(self, name)
            need(value is None or value >= 1, name, f"must be >= 1, got {value}")
        self.check_puzzle_embedding(need)
        recurrent = [name for name in self.attention_pattern if not MIXERS[name].kv_cache]
        need(
            not (self.kv_sharing and recurrent),
            "kv_sharing",
            f"shares keys and values across loops, but {recurrent[:1]} attention keeps a recurrent state "
            "instead (already constant in size); use softmax or sparse attention, or kv_sharing: false",
        )
        if self.router != "none":
            self.check_router(need)

    def check_recursion(self, need) -> None:
        """Non-causal attention, the MLP over positions, and the recursive reasoners' fields."""
        one_way = [name for name in self.attention_pattern if not MIXERS[name].bidirectional]
        need(
            self.causal or not one_way,
            "causal",
            f"false needs mixers that can see every position, but {one_way[:1]} attention is causal only; "
            "use softmax or mlp attention, or causal: true",
        )
        need(
            not ("mlp" in self.attention_pattern and self.causal),
            "causal",
            "must be false with attention: mlp (the MLP over positions sees every position)",
        )
        need(
            self.causal or not self.kv_sharing,
            "kv_sharing",
            "shares a decode cache's keys, but a non-causal model never decodes; set kv_sharing: false",
        )
        need(self.recursion in ("loop", "trm", "hrm"), "recursion", f"choose loop, trm or hrm, got {self.recursion!r}")
        for name in ("latent_steps", "answer_steps"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        need(
            (self.recursion == "hrm") == (self.high_layers > 0),
            "high_layers",
            f"is {self.high_layers} with recursion: {self.recursion}; HRM's high module needs high_layers >= 1, and "
            "only recursion: hrm has one (set high_layers: 0 otherwise)",
        )
        if self.recursion == "loop":
            return
        for name, off, value in (
            ("lora_rank", 0, self.lora_rank),
            ("router", "none", self.router),
            ("kv_sharing", False, self.kv_sharing),
            ("input_injection", "none", self.input_injection),
            ("state_noise", 0.0, self.state_noise),
            ("exit_gate", False, self.exit_gate),
            ("loops", 1, self.loops),
        ):
            need(
                value == off,
                name,
                f"is {value} but recursion: {self.recursion} runs its own schedule of the block "
                f"(latent_steps, answer_steps); set {name}: {str(off).lower() if isinstance(off, bool) else off}",
            )

    def check_puzzle_embedding(self, need) -> None:
        need(self.puzzle_embedding_len >= 0, "puzzle_embedding_len", f"must be >= 0, got {self.puzzle_embedding_len}")
        width = self.puzzle_embedding_len * self.d_model
        need(
            self.puzzle_embedding_dim is None or self.puzzle_embedding_dim <= max(width, 1),
            "puzzle_embedding_dim",
            f"{self.puzzle_embedding_dim} does not fit in puzzle_embedding_len × d_model = {width}; raise "
            "puzzle_embedding_len or lower puzzle_embedding_dim",
        )
        need(
            self.puzzle_embedding_len == 0 or not self.causal,
            "puzzle_embedding_len",
            "prefixes a puzzle read whole; set causal: false (or puzzle_embedding_len: 0)",
        )

    @property
    def positions(self) -> int | None:
        """Positions a supervision step runs on: the puzzle-embedding prefix, then ``max_seq_len`` cells."""
        return None if self.max_seq_len is None else self.max_seq_len + self.puzzle_embedding_len

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
            not (self.kv_sharing and self.router == "expert_choice" and schedule[0] < 1.0),
            "router_capacity",
            f"starts at {schedule[0]}, but with kv_sharing every loop attends to loop 1's keys, so loop 1 must run "
            "every token: make the first capacity 1.0 (MoR's [1.0, 0.75, 0.5, 0.25]) or set kv_sharing: false",
        )

    @property
    def capacity_schedule(self) -> list[float]:
        """Expert-choice: the fraction of tokens each loop 1..L keeps (all 1.0 without a router)."""
        c = self.router_capacity
        return [float(v) for v in c] if isinstance(c, list | tuple) else [float(c)] * self.loops

    def check_rope_scaling(self, need) -> None:
        if self.rope_scaling is None:
            return
        keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        scaling = self.rope_scaling
        need(
            scaling.get("rope_type", scaling.get("type")) == "llama3",
            "rope_scaling",
            f"rope_type {scaling.get('rope_type')!r} is not supported; only llama3 scaling is (or null: plain RoPE)",
        )
        missing = sorted(keys - set(scaling))
        need(not missing, "rope_scaling", f"llama3 scaling needs {sorted(keys)}; missing {missing}")
        need(
            scaling["high_freq_factor"] > scaling["low_freq_factor"] and scaling["factor"] > 0,
            "rope_scaling",
            "needs factor > 0 and high_freq_factor > low_freq_factor (Llama 3.1: 8, 1, 4)",
        )

    def mixer_kwargs(self, name: str) -> dict:
        """Keyword arguments of mixer ``name`` beyond the width, heads, dropout and bias: its ``mixer_options``
        and, where they differ from plain multi-head attention, the head shape (GQA, head width, q/k norm)."""
        shape = {
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_width,
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
            "norm_eps": self.norm_eps,
        }
        if name == "mlp":  # no heads: its size is the sequence length
            return {**self.mixer_options.get(name, {}), "seq_len": self.positions, "causal": self.causal}
        own = {k: v for k, v in shape.items() if v not in (None, False)}
        return {**self.mixer_options.get(name, {}), **own, **({} if self.causal else {"causal": False})}

    @property
    def attention_pattern(self) -> list[str]:
        return [self.attention] if isinstance(self.attention, str) else list(self.attention)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_width is None else self.head_width

    @property
    def effective_depth(self) -> int:
        """Layer applications in one forward pass at the trained loop count."""
        return self.applications()

    def applications(self, loops: int | None = None) -> int:
        """Layer applications in one forward pass with ``loops`` loops (default: the trained count); with a
        ``recursion`` other than ``loop``, in one supervision step."""
        return self.prelude_layers + self.block_applications(loops) + self.coda_layers

    def block_applications(self, loops: int | None = None) -> int:
        """Applications of the block's (and HRM's high module's) layers: L·k, TRM's T·(n+1)·k, HRM's T·(n·k + k_H)."""
        if self.recursion == "trm":
            return self.answer_steps * (self.latent_steps + 1) * self.block_layers
        if self.recursion == "hrm":
            return self.answer_steps * (self.latent_steps * self.block_layers + self.high_layers)
        return self.block_layers * (self.loops if loops is None else loops)

    @property
    def unique_layers(self) -> int:
        return self.prelude_layers + self.block_layers + self.high_layers + self.coda_layers
