"""Where ``looped prepare`` finds documents: its two readers, and the sources each one reads.

A *reader* turns one source file into ``(number, text)`` documents; ``looped prepare``'s one
pipeline (``looped.tools.prepare.prepare_dataset``) tokenizes, splits and stores whatever a reader
yields, so both commands share the split, the manifest, the resume and the bad-input handling:

* ``read_jsonl`` — a Pile shard (``.jsonl`` or ``.jsonl.zst``): a document per line, its ``text`` field
  (``looped prepare pile``);
* ``read_text_file`` — any text or code file: the whole file is one document (``looped prepare text``).

A reader that meets a bad line or file raises ``CorruptShardError`` naming it, or, with
``skip_bad``, records it in ``report`` and goes on.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

Reader = Callable[[str, bool, dict], Iterator[tuple[int, str]]]
"""``reader(path, skip_bad, report)`` yields ``(number, text)``: a line number, or 1 for a whole file."""

STDLIB = "stdlib"
"""``--input stdlib``: the running Python's standard library, found with ``sysconfig``."""
STDLIB_SKIPPED = {"site-packages", "dist-packages", "test", "tests"}
"""Folders of the standard library left out: installed packages, and the test suites (repetitive fixtures)."""


class CorruptShardError(ValueError):
    """A shard, a file or one of its lines cannot be read; the message names the file and line."""


# -- Pile shards ------------------------------------------------------------------------------
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


def read_jsonl(path: str, skip_bad: bool, report: dict) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every document of a shard; bad lines raise (or are counted in ``report``)."""
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


# -- folders of text --------------------------------------------------------------------------
def stdlib_dir() -> Path:
    """The running Python's standard library (``sysconfig``): real text that every Python install has."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_text_files(inputs: list[str], pattern: str | None = None) -> list[str]:
    """Files named by ``inputs`` (files, directories searched with ``pattern``, or ``stdlib``), sorted, absolute.

    ``pattern`` is a glob relative to each directory (default ``**/*.txt``; ``**/*.py`` for ``stdlib``,
    whose installed packages and test suites are left out).
    """
    found: list[str] = []
    for item in inputs:
        if item == STDLIB:
            root = stdlib_dir()
            found += [
                str(p)
                for p in root.glob(pattern or "**/*.py")
                if p.is_file() and not STDLIB_SKIPPED & set(p.relative_to(root).parts[:-1])
            ]
        elif os.path.isdir(item):
            found += [str(p) for p in Path(item).glob(pattern or "**/*.txt") if p.is_file()]
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or directory (or `stdlib`)")
    if not found:
        raise FileNotFoundError(
            f"--input {' '.join(inputs)}: no file matches --glob {pattern or '**/*.txt'}; pass the glob of your files, "
            "e.g. --glob '**/*.md'"
        )
    return sorted({os.path.abspath(p) for p in found})


def read_text_file(path: str, skip_bad: bool, report: dict) -> Iterator[tuple[int, str]]:
    """The whole file as one document (number 1); an empty file is no document, undecodable bytes are bad input."""
    report.setdefault("bad_lines", [])
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        message = f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        if not skip_bad:
            fix = "; convert or remove the file, narrow --glob, or pass --skip-bad"
            raise CorruptShardError(message + fix) from None
        report["bad_shard"] = message
        return
    if text.strip():
        yield 1, text
