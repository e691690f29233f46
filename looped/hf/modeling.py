"""``LoopedForCausalLM``: the same ``LoopedTransformer`` as a ``transformers`` causal LM, and ``LoopedCache``.

The model *is* a ``LoopedTransformer`` (``self.model``, the module ``LoopedLM`` trains, under
the same parameter names), so its logits are ours to the bit and a Lightning checkpoint's
``state_dict`` loads into it unchanged. What this file adds is the ``transformers`` surface:

* ``forward(input_ids | inputs_embeds, attention_mask, labels, num_loops, cache, use_cache, output_hidden_states)``
  returning ``CausalLMOutputWithPast``. ``num_loops`` overrides L for one call (also
  ``generate(..., num_loops=N)``). ``output_hidden_states`` gives one state per *loop*, not per layer
  application: ``hidden_states[0]`` is the block's input (the embeddings, after the prelude if any), so
  code that reads index 0 as the embeddings is right, and ``hidden_states[n]`` is the state after loop n
  (``model.model.readout(h)`` reads one out): per-loop states are what a looped model's analyses read
  (every loop's prediction from one forward); ``k`` states inside a loop would say little more.
  ``output_attentions=True`` is refused: the mixers form no weights (fused SDPA, linear attention).
* ``labels`` follow ``transformers``: the labels of the *inputs*, shifted inside (position t is
  scored on ``labels[t + 1]``), -100 ignored, so ``labels=input_ids`` trains a language model.
  Our data modules store the shifted labels (``labels[t]`` is the target of position t); the
  loss equals ``LoopedLM.compute_loss`` on ``input_ids`` followed by the last label, with
  ``[-100, *labels]`` as ``transformers`` labels (``tests/test_hf.py`` checks it).
* ``attention_mask`` for padded batches: each token sits at its position among its row's
  tokens (RoPE, learned positions, sparse patterns) and padding is never attended to, so a
  left-padded row gives the logits it gives alone. Positions come from the mask; there is no
  ``position_ids`` argument.
* ``LoopedCache``, the ``transformers`` ``Cache`` over our ``DecodeCache``: one slot per layer
  *application* (a ``(k⊗L)`` block owns ``k·L``), which a per-layer ``DynamicCache`` cannot hold
  (Huginn's published cache likewise keys its entries by recurrence step, not by layer).
  ``generate`` makes one before the prefill and decodes one position per step. ``crop`` drops the last
  positions of every slot where that is exact (slots that keep keys per position: softmax, sparse) and
  refuses a recurrent slot, so assisted and prompt-lookup decoding run. A plain ``forward`` makes no cache
  unless asked with ``use_cache=True`` (for a looped model that is ``k·L`` copies of K and V nobody reads).
* ``draft_model(n)``: this model at n < L loops on the same weights, the assistant for self-speculative
  decoding through ``transformers`` (``generate(..., assistant_model=model.draft_model(n))``).
* ``gradient_checkpointing_enable()`` recomputes every layer application in backward; a missing weight
  gets ``LoopedTransformer.init_parameter``'s value and is reported.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from looped.hf.config import LoopedHFConfig
from looped.model import LoopedTransformer
from looped.model.cache import DecodeCache
from looped.model.mixers import RotaryEmbedding


class LoopedCache(Cache):
    """A ``transformers`` ``Cache`` holding a ``DecodeCache``: one slot per layer application.

    ``capacity`` positions are allocated once per slot (the model's ``max_seq_len`` by default), so a
    step writes one position in place. The loop count is fixed by the first forward that fills it.
    """

    is_compileable = False

    def __init__(self, capacity: int) -> None:
        super().__init__(layers=[])  # no per-layer objects: the DecodeCache holds the slots
        self.decode = DecodeCache(capacity)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.decode.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.decode.capacity

    # generate() asks these of a cache's layers; a looped model's slots are none of them.
    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def is_croppable(self) -> bool:
        """Every slot keeps keys per position (softmax, sparse attention): dropping the last positions of
        every slot is exact. A recurrent slot (linear attention) is a running sum over every position."""
        return all(slot.state is None for slot in self.decode.layers)

    @property
    def is_initialized(self) -> bool:
        return bool(self.decode.layers)

    def reset(self) -> None:
        self.decode = DecodeCache(self.decode.capacity)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions in every slot (assisted decoding's rollback).

        The slots keep their buffers: the next forward writes over the dropped positions.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"LoopedCache.crop({tokens_to_remove}): pass minus the number of positions to drop, "
                f"e.g. crop(-{tokens_to_remove})"
            )
        if tokens_to_remove == 0:
            return
        if not self.is_croppable:
            raise ValueError(
                "LoopedCache.crop: a linear-attention slot is a running sum over every position and cannot drop "
                "the last ones; decode without assistant_model/prompt_lookup_num_tokens for this model"
            )
        self.decode.length = max(0, self.decode.length + tokens_to_remove)

    def _select(self, pick) -> None:
        for slot in self.decode.layers:
            if slot._keys is not None:
                slot._keys, slot._values = pick(slot._keys), pick(slot._values)
            if slot.state is not None:
                slot.state = tuple(pick(s) for s in slot.state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes row ``beam_idx[i]`` in every slot."""
        self._select(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda x: x.repeat_interleave(repeats, dim=0))


class LoopedForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``LoopedTransformer`` as a ``transformers`` causal LM (see the module doc).

    ``output_hidden_states=True`` gives one state per loop, not per layer: ``hidden_states[0]`` the embeddings
    (the block's input), ``hidden_states[n]`` the state after loop n, ``L + 1`` states in all.
    ``config.num_hidden_layers`` counts layer applications (decode-cache slots), ``p + k·L + c``.
    """

    config_class = LoopedHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerLayer"]
    supports_gradient_checkpointing = True  # per layer application: TransformerLayer.gradient_checkpointing
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # only with tie_embeddings

    def __init__(self, config: LoopedHFConfig) -> None:
        super().__init__(config)
        self.model = LoopedTransformer(config.looped_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Our initialisation (residual outputs scaled by the number of layer applications), not transformers'
        # generic one, parameter by parameter: transformers calls this for each module that holds a missing
        # weight, and guards torch.nn.init so weights loaded from a file are left alone. The RoPE tables are
        # no weights: they follow from the config, computed again off the meta device.
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
            return
        prefix = self._module_names().get(module)
        for name, p in module.named_parameters(recurse=False):
            if prefix is not None:
                self.model.init_parameter(f"{prefix}.{name}" if prefix else name, p)

    def _module_names(self) -> dict[nn.Module, str]:
        """Each submodule of ``self.model`` and its name there (what ``init_parameter`` reads)."""
        return {module: name for name, module in self.model.named_modules()}

    def mark_tied_weights_as_initialized(self, loading_info) -> None:
        # The head and the embedding are one Parameter (LoopedTransformer ties them when built): flagging the
        # head as "tied, initialise nothing" flags the embedding too, so a checkpoint without the embedding
        # would leave it on the meta device, unreported. Flag nothing then: both are initialised, then tied.
        if not (self.config.tie_embeddings and "model.embed.weight" in loading_info.missing_keys):
            super().mark_tied_weights_as_initialized(loading_info)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a per-layer DynamicCache: a LoopedCache instead (below)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        # generate() makes a cache before the first forward where a model has one by default (assisted and
        # prompt-lookup decoding require it); ours is a LoopedCache, sized like the one forward makes.
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = LoopedCache(self.config.max_seq_len)

    def draft_model(self, loops: int) -> LoopedForCausalLM:
        """This model at ``loops`` loops, sharing its weights: an assistant for self-speculative decoding
        through ``transformers``, ``generate(..., assistant_model=model.draft_model(n))``, whose greedy tokens
        are this model's own. ``transformers`` keeps the assistant's cache apart from this model's, so its
        loops ``1..n`` are computed twice; ``looped``'s ``generate(..., draft_loops=n)`` shares them."""
        if not 1 <= loops < self.config.loops:
            raise ValueError(
                f"draft_model({loops}): a draft runs fewer loops than the model; pick 1..{self.config.loops - 1}"
            )
        config = copy.deepcopy(self.config)
        config.loops = loops
        with torch.device("meta"):  # no second set of weights: the draft's model is this one's
            draft = LoopedForCausalLM(config)
        draft.model = self.model
        return draft.eval() if not self.training else draft

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_loops: int | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``[b t v]`` after ``num_loops`` applications of the block (default: the trained L).

        ``cache``/``past_key_values`` (a ``LoopedCache``): ``input_ids`` are the positions after the
        cached ones, and ``attention_mask`` covers cached and new positions alike. ``inputs_embeds``
        ``[b t d]`` stand where token embeddings would. ``output_hidden_states``: the state before loop 1
        (the embeddings, after the prelude if any) and after every loop, ``hidden_states[n]`` after loop n.
        ``output_attentions=True`` is refused (no attention weights are formed); other ``transformers``
        keyword arguments are accepted and ignored.
        """
        if kwargs.get("output_attentions") or self.config.output_attentions:
            raise ValueError(
                "output_attentions: LoopedForCausalLM forms no attention weights (its mixers call fused "
                "scaled_dot_product_attention, some are linear attention); call without output_attentions"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "LoopedForCausalLM takes input_ids (token ids) or inputs_embeds ([b t d_model]), one of them"
            )
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LoopedCache):
            raise TypeError(
                f"LoopedForCausalLM needs a LoopedCache (one slot per layer application), got {type(cache).__name__}; "
                "pass cache=None and use_cache=True to get one"
            )
        if use_cache and cache is None:
            cache = LoopedCache(self.config.max_seq_len)
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        first: list[Tensor] = []  # the block's input at loop 1: hidden_states[0]
        hook = self.model.block[0].register_forward_pre_hook(lambda _, args: first.append(args[0])) if hidden else None
        try:
            out = self.model(
                input_ids,
                loops=self.config.loops if num_loops is None else num_loops,
                return_loop_states=bool(hidden),
                cache=None if cache is None else cache.decode,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
            )
        finally:
            if hook is not None:
                hook.remove()
        logits, loop_states = out if hidden else (out, None)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=cache,
            hidden_states=None if loop_states is None else (first[0], *loop_states),
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


def from_looped(model: LoopedTransformer, **config_kwargs) -> LoopedForCausalLM:
    """A ``LoopedForCausalLM`` with ``model``'s configuration and a copy of its weights (``eos_token_id=...`` etc.)."""
    hf = LoopedForCausalLM(LoopedHFConfig.from_looped_config(model.config, **config_kwargs))
    hf.model.load_state_dict(model.state_dict())
    return hf.to(next(model.parameters()).device).train(model.training)


def to_looped(model: LoopedForCausalLM) -> LoopedTransformer:
    """A plain ``LoopedTransformer`` (no ``transformers`` needed) with ``model``'s config and a copy of its weights."""
    looped = LoopedTransformer(model.config.looped_config())
    looped.load_state_dict(model.model.state_dict())
    return looped.to(model.device).train(model.training)
