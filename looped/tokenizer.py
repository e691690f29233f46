"""Tokenizers of prepared text data: UTF-8 bytes, or a Hugging Face ``tokenizer.json``.

Shared by the data modules that stream prepared text (``looped.datamodules.PileDataModule``),
the tool that prepares it (``looped prepare``) and the lm-eval adapter, so none of them
imports another for it. A prepared directory (``looped prepare pile --output DIR``) holds
``DIR/manifest.json``, which records the tokenizer, and the ``tokenizer.json`` it used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS = 256: needs no file, never sees an unknown token."""

    vocab_size, eos_id, sha256 = 257, 256, hashlib.sha256(b"looped-byte-tokenizer-v1").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face ``tokenizer.json``; EOS is the first of ``EOS_CANDIDATES`` in its vocabulary."""

    def __init__(self, text: str, origin: str = "tokenizer", eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        self.text = text
        self.tokenizer = Tokenizer.from_str(text)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        names = [eos_token] if eos_token else EOS_CANDIDATES
        found = [i for i in (self.tokenizer.token_to_id(t) for t in names) if i is not None]
        if not found:
            raise ValueError(
                f"{origin} has no end-of-document token (any of {', '.join(names)}); add one as a "
                "special token, or train one with `looped prepare tokenizer` (it adds <|endoftext|>)"
            )
        self.eos_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def load_tokenizer(path: str | None, eos_token: str | None = None):
    """``FileTokenizer`` for a ``tokenizer.json`` path, ``ByteTokenizer`` for None.

    A directory is read as ``looped prepare pile``'s output: its manifest says bytes or
    names the ``tokenizer.json`` copied beside it.
    """
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text())["tokenizer"]["kind"] == "bytes":
            return ByteTokenizer()
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {path}: no tokenizer.json there; pass the prepared data directory or the file itself"
        )
    return FileTokenizer(path.read_text(encoding="utf-8"), origin=str(path), eos_token=eos_token)


def read_text(url: str) -> str:
    """A small file from a local path or an object-store URL (fsspec: ``s3://`` needs ``s3fs``)."""
    if "://" not in url:
        with open(url, encoding="utf-8") as f:
            return f.read()
    import fsspec

    with fsspec.open(url, "r", encoding="utf-8") as f:
        return f.read()


def prepared_tokenizer(path: str, manifest: dict) -> ByteTokenizer | FileTokenizer:
    """The tokenizer a prepared directory (local or an object-store URL) was made with, from its manifest."""
    if manifest["tokenizer"]["kind"] == "bytes":
        return ByteTokenizer()
    return FileTokenizer(read_text(f"{path}/{TOKENIZER_FILE}"), origin=f"{path}/{TOKENIZER_FILE}")
