"""``looped prepare text``: one document per file through ``prepare pile``'s pipeline (same split, resume, refusals)."""

import json

import pytest
from test_prepare import stored_documents

from looped.cli import main as looped_main
from looped.tokenizer import ByteTokenizer, load_tokenizer
from looped.tools.prepare import prepare_dataset, prepare_text
from looped.tools.readers import STDLIB_SKIPPED, CorruptShardError, find_text_files, stdlib_dir
from pile_data import make_text_folder, write_shard


def test_every_file_is_one_document_with_exact_token_counts(tmp_path):
    texts = make_text_folder(tmp_path / "text")
    (tmp_path / "text" / "empty.txt").write_text("  \n")  # no document
    (tmp_path / "text" / "notes.md").write_text("not matched by the default glob")
    manifest = prepare_text(
        [str(tmp_path / "text")],
        str(tmp_path / "data"),
        tokenizer_path="bytes",
        val_fraction=0.2,
        workers=2,
        chunk_bytes="2kb",
    )
    tok = ByteTokenizer()
    train, val = stored_documents(tmp_path / "data" / "train", tok), stored_documents(tmp_path / "data" / "val", tok)
    assert sorted(train + val) == sorted(texts)  # every file once, whole, byte for byte
    assert 0 < len(val) < len(texts) / 2
    for split, stored in (("train", train), ("val", val)):
        entries = manifest["splits"][split]["sources"].values()
        assert sum(e["documents"] for e in entries) == len(stored)
        # Byte-level: a document is its UTF-8 bytes plus EOS.
        assert sum(e["tokens"] for e in entries) == sum(len(t.encode()) + 1 for t in stored)
    assert len(manifest["splits"]["train"]["sources"]) == len(texts) + 1  # the empty file is a source, no document


def test_same_val_split_as_prepare_pile_for_the_same_text(tmp_path):
    texts = make_text_folder(tmp_path / "text")
    prepare_text(
        [str(tmp_path / "text")], str(tmp_path / "as_text"), tokenizer_path="bytes", val_fraction=0.2, workers=1
    )
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "all.jsonl.zst", texts)
    prepare_dataset(
        [str(tmp_path / "shards" / "all.jsonl.zst")], str(tmp_path / "as_pile"), val_fraction=0.2, workers=1
    )
    tok = ByteTokenizer()
    as_text = sorted(stored_documents(tmp_path / "as_text" / "val", tok))
    assert as_text and as_text == sorted(stored_documents(tmp_path / "as_pile" / "val", tok))


def test_undecodable_file_is_named_and_skippable(tmp_path, capsys):
    make_text_folder(tmp_path / "text", n=10)
    bad = tmp_path / "text" / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CorruptShardError, match=rf"{bad}: not UTF-8 text .* pass --skip-bad"):
        prepare_text([str(tmp_path / "text")], str(tmp_path / "out"), tokenizer_path="bytes", workers=1)
    with pytest.raises(SystemExit, match=rf"looped prepare text: {bad}: not UTF-8"):
        looped_main(
            [
                "prepare",
                "text",
                "--input",
                str(tmp_path / "text"),
                "--output",
                str(tmp_path / "cli"),
                "--tokenizer",
                "bytes",
                "--workers",
                "1",
            ]
        )
    manifest = prepare_text(
        [str(tmp_path / "text")], str(tmp_path / "skip"), tokenizer_path="bytes", workers=1, skip_bad=True
    )
    assert f"{bad}: not UTF-8" in capsys.readouterr().out
    assert sum(e["documents"] for s in manifest["splits"].values() for e in s["sources"].values()) == 10


def test_rerun_resumes_new_files_only_with_its_own_trained_tokenizer(tmp_path, capsys):
    texts = make_text_folder(tmp_path / "text", n=40)
    out = tmp_path / "data"
    prepare_text([str(tmp_path / "text")], str(out), vocab_size=300, val_fraction=0.2, workers=1)
    assert "trained a BPE tokenizer of 300 tokens" in capsys.readouterr().out
    bad = tmp_path / "other" / "latin1.txt"
    bad.parent.mkdir()
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorruptShardError):  # a failed run leaves no trained tokenizer file behind
        prepare_text([str(bad)], str(tmp_path / "failed"), vocab_size=300, workers=1)
    assert not (tmp_path / "failed" / "tokenizer.trained.json").exists()
    capsys.readouterr()
    bpe = load_tokenizer(str(out))
    assert bpe.vocab_size == 300 and not (out / "tokenizer.trained.json").exists()
    index = (out / "train" / "index.json").read_text()
    prepare_text([str(tmp_path / "text")], str(out), vocab_size=300, val_fraction=0.2, workers=1)  # nothing new
    again = capsys.readouterr().out
    assert "trained" not in again and "all 40 sources already prepared" in again
    assert (out / "train" / "index.json").read_text() == index
    extra = tmp_path / "text" / "new.txt"
    extra.write_text("a new file, added later\n")
    manifest = prepare_text([str(tmp_path / "text")], str(out), vocab_size=300, val_fraction=0.2, workers=1)
    assert load_tokenizer(str(out)).sha256 == bpe.sha256  # resumed with the tokenizer it started with
    stored = stored_documents(out / "train", bpe) + stored_documents(out / "val", bpe)
    assert sorted(stored) == sorted([*texts, extra.read_text()])
    assert str(extra) in {**manifest["splits"]["train"]["sources"], **manifest["splits"]["val"]["sources"]}
    recorded = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert recorded["kind"] == "file" and recorded["vocab_size"] == 300


def test_stdlib_is_found_without_a_download():
    files = find_text_files(["stdlib"])
    root = stdlib_dir()
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    assert str(root / "json" / "decoder.py") in files  # a package module of the running Python
    assert not any(STDLIB_SKIPPED & set(f[len(str(root)) :].split("/")[:-1]) for f in files)


def test_missing_input_and_empty_glob_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no such file or directory"):
        looped_main(["prepare", "text", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    make_text_folder(tmp_path / "text", n=3)
    with pytest.raises(SystemExit, match=r"no file matches --glob \*\*/\*\.rst"):
        looped_main(
            [
                "prepare",
                "text",
                "--input",
                str(tmp_path / "text"),
                "--glob",
                "**/*.rst",
                "--output",
                str(tmp_path / "o"),
            ]
        )
