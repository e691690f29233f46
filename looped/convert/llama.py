"""The Llama family both ways: a ``transformers`` folder of ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
``Qwen3ForCausalLM`` as our layers, and a plain ``(N⊗1)`` of ours as a stock ``LlamaForCausalLM`` folder.

One name map (``LAYER_NAMES``) serves both directions, as torchtitan's ``state_dict_adapter`` does.
What differs between the three families is settings, not code: grouped-query attention, RoPE θ and
Llama 3.1's scaling, the norm ε, q/k RMSNorm (Qwen3), bias on q/k/v only (Qwen2), tied embeddings.

RoPE layouts: ``transformers`` rotates the pair (i, i + e/2) of each head ("rotate half"), we rotate
(2i, 2i + 1). The two are the same function after a fixed permutation of each head's rows of q and k
(and of q/k norm's scale, and q/k biases) — ``HALF_TO_PAIRS`` — which the import applies and the
export undoes. The attention scores are unchanged because q and k are permuted alike.

``read_source`` checks a folder (files, architecture, settings) from its ``config.json`` alone, before
any weight is read; ``read_weights`` then reads the safetensors. ``transformers`` is needed only to
write the Llama folder (``export_llama``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from looped.errors import InputError
from looped.model import LoopedConfig

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# transformers' name inside model.layers.{i}. -> ours inside a TransformerLayer
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{p}_proj.{w}": f"attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    **{
        f"mlp.{hf}.{w}": f"ffn.{ours}.{w}"
        for hf, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
        for w in ("weight", "bias")
    },
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
ROTATED = ("attn.q_", "attn.k_")  # q/k weights, biases and norm scales: rows in RoPE's layout
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Source:
    """A checked ``transformers`` folder: its plain ``(N⊗1)`` config, and where its weights and tokenizer are."""

    folder: Path
    architecture: str
    config: LoopedConfig
    weight_files: list[Path]
    tokenizer_files: list[Path]
    license: str | None = None
    layers: list[dict[str, Tensor]] = field(default_factory=list)
    """Per source layer, its weights under ``TransformerLayer``'s names (filled by ``read_weights``)."""
    globals: dict[str, Tensor] = field(default_factory=dict)
    """``embed.weight``, ``norm.weight``, ``head.weight``."""

    @property
    def num_layers(self) -> int:
        return self.config.block_layers


def half_to_pairs(head_dim: int) -> Tensor:
    """Index ``[e]``: our row j of a head is ``transformers``' row ``index[j]`` (pair (2i, 2i+1) <- (i, i+e/2))."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=-1).flatten()


def permute_heads(w: Tensor, head_dim: int, inverse: bool = False) -> Tensor:
    """Reorder every head's rows of a q/k weight ``[h·e, ...]``, bias ``[h·e]`` or norm scale ``[e]`` between the
    two layouts (``inverse``: ours back to ``transformers``')."""
    index = half_to_pairs(head_dim)
    if inverse:
        index = torch.argsort(index)
    heads = w.reshape(-1, head_dim, *w.shape[1:])
    return heads[:, index].reshape(w.shape)


def read_source(folder: str | Path, flag: str = "SOURCE") -> Source:
    """The folder checked and its config translated, every weight still on disk; one-line ``InputError`` else."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise InputError(f"{flag}: {path} has no config.json; pass a transformers model folder (save_pretrained's)")
    raw = json.loads((path / "config.json").read_text())
    arch = (raw.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise InputError(f"{flag}: {path} is a {arch}; supported: {', '.join(SUPPORTED)}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{flag}: {path} has no *.safetensors weights; save the model with safe_serialization")
    tokenizer = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not any(p.name in ("tokenizer.json", "tokenizer.model") for p in tokenizer):
        raise InputError(
            f"{flag}: {path} has no tokenizer (tokenizer.json or tokenizer.model); save the tokenizer there too"
        )
    return Source(path, arch, looped_config(raw, arch, flag), weights, tokenizer, read_license(path, raw))


def looped_config(raw: dict, arch: str, flag: str = "SOURCE") -> LoopedConfig:
    """A ``transformers`` ``config.json`` (as a dict) as a plain ``(N⊗1)`` ``LoopedConfig``."""

    def refuse(key: str, why: str) -> None:
        raise InputError(
            f"{flag}: config.json {key}: {why}; this import reproduces Llama, Qwen2 and Qwen3 as published"
        )

    if raw.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{raw['hidden_act']!r} is not silu (SwiGLU)")
    if raw.get("mlp_bias"):
        refuse("mlp_bias", "bias in the MLP is not supported")
    if raw.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window layers are not supported")
    if raw.get("attention_bias") and arch != "Qwen2ForCausalLM":
        refuse("attention_bias", "bias on q, k, v and o is not supported (Qwen2's bias on q, k, v is)")
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else raw.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in ("default", "llama3"):
        refuse("rope_scaling", f"rope_type {scaling.get('rope_type')!r}: only llama3 scaling is supported")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if raw["num_attention_heads"] % (raw.get("num_key_value_heads") or heads):
        refuse("num_key_value_heads", f"{raw['num_key_value_heads']} does not divide num_attention_heads={heads}")
    return LoopedConfig(
        vocab_size=raw["vocab_size"],
        max_seq_len=raw.get("max_position_embeddings", 2048),
        d_model=raw["hidden_size"],
        n_heads=heads,
        n_kv_heads=raw.get("num_key_value_heads") or heads,
        head_width=None if head_dim * heads == raw["hidden_size"] else head_dim,
        d_ff=raw["intermediate_size"],
        block_layers=raw["num_hidden_layers"],
        loops=1,
        rope_base=float(theta),
        rope_scaling=None if scaling is None else {"rope_type": "llama3", **{k: scaling[k] for k in keys}},
        norm="rmsnorm",
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        qk_norm=arch == "Qwen3ForCausalLM",
        qkv_bias=arch == "Qwen2ForCausalLM",
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def read_license(folder: Path, raw: dict) -> str | None:
    """The source's licence: the model card's ``license:`` line, else the name of a LICENSE file."""
    card = folder / "README.md"
    if card.is_file():
        match = re.search(r"^license:\s*(\S.*)$", card.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1).strip()
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (folder / name).is_file():
            return f"see {name} of the source"
    return raw.get("license")


def read_weights(source: Source) -> Source:
    """Fill ``source.layers`` and ``source.globals`` from the safetensors files (q and k rows into our RoPE layout)."""
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    for path in source.weight_files:
        tensors.update(load_file(path))
    config, e = source.config, source.config.head_dim
    layers: list[dict[str, Tensor]] = [{} for _ in range(source.num_layers)]
    for name, tensor in tensors.items():
        tensor = tensor.float()
        if name.endswith("rotary_emb.inv_freq"):  # older checkpoints saved RoPE's frequencies: they follow from θ
            continue
        if match := LAYER.match(name):
            index, inner = int(match.group(1)), match.group(2)
            if inner not in LAYER_NAMES:
                raise InputError(f"SOURCE: {source.folder} has a weight this import does not know: {name}")
            ours = LAYER_NAMES[inner]
            if ours.startswith(ROTATED):
                tensor = permute_heads(tensor, e)
            layers[index][ours] = tensor
        elif name in GLOBAL_NAMES:
            source.globals[GLOBAL_NAMES[name]] = tensor
    if config.tie_embeddings or "head.weight" not in source.globals:
        source.globals["head.weight"] = source.globals["embed.weight"]
    source.layers = layers
    return source


def plain_state(source: Source) -> dict[str, Tensor]:
    """The source as our plain ``(N⊗1)``'s state dict (every layer in the block)."""
    state = dict(source.globals)
    for i, layer in enumerate(source.layers):
        state.update({f"block.{i}.{name}": w for name, w in layer.items()})
    return state


def llama_problems(config: LoopedConfig) -> list[str]:
    """Why ``config`` is no stock ``LlamaForCausalLM`` (empty: it is one)."""
    wants = {
        "norm": "rmsnorm",
        "activation": "swiglu",
        "pos_encoding": "rope",
        "input_injection": "none",
        "qk_norm": False,
        "qkv_bias": False,
        "exit_gate": False,
        "kv_sharing": False,
        "bias": False,
    }
    problems = [f"{k}: {getattr(config, k)!r} (Llama: {v!r})" for k, v in wants.items() if getattr(config, k) != v]
    if config.attention_pattern != ["softmax"]:
        problems.append(f"attention: {config.attention!r} (Llama: 'softmax')")
    if config.loops != 1:
        problems.append(f"loops: {config.loops} (a looped block has no Llama form; export loops: 1)")
    return problems


def llama_state(config: LoopedConfig, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our plain model's weights under ``LlamaForCausalLM``'s names, prelude, block and coda as one stack."""
    ours_to_hf = {v: k for k, v in LAYER_NAMES.items()}
    inverse_globals = {v: k for k, v in GLOBAL_NAMES.items()}
    state, e = {}, config.head_dim
    order = [f"prelude.{i}." for i in range(config.prelude_layers)]
    order += [f"block.{i}." for i in range(config.block_layers)] + [f"coda.{i}." for i in range(config.coda_layers)]
    for index, prefix in enumerate(order):
        for name, w in weights.items():
            if not name.startswith(prefix):
                continue
            inner = name[len(prefix) :]
            if inner.startswith(ROTATED):
                w = permute_heads(w, e, inverse=True)
            state[f"model.layers.{index}.{ours_to_hf[inner]}"] = w.contiguous()
    for ours, hf in inverse_globals.items():
        if ours in weights and not (ours == "head.weight" and config.tie_embeddings):
            state[hf] = weights[ours].contiguous()
    return state


def llama_config(config: LoopedConfig, **special):
    """``transformers``' ``LlamaConfig`` with ``config``'s settings (``special``: bos/eos/pad token ids)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_type": "llama3", "rope_theta": config.rope_base}
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.unique_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads or config.n_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps if config.norm_eps is not None else torch.finfo(torch.float32).eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
        architectures=["LlamaForCausalLM"],
        **special,
    )


def export_llama(config: LoopedConfig, weights: dict[str, Tensor], out: Path, **special) -> Path:
    """Write ``out`` as a stock ``LlamaForCausalLM`` folder (config.json, model.safetensors); returns ``out``."""
    from safetensors.torch import save_file

    problems = llama_problems(config)
    if problems:
        raise InputError(f"--as llama: this model is not a plain Llama: {'; '.join(problems)}")
    out.mkdir(parents=True, exist_ok=True)
    llama_config(config, **special).save_pretrained(out)
    save_file(llama_state(config, weights), out / "model.safetensors", metadata={"format": "pt"})
    return out


def copy_tokenizer(files: list[Path], out: Path) -> None:
    for path in files:
        shutil.copyfile(path, out / path.name)


def plain_model(source: Source):
    """The source as our ``LoopedTransformer`` ``(N⊗1)``, weights loaded strictly (read_weights first)."""
    from looped.model import LoopedTransformer

    with torch.device("meta"):
        model = LoopedTransformer(source.config)
    model.load_state_dict(plain_state(source), strict=True, assign=True)
    if source.config.tie_embeddings:
        model.head.weight = model.embed.weight
    if model.rope is not None:  # buffers follow from the config, not the checkpoint
        model.rope.to_empty(device="cpu").reset_buffers()
    return model


def load_hf_folder(folder: str | Path):
    """A ``transformers`` Llama / Qwen2 / Qwen3 folder as our ``LoopedTransformer`` (``(N⊗1)``)."""
    return plain_model(read_weights(read_source(folder)))
