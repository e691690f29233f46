"""Small Pile-format shards (zstd JSONL, ``text`` + ``meta.pile_set_name``) made on the spot: no download."""

import json
import random
from pathlib import Path

import zstandard

WORDS = "the cat sat on a mat while looped transformers reason over latent thoughts and hops".split()


def documents(shard: int, n: int) -> list[str]:
    rng = random.Random(shard)
    return [f"doc {shard}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for i in range(n)]


def write_shard(path: Path, texts: list[str], compress: bool = True) -> Path:
    lines = [json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}}) for t in texts]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def make_shards(folder: Path, shards: int = 3, per_shard: int = 60) -> list[str]:
    """``shards`` files ``NN.jsonl.zst`` (the last one plain ``.jsonl``); returns every document's text."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for s in range(shards):
        docs = documents(s, per_shard)
        suffix = ".jsonl" if s == shards - 1 else ".jsonl.zst"
        write_shard(folder / f"{s:02d}{suffix}", docs, compress=suffix.endswith(".zst"))
        texts += docs
    return texts


def prepared_pile(root: Path, shards: int, per_shard: int, val_fraction: float, workers: int) -> Path:
    """Shards made under ``root/shards`` and prepared by ``looped prepare``'s code into ``root/data``."""
    from looped.tools.prepare import find_sources, prepare_dataset

    make_shards(root / "shards", shards=shards, per_shard=per_shard)
    prepare_dataset(
        find_sources(str(root / "shards")),
        str(root / "data"),
        val_fraction=val_fraction,
        workers=workers,
        chunk_bytes="4kb",
    )
    return root / "data"


def make_text_folder(folder: Path, n: int = 60) -> list[str]:
    """``n`` text files (one document each, in nested folders) for ``looped prepare text``; returns their texts."""
    texts = [text + "\nsecond line, ünïcode\n" for text in documents(7, n)]
    for i, text in enumerate(texts):
        path = folder / f"part{i % 3}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return texts


def prepared_text(root: Path, n: int = 60, tokenizer: str | None = "bytes") -> Path:
    """A text folder made under ``root/text`` and prepared by ``looped prepare text``'s code into ``root/data``."""
    from looped.tools.prepare import prepare_text

    make_text_folder(root / "text", n)
    prepare_text(
        [str(root / "text")],
        str(root / "data"),
        tokenizer_path=tokenizer,
        vocab_size=300,
        val_fraction=0.2,
        workers=1,
        chunk_bytes="4kb",
    )
    return root / "data"
