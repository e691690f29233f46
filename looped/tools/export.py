"""``looped export hf CHECKPOINT OUT_DIR [--tokenizer tokenizer.json] [--overwrite]``: a run as a transformers model.

Reads a Lightning checkpoint written by ``looped fit``/``looped run`` (a ``.ckpt`` file, or the
directory an FSDP2 run saves, consolidated here in memory) and writes ``OUT_DIR`` with

* ``config.json`` (``model_type: looped``, every ``LoopedConfig`` field), ``model.safetensors``
  and ``generation_config.json``, by ``transformers``' own ``save_pretrained``;
* the tokenizer files when the tokenizer is known: ``--tokenizer`` (a ``tokenizer.json`` or a
  prepared data directory), else what the run's data module used, read from the run's
  ``config.yaml`` beside ``checkpoints/``: a synthetic task's vocabulary as a word-level
  tokenizer, or the prepared data's ``tokenizer.json``;
* ``README.md``, a model card written from the run: shape, data, steps, last logged metrics
  and the per-loop accuracy table when the run recorded one (``looped.tools.report``'s reader).

``--as llama`` writes a plain ``(N⊗1)`` whose settings are Llama's (RMSNorm, SwiGLU, RoPE, softmax attention, no
loop) as a stock ``LlamaForCausalLM`` folder instead (``looped.convert.llama``): any reader of Llama reads it, no
``looped`` needed. Its tokenizer: ``--tokenizer`` (a ``transformers`` folder's tokenizer files, or a
``tokenizer.json``), else the one ``looped retrofit`` stored from its source, else the run's; the model card
names the source and its licence when the checkpoint came from ``looped retrofit``.

Then, with ``looped`` installed: ``import looped`` and ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``
(see ``looped.hf`` for why the import). Needs the ``[hf]`` extra.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from looped.errors import InputError
from looped.hf.config import LoopedHFConfig
from looped.hf.modeling import LoopedForCausalLM
from looped.hf.tokenization import file_tokenizer, vocab_tokenizer
from looped.model import LoopedConfig
from looped.tools.analysis import ModelShape
from looped.tools.report import NOT_TASK, PER_LOOP, read_scalars

# What an export writes; --overwrite removes these first, nothing else in OUT_DIR.
WRITES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)
# LoopedLM's metrics (and per named evaluation set), not the throughput monitor's counters.
METRIC = re.compile(r"^(test|val)/(exact_match|token_accuracy|answer_accuracy|loss|perplexity)(_\w+)?$")
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index file in a sharded checkpoint directory


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as one dict: a ``.ckpt`` file, or a sharded (FSDP2) directory consolidated in memory."""
    if not path.exists():
        raise InputError(f"CHECKPOINT: {path} does not exist; pass a .ckpt file or a sharded checkpoint directory")
    if path.is_dir():
        if not (path / DCP_METADATA).is_file():
            raise InputError(
                f"CHECKPOINT: {path} is a directory but not a sharded checkpoint (no {DCP_METADATA} file); "
                "pass a .ckpt file or the directory an FSDP2 run saved under checkpoints/"
            )
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)  # what `python -m lightning.fabric...consolidate_checkpoint` runs
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise InputError(f"CHECKPOINT: torch cannot read {path} as a checkpoint ({str(err).splitlines()[0]})") from err


def looped_weights(checkpoint: dict[str, Any], path: Path) -> tuple[LoopedConfig, dict[str, torch.Tensor]]:
    """The ``LoopedConfig`` a ``LoopedLM`` saved in its hyperparameters and the transformer's weights."""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    config = hparams.get("config") if isinstance(hparams, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise InputError(
            f"CHECKPOINT: {path} is not a looped checkpoint (no hyper_parameters.config / state_dict as LoopedLM "
            "saves them); export a checkpoint written by `looped fit` or `looped run`"
        )
    try:
        looped_config = LoopedConfig(**config)
    except (TypeError, ValueError) as err:
        raise InputError(f"CHECKPOINT: {path} holds a model config this code cannot build: {err}") from err
    weights = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    return looped_config, weights


def run_directory(checkpoint: Path) -> Path | None:
    """``runs/<name>/version_N`` for ``.../version_N/checkpoints/<file or dir>``, when it holds the run's config."""
    run = checkpoint.resolve().parent.parent
    return run if checkpoint.resolve().parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


def data_section(run: Path | None) -> tuple[str, dict]:
    """The run's data module: ``(class_path, init_args)`` from its ``config.yaml`` (``("", {})`` without one)."""
    if run is None:
        return "", {}
    data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}
    return str(data.get("class_path", "")), dict(data.get("init_args") or {})


def find_tokenizer(class_path: str, init_args: dict, max_length: int):
    """The run's tokenizer from its data module: ``(tokenizer, vocab size, where from)``, or Nones."""
    if class_path:
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise InputError(f"data.class_path: {class_path} does not import ({err}); pass --tokenizer") from err
        if hasattr(cls, "vocab"):  # a synthetic task: its token strings, id = index
            task = cls(**init_args)
            return vocab_tokenizer(task.vocab, max_length, task.eos_id), task.vocab_size, f"{name}.vocab"
        if init_args.get("path") and Path(init_args["path"]).exists():  # prepared text (looped prepare)
            tokenizer, size = file_tokenizer(init_args["path"], max_length)
            return tokenizer, size, f"the prepared data's tokenizer ({init_args['path']})"
    return None, None, None


def model_card(
    out: Path, config: LoopedConfig, params: int, checkpoint: dict, source: Path, run: Path | None, data: tuple
) -> str:
    """``README.md``: the shape, the data, the steps, the last logged metrics and the per-loop table."""
    shape = ModelShape(config.block_layers, config.loops, config.prelude_layers, config.coda_layers)
    class_path, init_args = data
    task = ", ".join(f"{k}={v}" for k, v in init_args.items() if k not in NOT_TASK and v is not None)
    lines = [
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- looped-transformer\n---\n",
        f"# {run.parent.name if run else out.name}: a looped transformer ({shape.name})\n",
        f"A block of {config.block_layers} layer(s) applied {config.loops} times with shared weights"
        + (f", between {config.prelude_layers} prelude and {config.coda_layers} coda layers" if shape.is_middle else "")
        + f": effective depth {shape.depth}, {params:,} parameters; d_model {config.d_model}, {config.n_heads} heads, "
        f"d_ff {config.d_ff}, {config.attention} attention, {config.pos_encoding} positions, "
        f"vocabulary {config.vocab_size}, context {config.max_seq_len}. Trained with the `looped` recipes "
        f"(`LoopedLM`); exported from `{source.name}` at step {checkpoint.get('global_step', '?')}.\n",
    ]
    if class_path:
        lines.append(f"**Data**: `{class_path}`" + (f" ({task})" if task else "") + ".\n")
    scalars = read_scalars(run) if run is not None and any(run.glob("events.out.tfevents.*")) else {}
    final = {tag: series[-1][1] for tag, series in scalars.items() if tag.startswith(("test/", "val/")) and series}
    plain = {tag: v for tag, v in final.items() if METRIC.match(tag) and not PER_LOOP.search(tag)}
    if plain:
        lines.append("**Last logged metrics** (the test stage of `looped run` uses the best validation checkpoint):\n")
        lines += ["| metric | value |", "|---|---|", *(f"| {t} | {v:.4g} |" for t, v in sorted(plain.items())), ""]
    for stage in ("test", "val"):
        loops = sorted(
            (int(m.group(1)), v)
            for t, v in final.items()
            if t.startswith(f"{stage}/exact_match_loop") and (m := PER_LOOP.search(t))
        )
        if loops:
            lines.append(f"**{stage} exact match after each loop** (trained with L={config.loops}; `num_loops=n`):\n")
            lines.append("| loops | " + " | ".join(f"{n}{'*' if n == config.loops else ''}" for n, _ in loops) + " |")
            lines.append("|---" * (len(loops) + 1) + "|")
            lines.append("| acc % | " + " | ".join(f"{100 * v:.1f}" for _, v in loops) + " |\n")
            break
    lines.append(
        "## Use\n\n```python\nimport looped  # registers model_type 'looped' with transformers (the [hf] extra)\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{out.name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}")\n'
        "inputs = tokenizer(TEXT, return_tensors='pt')\n"
        f"out = model.generate(**inputs, max_new_tokens=8, num_loops={config.loops})\n```\n\n"
        "`num_loops` (in `forward` and `generate`) sets how many times the block runs: fewer or more loops than "
        "trained, without retraining. `output_hidden_states=True` returns one state per *loop*, not per layer: "
        "`hidden_states[0]` is the embeddings (the block's input), `hidden_states[n]` the state after loop n, "
        f"{config.loops + 1} states at the trained depth; `model.model.readout(h)` reads any of them out. "
        "Self-speculative decoding, the same weights drafting with fewer loops: "
        "`model.generate(**inputs, assistant_model=model.draft_model(n))` (greedy tokens unchanged).\n"
    )
    return "\n".join(lines)


def export_hf(checkpoint_path: str, out_dir: str, tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint as a ``transformers`` model folder (see the module doc); returns ``out_dir``."""
    source, out = Path(checkpoint_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"OUT_DIR: {out} already exists; pass --overwrite to replace an export there, or a new folder")
    checkpoint = read_checkpoint(source)
    config, weights = looped_weights(checkpoint, source)
    run = run_directory(source)
    data = data_section(run)
    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise InputError(
                f"--tokenizer: {tokenizer} does not exist; pass a tokenizer.json or a prepared data directory"
            )
        try:
            hf_tokenizer, size = file_tokenizer(tokenizer, config.max_seq_len)
        except Exception as err:  # no end-of-text token, not a tokenizer.json: the tokenizers library's words
            raise InputError(f"--tokenizer: {tokenizer}: {str(err).splitlines()[0]}") from err
        origin = "--tokenizer"
    else:
        hf_tokenizer, size, origin = find_tokenizer(*data, config.max_seq_len)
    if hf_tokenizer is not None and size != config.vocab_size:
        raise InputError(
            f"{origin}: the tokenizer has {size} token ids but the model's vocab_size is {config.vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    hf_config = LoopedHFConfig.from_looped_config(
        config,
        eos_token_id=None if hf_tokenizer is None else hf_tokenizer.eos_token_id,
        pad_token_id=None if hf_tokenizer is None else hf_tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        model = LoopedForCausalLM(hf_config)
    missing, unexpected = model.model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise InputError(
            f"CHECKPOINT: {source}'s weights do not fit its own config {asdict(config)} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if model.model.rope is not None:  # buffers are no weights: computed from the config
        model.model.rope.to_empty(device="cpu").reset_buffers()
    if config.tie_embeddings:
        model.model.head.weight = model.model.embed.weight
    if overwrite and out.is_dir():
        for name in WRITES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.model.parameters())
    (out / "README.md").write_text(model_card(out, config, params, checkpoint, source, run, data))
    return out


def export_llama_folder(
    checkpoint_path: str, out_dir: str, tokenizer: str | None = None, overwrite: bool = False
) -> Path:
    """``--as llama``: the checkpoint as a stock ``LlamaForCausalLM`` folder with tokenizer and model card."""
    from looped.convert.llama import TOKENIZER_FILES, export_llama

    source, out = Path(checkpoint_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"OUT_DIR: {out} already exists; pass --overwrite to replace an export there, or a new folder")
    checkpoint = read_checkpoint(source)
    config, weights = looped_weights(checkpoint, source)
    origin = checkpoint.get("retrofit") or {}
    if overwrite and out.is_dir():
        for name in (*WRITES, *TOKENIZER_FILES):
            (out / name).unlink(missing_ok=True)
    files: dict[str, bytes] = dict(origin.get("tokenizer_files") or {})
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
            files = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}
        elif path.is_file():
            files = {"tokenizer.json": path.read_bytes()}
        else:
            raise InputError(
                f"--tokenizer: {tokenizer} holds no tokenizer files; pass a model folder or tokenizer.json"
            )
    special = {k: origin[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if origin.get(k) is not None}
    export_llama(config, weights, out, **special)
    for name, data in files.items():
        (out / name).write_bytes(data)
    if not files:
        hf_tokenizer, _, _ = find_tokenizer(*data_section(run_directory(source)), config.max_seq_len)
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(out)
    licence = origin.get("license") or "unknown"
    shape = ModelShape(config.block_layers, config.loops, config.prelude_layers, config.coda_layers)
    (out / "README.md").write_text(
        f"---\nlibrary_name: transformers\npipeline_tag: text-generation\nlicense: {licence}\n---\n\n"
        f"# {out.name}\n\nA stock `LlamaForCausalLM` exported by `looped export hf --as llama` from "
        f"`{source.name}` (step {checkpoint.get('global_step', '?')}), a plain {shape.name} of "
        f"{config.unique_layers} layers: d_model {config.d_model}, {config.n_heads} heads "
        f"({config.n_kv_heads or config.n_heads} key/value heads), d_ff {config.d_ff}, "
        f"vocabulary {config.vocab_size}.\n\n"
        + (
            f"Derived from `{origin['source']}` ({origin.get('architecture', '?')}), licence: {licence}; "
            f"retrofitted by `looped retrofit` ({origin.get('summary', '')}). The source's licence applies.\n"
            if origin.get("source")
            else "No source model recorded: trained from scratch with the `looped` recipes.\n"
        )
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="looped export", description="Export a trained run for other libraries.")
    formats = parser.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a transformers model folder (config.json, model.safetensors, tokenizer)")
    hf.add_argument("checkpoint", help="a .ckpt file, or a sharded (FSDP2) checkpoint directory")
    hf.add_argument("out_dir", help="the folder to write")
    hf.add_argument("--tokenizer", help="tokenizer.json or a prepared data directory (default: the run's data)")
    hf.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    hf.add_argument(
        "--as",
        dest="as_",
        choices=("looped", "llama"),
        default="looped",
        help="looped: model_type looped (any shape; needs looped to load); llama: a stock LlamaForCausalLM "
        "(a plain (N⊗1) with Llama's settings; loads without looped)",
    )
    args = parser.parse_args(argv)
    export = export_llama_folder if args.as_ == "llama" else export_hf
    out = export(args.checkpoint, args.out_dir, args.tokenizer, args.overwrite)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    load = "" if args.as_ == "llama" else "import looped; "
    print(f"looped export: wrote {out}/ ({files})\nload it: {load}AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
