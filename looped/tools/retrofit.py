"""``looped retrofit SOURCE OUT.ckpt --block K [...]``: a pretrained plain model, looped.

Usage: ``looped retrofit SOURCE OUT.ckpt --prelude P --block K --loops L --coda C --init INIT [--lora-rank R|full]``.

Loops a model you already have: SOURCE is a ``transformers`` folder (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``: config.json, safetensors, tokenizer) or one of our checkpoints of a plain ``(N⊗1)``. Its
N layers become ``(p⊗1, k⊗L, c⊗1)`` (``looped.convert.recursive``: stepwise, lower, upper, average, random, or
the span of least angular distance on ``--calibration`` text), optionally relaxed by a per-loop LoRA
initialised from the truncated SVD of (original − shared) (``looped/model/lora.py``), optionally with
retrofitted recurrence's concatenation adapter and noise-initialised state (``--adapter concat
--state-noise S``). ``--prelude 0 --block N --loops 1 --coda 0`` is the plain import.

OUT.ckpt is a checkpoint that ``LoopedLM.load_from_checkpoint`` loads and that ``looped fit --config
recipes/retrofit/ROW.yaml --model.init_args.init_weights OUT.ckpt`` trains on from; ``looped export hf OUT.ckpt
DIR --as llama`` writes a plain one back as a stock Llama. It records the source, its licence and its tokenizer
files (``checkpoint["retrofit"]``), which the export writes beside the model.

Every mistake that can be seen before a weight is read is refused first, one line, exit 2: an unsupported
architecture, a folder without weights or tokenizer, ``p + k·L + c > N``, a LoRA rank below 1 or not a
number, kv heads that do not divide the heads, angular without calibration text.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from looped.convert.llama import Source, read_source, read_weights
from looped.convert.recursive import INITS, Recursive, Shape, angular_distances, recursive_init, relax
from looped.errors import InputError
from looped.model import LoopedConfig, LoopedTransformer
from looped.tools.analysis import ModelShape


def progress(message: str) -> None:
    print(f"looped retrofit: {message}", file=sys.stderr, flush=True)


def parse_rank(text: str | None) -> int | str | None:
    """``--lora-rank``: None (no LoRA), ``"full"``, or an int >= 1."""
    if text is None or text == "full":
        return text
    try:
        rank = int(text)
    except ValueError:
        rank = None
    if rank is None or rank < 1:
        raise InputError(f"--lora-rank: {text!r} is not a rank; give a whole number >= 1, or full")
    return rank


def our_source(path: Path) -> Source:
    """One of our checkpoints of a plain ``(N⊗1)`` as a ``Source`` (config checked, tensors memory-mapped)."""
    from looped.training.checkpoint import read_checkpoint, saved_config

    checkpoint = read_checkpoint(path, "SOURCE")
    fields = saved_config(checkpoint)
    if fields is None:
        raise InputError(f"SOURCE: {path} is not a LoopedLM checkpoint; pass a transformers folder or a looped .ckpt")
    config = LoopedConfig(**fields)
    looped = [
        f"{k}: {getattr(config, k)}" for k in ("loops", "lora_rank") if getattr(config, k) != (1, 0)[k != "loops"]
    ]
    if looped or config.input_injection != "none" or config.exit_gate:
        raise InputError(
            f"SOURCE: {path} is not a plain (N⊗1) model ({', '.join(looped) or 'adapters'}); retrofit a plain one"
        )
    n = config.unique_layers
    plain = replace(config, prelude_layers=0, block_layers=n, coda_layers=0)
    source = Source(path, "LoopedLM", plain, [path], [], (checkpoint.get("retrofit") or {}).get("license"))
    state = {k.removeprefix("model."): v.float() for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    order = [f"prelude.{i}." for i in range(config.prelude_layers)] + [
        f"block.{i}." for i in range(config.block_layers)
    ]
    order += [f"coda.{i}." for i in range(config.coda_layers)]
    source.layers = [{k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for p in order]
    source.globals = {k: v for k, v in state.items() if k.split(".")[0] in ("embed", "norm", "head", "pos_embed")}
    source.tokenizer_files = []
    return source


def calibration_ids(source: Source, text_path: str, tokens: int, tokenizer: str | None) -> torch.Tensor:
    """``[b t]`` token ids of the calibration text (at most ``tokens``, rows of up to 256)."""
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    if tokenizer is not None or source.architecture == "LoopedLM":
        from looped.tokenizer import load_tokenizer

        ids = load_tokenizer(tokenizer).encode(text)
    elif (source.folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(source.folder / "tokenizer.json")).encode(text).ids
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(source.folder)(text)["input_ids"]
    ids = torch.tensor(ids[:tokens])
    width = min(256, len(ids), source.config.max_seq_len)
    if width < 2:
        raise InputError(f"--calibration: {text_path} gives {len(ids)} tokens; give a text of a few hundred or more")
    return ids[: len(ids) // width * width].reshape(-1, width)


def retrofit(args: argparse.Namespace) -> tuple[Recursive, LoopedTransformer, Source]:
    rank = parse_rank(args.lora_rank)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"OUT: {out} already exists; pass --overwrite or another path")
    path = Path(args.source)
    if not path.exists():
        raise InputError(f"SOURCE: {path} does not exist; pass a transformers model folder or a looped .ckpt")
    source = read_source(path) if path.is_dir() else our_source(path)
    shape = Shape(args.prelude, args.block, args.loops, args.coda)
    shape.check(source.num_layers)
    if args.init == "angular" and not args.calibration:
        raise InputError("--init angular: needs --calibration FILE, text the span's angular distance is measured on")
    if args.calibration and not Path(args.calibration).is_file():
        raise InputError(f"--calibration: {args.calibration} is not a file; give a text file")
    if args.max_seq_len is not None:
        source.config = replace(source.config, max_seq_len=args.max_seq_len)
    if source.architecture != "LoopedLM":
        progress(f"reading {len(source.weight_files)} safetensors file(s) from {path}")
        read_weights(source)
    distances = None
    if args.init == "angular":
        from looped.convert.llama import plain_model

        ids = calibration_ids(source, args.calibration, args.calibration_tokens, args.tokenizer)
        progress(f"measuring the angular distance of every {args.block}-layer span on {ids.numel()} tokens")
        model = plain_model(source) if source.architecture != "LoopedLM" else plain_of(source)
        last = source.num_layers - args.coda - 1
        distances = angular_distances(model.eval(), ids, args.block, args.prelude, last)
    result = recursive_init(source.config, source.layers, source.globals, shape, args.init, distances, args.seed)
    config = result.config
    if args.adapter == "concat" or args.state_noise:
        config = replace(config, input_injection=args.adapter or "concat", state_noise=args.state_noise)
    if rank is not None:
        full = max(min(p.shape) for p in fresh_block(config).parameters() if p.dim() == 2)
        config = replace(config, lora_rank=full if rank == "full" else rank)
    torch.manual_seed(args.seed)
    model = LoopedTransformer(config)
    missing, unexpected = model.load_state_dict(result.state, strict=False)
    assert not unexpected and all(k.startswith(("lora.", "adapter.")) for k in missing), (missing, unexpected)
    if config.tie_embeddings:
        model.head.weight = model.embed.weight
    if model.lora is not None:
        progress(f"initialising {config.loops} loop(s) of LoRA by truncated SVD of (original − shared)")
        relax(model, result, source.layers)
    result.config = config
    return result, model, source


def fresh_block(config: LoopedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return LoopedTransformer(replace(config, vocab_size=1, max_seq_len=2, lora_rank=0)).block


def plain_of(source: Source) -> LoopedTransformer:
    model = LoopedTransformer(source.config)
    model.load_state_dict(
        {**source.globals, **{f"block.{i}.{k}": v for i, layer in enumerate(source.layers) for k, v in layer.items()}}
    )
    return model


def save(path: Path, model: LoopedTransformer, result: Recursive, source: Source, summary: str) -> None:
    """A checkpoint as ``LoopedLM`` saves one: hyper-parameters (the config) and ``model.``-prefixed weights."""
    import lightning

    special = {}
    if source.architecture != "LoopedLM":
        import json

        raw = json.loads((source.folder / "config.json").read_text())
        special = {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        special = {k: v for k, v in special.items() if isinstance(v, int)}
    checkpoint = {
        "state_dict": {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": asdict(result.config)},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "retrofit": {
            "source": str(source.folder),
            "architecture": source.architecture,
            "license": source.license,
            "tokenizer_files": {p.name: p.read_bytes() for p in source.tokenizer_files},
            "summary": summary,
            **special,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def summarise(args: argparse.Namespace, result: Recursive, model: LoopedTransformer, source: Source) -> str:
    c = result.config
    shape = ModelShape(c.block_layers, c.loops, c.prelude_layers, c.coda_layers)
    n = source.num_layers
    copied = {*range(c.prelude_layers), *range(n - c.coda_layers, n), *(s for f in result.block_from for s in f)}
    replaced = sorted(set(result.stands_for) - copied)  # an application stands for them; the shared layer replaces
    dropped = sorted(set(range(n)) - copied - set(result.stands_for))  # nothing stands for them
    lora = sum(p.numel() for p in model.lora.parameters()) if model.lora is not None else 0
    source_params = sum(v.numel() for layer in source.layers for v in layer.values())
    source_params += sum(v.numel() for k, v in source.globals.items() if not (k == "head.weight" and c.tie_embeddings))
    own = model.num_parameters() - lora
    lines = [
        f"source: {source.folder} ({source.architecture}, {n} layers, d_model {c.d_model}, {c.n_heads} heads / "
        f"{c.n_kv_heads or c.n_heads} kv heads, licence {source.license or 'not stated'})",
        f"shape: {shape.name}, {c.unique_layers} layer(s) of weights, {c.effective_depth} layer applications",
        f"init: {args.init}; block layer j from source layers {result.block_from}; "
        f"applications stand for {result.stands_for}; replaced by the shared layers: {replaced or 'none'}; "
        f"dropped: {dropped or 'none'}",
        f"parameters kept: {own:,} of the source's {source_params:,} ({100 * own / source_params:.1f}%)",
    ]
    if result.distances:
        lines.append(
            "angular distance by span start: "
            + ", ".join(f"{s}: {d:.4f}" for s, d in sorted(result.distances.items()))
            + f" (chosen: {result.block_from[0][0]})"
        )
    if model.lora is not None:
        ranks = model.lora.ranks()
        clipped = sorted({f"{k.split('.', 2)[2]} -> {r}" for k, r in ranks.items() if r < c.lora_rank})
        lines.append(
            f"LoRA: rank {c.lora_rank} per loop ({'full' if args.lora_rank == 'full' else 'asked'}), "
            f"{lora:,} parameters; clipped to full rank: {', '.join(clipped) or 'nowhere'}"
        )
    if c.input_injection == "concat":
        lines.append(f"recurrence: concatenation adapter (2d -> d, [I | 0]), state noise std {c.state_noise}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="looped retrofit", description=__doc__.split("\n\n")[2])
    parser.add_argument("source", help="a transformers folder (Llama, Qwen2, Qwen3) or a looped .ckpt of a plain model")
    parser.add_argument("out", help="the checkpoint to write (OUT.ckpt)")
    parser.add_argument("--prelude", type=int, default=0, help="p: unshared layers before the loop (the first p)")
    parser.add_argument("--block", type=int, required=True, help="k: layers in the shared block")
    parser.add_argument("--loops", type=int, default=1, help="L: times the block is applied")
    parser.add_argument("--coda", type=int, default=0, help="c: unshared layers after the loop (the last c)")
    parser.add_argument("--init", choices=INITS, default="stepwise", help="how the block's k layers start")
    parser.add_argument("--lora-rank", help="per-loop LoRA rank R (>= 1) or full; default: no LoRA")
    parser.add_argument("--adapter", choices=("concat",), help="retrofitted recurrence's [input; state] -> d adapter")
    parser.add_argument("--state-noise", type=float, default=0.0, help="std of the noise the loop state starts from")
    parser.add_argument("--calibration", help="a text file for --init angular")
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of it to use")
    parser.add_argument("--tokenizer", help="tokenizer.json or prepared data dir (calibration with a looped SOURCE)")
    parser.add_argument("--max-seq-len", type=int, help="the context the model is built for (default: the source's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init random and fresh adapters")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT")
    args = parser.parse_args(argv)
    result, model, source = retrofit(args)
    summary = summarise(args, result, model, source)
    progress(f"writing {args.out}")
    save(Path(args.out), model, result, source, summary.splitlines()[1])
    print(summary)
    print(f"wrote {args.out}: looped fit --config recipes/retrofit/ROW.yaml --model.init_args.init_weights {args.out}")


if __name__ == "__main__":
    main()
