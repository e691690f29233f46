"""``looped prepare pile|text|tokenizer``: turn documents into litdata token chunks, once.

``looped prepare pile --input SHARDS --output DIR [--tokenizer tokenizer.json]`` reads
``.jsonl.zst`` / ``.jsonl`` shards (one JSON object a line: ``text`` and
``meta.pile_set_name``), tokenizes every document, appends EOS, and writes
``TokensLoader`` chunks with ``litdata.optimize`` into ``DIR/train`` and
``DIR/val``. A document goes to ``val`` when its text hash falls below
``--val-fraction``: the split does not depend on shard order, workers or
re-runs. ``DIR/manifest.json`` records the tokenizer (hash, vocab size, EOS id)
and the sources done per split, so a re-run only processes new shards and refuses
a different tokenizer instead of mixing two vocabularies in one dataset.

``looped prepare text --input DIR|FILES|stdlib [--glob '**/*.py'] --output DIR`` does the same for
any folder of text or code files, one document per file (``--input stdlib``: the running Python's
standard library, ~800 files, 12 MB, on every machine). It trains a BPE tokenizer on the
training files unless given one. Both commands are one pipeline (``prepare_dataset``) with two
readers (``looped.tools.readers``).

``looped prepare tokenizer --input SHARDS --vocab-size N --output tokenizer.json``
trains a byte-level BPE on a sample of the shards with Hugging Face ``tokenizers``.
Without ``--tokenizer`` the dataset is byte-level: ids 0..255 are UTF-8 bytes, 256 is EOS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from looped.tokenizer import EOS_CANDIDATES, MANIFEST, TOKENIZER_FILE, ByteTokenizer, FileTokenizer, load_tokenizer
from looped.tools.readers import (
    CorruptShardError,
    Reader,
    find_sources,
    find_text_files,
    read_jsonl,
    read_text_file,
)

SPLITS = ("train", "val")


def train_tokenizer(
    sources: list[str],
    vocab_size: int,
    output: str,
    sample_documents: int = 100_000,
    reader: Reader = read_jsonl,
    val_fraction: float | None = None,
) -> FileTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer) on up to ``sample_documents`` documents of ``sources``.

    With ``val_fraction`` the documents ``in_val`` would hold out are left out of its training too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"--vocab-size must exceed the 256 byte symbols plus EOS, got {vocab_size}")

    def texts() -> Iterator[str]:
        n = 0
        for source in sources:
            for _, text in reader(source, True, {}):
                if val_fraction is not None and in_val(text, val_fraction):
                    continue
                yield text
                n += 1
                if n >= sample_documents:
                    return

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_CANDIDATES[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown token
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    tokenizer.save(output)
    return FileTokenizer(Path(output).read_text(encoding="utf-8"), origin=output)


def in_val(text: str, val_fraction: float) -> bool:
    """Deterministic held-out split: the first 8 bytes of the text's BLAKE2b hash, as a fraction of 2^64."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


class _Tokenize:
    """``litdata.optimize`` fn: one source in, one token tensor per document of ``split`` out."""

    def __init__(
        self, tokenizer_text: str | None, split: str, val_fraction: float, skip_bad: bool, reports: str, reader: Reader
    ):
        self.tokenizer_text, self.split, self.val_fraction = tokenizer_text, split, val_fraction
        self.skip_bad, self.reports, self.reader = skip_bad, reports, reader
        self._tokenizer = None

    def __call__(self, source: str):
        import numpy as np
        import torch

        if self._tokenizer is None:  # built in the worker: tokenizers objects do not pickle cheaply
            text = self.tokenizer_text
            self._tokenizer = ByteTokenizer() if text is None else FileTokenizer(text)
        tok = self._tokenizer
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
        report = {"documents": 0, "tokens": 0}
        for _, text in self.reader(source, self.skip_bad, report):
            if in_val(text, self.val_fraction) != (self.split == "val"):
                continue
            ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=dtype)
            report["documents"] += 1
            report["tokens"] += len(ids)
            yield torch.from_numpy(ids)
        name = hashlib.sha256(source.encode()).hexdigest()[:16]
        Path(self.reports, f"{self.split}-{name}.json").write_text(json.dumps({"source": source, **report}))


# -- the prepare command ------------------------------------------------------------------------
def prepare_dataset(
    sources: list[str],
    output: str,
    tokenizer_path: str | None = None,
    val_fraction: float = 0.005,
    workers: int | None = None,
    skip_bad: bool = False,
    chunk_bytes: str = "64MB",
    reader: Reader = read_jsonl,
) -> dict:
    """Tokenize the documents ``reader`` finds in ``sources`` into ``output/{train,val}``; returns the manifest.

    The one pipeline of ``looped prepare pile`` (``read_jsonl``) and ``looped prepare text``
    (``read_text_file``); see the module docstring.
    """
    import litdata
    from litdata.streaming.item_loader import TokensLoader

    from looped.datamodules.pile import damaged_chunks

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    tokenizer = load_tokenizer(tokenizer_path)
    out = Path(output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    info = {
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "kind": "bytes" if tokenizer_path is None else "file",
    }
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["tokenizer"]["sha256"] != tokenizer.sha256:
            raise ValueError(
                f"{out} was prepared with another tokenizer (sha256 {manifest['tokenizer']['sha256'][:12]}…, "
                f"vocab {manifest['tokenizer']['vocab_size']}); this run's is {tokenizer.sha256[:12]}… "
                f"(vocab {tokenizer.vocab_size}). Use a new --output directory, or the same --tokenizer as before"
            )
        if manifest["val_fraction"] != val_fraction:
            raise ValueError(
                f"{out} was split with --val-fraction {manifest['val_fraction']}; a different fraction would put "
                "training documents into validation. Use the same value or a new --output directory"
            )
    else:
        manifest = {
            "format": 1,
            "tokenizer": info,
            "val_fraction": val_fraction,
            "splits": {split: {"sources": {}} for split in SPLITS},
        }
    if tokenizer_path is not None and Path(tokenizer_path).absolute() != out / TOKENIZER_FILE:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    manifest_path.write_text(json.dumps(manifest, indent=2))

    bad: list[str] = []
    for split in SPLITS:
        done = manifest["splits"][split]["sources"]
        todo = [s for s in sources if s not in done]
        damaged = damaged_chunks(str(out / split)) if not todo else []
        if damaged:  # a chunk lost or cut short since: litdata numbers chunks across a split, so redo all of it
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            print(f"{split}: {damaged[0]}{more}; preparing the split again")
            done.clear()
            todo = list(sources)
        if not todo:
            print(f"{split}: all {len(sources)} sources already prepared in {out / split}")
            continue
        reports = out / ".reports"
        shutil.rmtree(reports, ignore_errors=True)
        reports.mkdir()
        fn = _Tokenize(getattr(tokenizer, "text", None), split, val_fraction, skip_bad, str(reports), reader)
        try:
            litdata.optimize(
                fn=fn,
                inputs=todo,
                output_dir=str(out / split),
                chunk_bytes=chunk_bytes,
                num_workers=min(workers or os.cpu_count() or 1, len(todo)),
                item_loader=TokensLoader(),
                mode="append" if done else "overwrite",
                # litdata forces a process-wide start method (spawn by default): fork is
                # seconds faster per call on Linux and leaves the default there unchanged.
                start_method="fork" if sys.platform == "linux" else None,
            )
        except RuntimeError as error:  # litdata wraps a worker's exception in its traceback text
            found = re.search(r"CorruptShardError: (.*)", str(error))
            if found:
                raise CorruptShardError(found.group(1)) from None
            raise
        for report_file in sorted(reports.glob(f"{split}-*.json")):
            report = json.loads(report_file.read_text())
            source = report.pop("source")
            bad += report["bad_lines"] + ([report["bad_shard"]] if "bad_shard" in report else [])
            report["bad_lines"] = len(report["bad_lines"])
            done[source] = report
        shutil.rmtree(reports)
        manifest_path.write_text(json.dumps(manifest, indent=2))  # after the split: a crash redoes only it
    bad = list(dict.fromkeys(bad))  # every split's pass reads every line, so each reports the same bad ones
    if bad:
        print(f"skipped {len(bad)} bad lines or shards (--skip-bad):")
        print("\n".join(f"  {b}" for b in bad))
    for split in SPLITS:
        entries = manifest["splits"][split]["sources"].values()
        print(f"{split}: {sum(e['documents'] for e in entries)} documents, {sum(e['tokens'] for e in entries)} tokens")
    return manifest


def prepare_text(
    inputs: list[str],
    output: str,
    pattern: str | None = None,
    tokenizer_path: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.02,
    workers: int | None = None,
    skip_bad: bool = False,
    chunk_bytes: str = "64MB",
) -> dict:
    """``looped prepare text``: every file ``find_text_files`` names, one document each, through ``prepare_dataset``.

    Without ``tokenizer_path`` a byte-level BPE of ``vocab_size`` tokens is trained on the training
    files (``train_tokenizer``), or, when ``output`` was prepared before, its own ``tokenizer.json`` is
    reused so a re-run resumes; ``tokenizer_path="bytes"`` keeps UTF-8 bytes.
    """
    sources = find_text_files(inputs, pattern)
    out = Path(output)
    trained = None  # a freshly trained tokenizer file; prepare_dataset keeps its own copy as DIR/tokenizer.json
    if tokenizer_path == "bytes":
        tokenizer_path = None
    elif tokenizer_path is None and (out / MANIFEST).exists():
        previous = json.loads((out / MANIFEST).read_text())["tokenizer"]
        tokenizer_path = str(out / TOKENIZER_FILE) if previous["kind"] == "file" else None
    elif tokenizer_path is None:
        out.mkdir(parents=True, exist_ok=True)
        trained = tokenizer_path = str(out / "tokenizer.trained.json")
        train_tokenizer(sources, vocab_size, trained, reader=read_text_file, val_fraction=val_fraction)
        print(f"trained a BPE tokenizer of {vocab_size} tokens on the training files of {len(sources)}")
    try:
        return prepare_dataset(
            sources, output, tokenizer_path, val_fraction, workers, skip_bad, chunk_bytes, reader=read_text_file
        )
    finally:
        if trained is not None:
            Path(trained).unlink(missing_ok=True)


def main(argv: list[str]) -> None:
    """``looped prepare pile|text|tokenizer ...``."""
    parser = argparse.ArgumentParser(prog="looped prepare", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="what", required=True)
    pile = commands.add_parser("pile", help="tokenize Pile shards (.jsonl[.zst]) into litdata chunks")
    pile.add_argument("--input", required=True, help="a directory of .jsonl[.zst] shards, or a glob")
    pile.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: UTF-8 bytes)")
    pile.add_argument("--val-fraction", type=float, default=0.005, help="held-out share of documents")
    text = commands.add_parser("text", help="tokenize a folder of text or code files (one document each)")
    text.add_argument("--input", required=True, nargs="+", help="files, directories, or `stdlib` (this Python's)")
    text.add_argument("--glob", help="files to take in each directory (default **/*.txt; **/*.py for stdlib)")
    text.add_argument("--tokenizer", help="a tokenizer.json, or `bytes` (default: train a BPE on the files)")
    text.add_argument("--vocab-size", type=int, default=4096, help="tokens of the trained BPE, EOS included")
    text.add_argument("--val-fraction", type=float, default=0.02, help="held-out share of documents")
    for command in (pile, text):
        command.add_argument("--output", required=True, help="dataset directory (train/, val/, manifest.json)")
        command.add_argument("--workers", type=int, help="processes (default: all cores)")
        command.add_argument("--skip-bad", action="store_true", help="count and skip corrupt lines/files")
        command.add_argument("--chunk-bytes", default="64MB", help="size of each litdata chunk file")
    tok = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a sample of shards")
    tok.add_argument("--input", required=True, help="a directory of .jsonl[.zst] shards, or a glob")
    tok.add_argument("--vocab-size", type=int, required=True, help="tokens, EOS included")
    tok.add_argument("--output", required=True, help="where to write tokenizer.json")
    tok.add_argument("--sample-documents", type=int, default=100_000, help="documents to train on")
    args = parser.parse_args(argv)
    try:
        if args.what == "pile":
            prepare_dataset(
                find_sources(args.input),
                args.output,
                args.tokenizer,
                args.val_fraction,
                args.workers,
                args.skip_bad,
                args.chunk_bytes,
            )
        elif args.what == "text":
            prepare_text(
                args.input,
                args.output,
                args.glob,
                args.tokenizer,
                args.vocab_size,
                args.val_fraction,
                args.workers,
                args.skip_bad,
                args.chunk_bytes,
            )
        else:
            trained = train_tokenizer(find_sources(args.input), args.vocab_size, args.output, args.sample_documents)
            print(f"wrote {args.output}: vocab {trained.vocab_size}, eos id {trained.eos_id}")
    except (CorruptShardError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"looped prepare {args.what}: {error}") from None
