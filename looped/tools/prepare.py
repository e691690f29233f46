"""``looped prepare pile|tokenizer``: turn Pile shards into litdata token chunks, once.

``looped prepare pile --input SHARDS --output DIR [--tokenizer tokenizer.json]`` reads
``.jsonl.zst`` / ``.jsonl`` shards (one JSON object a line: ``text`` and
``meta.pile_set_name``), tokenizes every document, appends EOS, and writes
``TokensLoader`` chunks with ``litdata.optimize`` into ``DIR/train`` and
``DIR/val``. A document goes to ``val`` when its text hash falls below
``--val-fraction``: the split does not depend on shard order, workers or
re-runs. ``DIR/manifest.json`` records the tokenizer (hash, vocab size, EOS id)
and the sources done per split, so a re-run only processes new shards and refuses
a different tokenizer instead of mixing two vocabularies in one dataset.

``looped prepare tokenizer --input SHARDS --vocab-size N --output tokenizer.json``
trains a byte-level BPE on a sample of the shards with Hugging Face ``tokenizers``.
Without ``--tokenizer`` the dataset is byte-level: ids 0..255 are UTF-8 bytes, 256 is EOS.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from looped.tokenizer import EOS_CANDIDATES, MANIFEST, TOKENIZER_FILE, ByteTokenizer, FileTokenizer, load_tokenizer

SPLITS = ("train", "val")


class CorruptShardError(ValueError):
    """A shard or one of its lines cannot be read; the message names the file and line."""


def train_tokenizer(sources: list[str], vocab_size: int, output: str, sample_documents: int = 100_000) -> FileTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer) on up to ``sample_documents`` documents of ``sources``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"--vocab-size must exceed the 256 byte symbols plus EOS, got {vocab_size}")

    def texts() -> Iterator[str]:
        n = 0
        for source in sources:
            for _, text in read_documents(source, skip_bad=True, report={}):
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


# -- reading shards ---------------------------------------------------------------------------
def find_sources(pattern: str) -> list[str]:
    """Shards named by a directory (every ``*.jsonl[.zst]`` below it) or a glob, sorted, absolute."""
    if os.path.isdir(pattern):
        found = [str(p) for p in Path(pattern).rglob("*") if p.name.endswith((".jsonl", ".jsonl.zst"))]
    else:
        found = glob.glob(pattern, recursive=True)
    if not found:
        raise FileNotFoundError(f"--input {pattern}: no .jsonl or .jsonl.zst shards found")
    return sorted(os.path.abspath(p) for p in found)


def _zstd_pieces(raw, size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed bytes of every frame; a frame cut short raises ``EOFError`` (a stream reader would not)."""
    import zstandard

    decompressor, pending, open_frame = zstandard.ZstdDecompressor().decompressobj(), b"", False
    while True:
        data = pending or raw.read(size)
        pending = b""
        if not data:
            break
        open_frame = True
        yield decompressor.decompress(data)
        if decompressor.eof:  # one frame done; a Pile shard may hold several
            pending, decompressor = decompressor.unused_data, zstandard.ZstdDecompressor().decompressobj()
            open_frame = False
    if open_frame:
        raise EOFError("the zstd frame ends before its end marker")


def _lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        if not path.endswith(".zst"):
            yield from raw
            return
        rest = b""
        for piece in _zstd_pieces(raw):
            *lines, rest = (rest + piece).split(b"\n")
            yield from lines
        if rest:
            yield rest


def read_documents(path: str, skip_bad: bool, report: dict) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every document; bad lines raise (or are counted in ``report``)."""
    import zstandard

    report.setdefault("bad_lines", [])
    number = 0
    try:
        for number, line in enumerate(_lines(path), start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line.decode("utf-8"))["text"]
                if not isinstance(text, str):
                    raise TypeError(f"'text' is {type(text).__name__}, not a string")
            except (ValueError, KeyError, TypeError) as error:  # UnicodeDecodeError is a ValueError
                message = f"{path}:{number}: not a JSON object with a 'text' string ({error!r})"
                if not skip_bad:
                    raise CorruptShardError(message + "; fix or drop the line, or pass --skip-bad") from None
                report["bad_lines"].append(message)
                continue
            yield number, text
    except (zstandard.ZstdError, EOFError) as error:
        message = f"{path}: unreadable after line {number} ({error}); the shard is truncated or corrupt"
        if not skip_bad:
            raise CorruptShardError(message + "; download it again, or pass --skip-bad") from None
        report["bad_shard"] = message


def in_val(text: str, val_fraction: float) -> bool:
    """Deterministic held-out split: the first 8 bytes of the text's BLAKE2b hash, as a fraction of 2^64."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


class _Tokenize:
    """``litdata.optimize`` fn: one shard in, one token tensor per document of ``split`` out."""

    def __init__(self, tokenizer_text: str | None, split: str, val_fraction: float, skip_bad: bool, reports: str):
        self.tokenizer_text, self.split, self.val_fraction = tokenizer_text, split, val_fraction
        self.skip_bad, self.reports = skip_bad, reports
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
        for _, text in read_documents(source, self.skip_bad, report):
            if in_val(text, self.val_fraction) != (self.split == "val"):
                continue
            ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=dtype)
            report["documents"] += 1
            report["tokens"] += len(ids)
            yield torch.from_numpy(ids)
        name = hashlib.sha256(source.encode()).hexdigest()[:16]
        Path(self.reports, f"{self.split}-{name}.json").write_text(json.dumps({"source": source, **report}))


# -- the prepare command ------------------------------------------------------------------------
def prepare_pile(
    sources: list[str],
    output: str,
    tokenizer_path: str | None = None,
    val_fraction: float = 0.005,
    workers: int | None = None,
    skip_bad: bool = False,
    chunk_bytes: str = "64MB",
) -> dict:
    """Tokenize ``sources`` into ``output/{train,val}``; returns the manifest. See the module docstring."""
    import litdata
    from litdata.streaming.item_loader import TokensLoader

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
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    manifest_path.write_text(json.dumps(manifest, indent=2))

    bad: list[str] = []
    for split in SPLITS:
        done = manifest["splits"][split]["sources"]
        todo = [s for s in sources if s not in done]
        if not todo:
            print(f"{split}: all {len(sources)} sources already prepared in {out / split}")
            continue
        reports = out / ".reports"
        shutil.rmtree(reports, ignore_errors=True)
        reports.mkdir()
        fn = _Tokenize(getattr(tokenizer, "text", None), split, val_fraction, skip_bad, str(reports))
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


def main(argv: list[str]) -> None:
    """``looped prepare pile ...`` / ``looped prepare tokenizer ...``."""
    parser = argparse.ArgumentParser(prog="looped prepare", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="what", required=True)
    pile = commands.add_parser("pile", help="tokenize shards into litdata chunks")
    pile.add_argument("--input", required=True, help="a directory of .jsonl[.zst] shards, or a glob")
    pile.add_argument("--output", required=True, help="dataset directory (train/, val/, manifest.json)")
    pile.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: UTF-8 bytes)")
    pile.add_argument("--val-fraction", type=float, default=0.005, help="held-out share of documents")
    pile.add_argument("--workers", type=int, help="processes (default: all cores)")
    pile.add_argument("--skip-bad", action="store_true", help="count and skip corrupt lines/shards")
    pile.add_argument("--chunk-bytes", default="64MB", help="size of each litdata chunk file")
    tok = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a sample of shards")
    tok.add_argument("--input", required=True, help="a directory of .jsonl[.zst] shards, or a glob")
    tok.add_argument("--vocab-size", type=int, required=True, help="tokens, EOS included")
    tok.add_argument("--output", required=True, help="where to write tokenizer.json")
    tok.add_argument("--sample-documents", type=int, default=100_000, help="documents to train on")
    args = parser.parse_args(argv)
    try:
        if args.what == "pile":
            prepare_pile(
                find_sources(args.input),
                args.output,
                args.tokenizer,
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
