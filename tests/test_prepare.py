"""``looped prepare``: every document once, deterministic split, resume, refusal, corrupt input named."""

import json

import pytest
import zstandard
from litdata import StreamingDataset
from litdata.streaming.item_loader import TokensLoader

from looped.cli import main as looped_main
from looped.tokenizer import ByteTokenizer
from looped.tools.prepare import CorruptShardError, find_sources, prepare_dataset, read_jsonl, train_tokenizer
from pile_data import documents, make_shards, write_shard


def stored_documents(split_dir, tokenizer) -> list[str]:
    """Independent read-back: every stored token, in order, cut at EOS and decoded."""
    data = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1))
    tokens = [int(data[i][0]) for i in range(len(data))]
    docs, current = [], []
    for t in tokens:
        if t == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    assert current == []  # every document ends with EOS
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pile")
    texts = make_shards(root / "shards")
    manifest = prepare_dataset(
        find_sources(str(root / "shards")), str(root / "data"), val_fraction=0.2, workers=2, chunk_bytes="2kb"
    )
    return root, texts, manifest


def test_every_document_lands_once_with_eos_in_a_deterministic_split(prepared):
    root, texts, manifest = prepared
    tok = ByteTokenizer()
    train, val = stored_documents(root / "data" / "train", tok), stored_documents(root / "data" / "val", tok)
    assert sorted(train + val) == sorted(texts)  # nothing lost, nothing twice, text round-trips
    assert 0.05 < len(val) / len(texts) < 0.4  # ~20% held out
    assert manifest["tokenizer"] == {"sha256": tok.sha256, "vocab_size": 257, "eos_id": 256, "kind": "bytes"}
    counted = sum(e["documents"] for s in ("train", "val") for e in manifest["splits"][s]["sources"].values())
    assert counted == len(texts)
    # The split is a function of the text alone: one worker, other chunk sizes, same val set.
    again = prepare_dataset(find_sources(str(root / "shards")), str(root / "again"), val_fraction=0.2, workers=1)
    assert sorted(stored_documents(root / "again" / "val", tok)) == sorted(val)
    assert again["splits"]["val"]["sources"].keys() == manifest["splits"]["val"]["sources"].keys()


def test_rerun_resumes_new_shards_only_and_refuses_another_tokenizer(prepared, tmp_path):
    root, texts, _ = prepared
    out = tmp_path / "data"
    prepare_dataset(find_sources(str(root / "shards")), str(out), val_fraction=0.2, workers=1)
    before = (out / "train" / "index.json").read_text()
    prepare_dataset(find_sources(str(root / "shards")), str(out), val_fraction=0.2, workers=1)  # nothing to do
    assert (out / "train" / "index.json").read_text() == before
    (root / "extra").mkdir()
    extra = write_shard(root / "extra" / "new.jsonl.zst", documents(99, 30))
    manifest = prepare_dataset([*find_sources(str(root / "shards")), str(extra)], str(out), val_fraction=0.2, workers=1)
    assert str(extra) in manifest["splits"]["train"]["sources"]
    tok = ByteTokenizer()
    stored = stored_documents(out / "train", tok) + stored_documents(out / "val", tok)
    assert sorted(stored) == sorted(texts + documents(99, 30))  # appended, nothing redone twice
    tokenizer_file = tmp_path / "tok.json"
    train_tokenizer(find_sources(str(root / "shards")), 300, str(tokenizer_file))
    with pytest.raises(ValueError, match="another tokenizer"):
        prepare_dataset(find_sources(str(root / "shards")), str(out), str(tokenizer_file), val_fraction=0.2)
    with pytest.raises(ValueError, match="val-fraction"):
        prepare_dataset(find_sources(str(root / "shards")), str(out), val_fraction=0.3)


def test_bad_json_line_is_named_with_file_and_line(tmp_path):
    shard = tmp_path / "in" / "bad.jsonl.zst"
    shard.parent.mkdir()
    lines = [json.dumps({"text": "fine"}), json.dumps({"text": "also fine"}), "{not json", json.dumps({"meta": {}})]
    shard.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    # Through litdata's worker processes: the error still names the file and the line.
    with pytest.raises(CorruptShardError, match=rf"{shard}:3: not a JSON object"):
        prepare_dataset([str(shard)], str(tmp_path / "out"), workers=1)
    report = {}
    assert [t for _, t in read_jsonl(str(shard), True, report)] == ["fine", "also fine"]
    assert [m.split(": ")[0] for m in report["bad_lines"]] == [f"{shard}:3", f"{shard}:4"]


def test_truncated_shard_is_named_and_skippable(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    good = write_shard(tmp_path / "in" / "good.jsonl.zst", documents(1, 20))
    full = zstandard.ZstdCompressor().compress(("\n".join(json.dumps({"text": t}) for t in documents(2, 400))).encode())
    cut = tmp_path / "in" / "cut.jsonl.zst"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(CorruptShardError, match=rf"{cut}: unreadable after line \d+"):
        list(read_jsonl(str(cut), False, {}))
    with pytest.raises(SystemExit, match=rf"looped prepare pile: {cut}: unreadable"):
        looped_main(
            ["prepare", "pile", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1"]
        )
    manifest = prepare_dataset([str(good), str(cut)], str(tmp_path / "skip"), skip_bad=True, workers=1)
    out = capsys.readouterr().out
    assert f"{cut}: unreadable" in out  # reported at the end, once although both splits' passes met it
    assert "skipped 1 bad lines or shards" in out and out.count(f"{cut}: unreadable") == 1
    assert len(manifest["splits"]["train"]["sources"]) == 2


def test_byte_tokenizer_and_trained_bpe_round_trip_text(tmp_path):
    text = "looped transformers — ünïcode, 数字 and code: a = 1 ; print ( a )\n"
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(text)) == text and max(byte.encode(text)) < 256
    make_shards(tmp_path / "shards")
    out = tmp_path / "tokenizer.json"
    looped_main(
        ["prepare", "tokenizer", "--input", str(tmp_path / "shards"), "--vocab-size", "320", "--output", str(out)]
    )
    from looped.tokenizer import load_tokenizer

    bpe = load_tokenizer(str(out))
    assert bpe.vocab_size == 320 and bpe.decode(bpe.encode(text)) == text
    sample = documents(0, 1)[0]
    assert len(bpe.encode(sample)) < len(byte.encode(sample))  # it learned merges from the shards
    assert bpe.eos_id not in bpe.encode(text)  # EOS is a special token, never produced by text


def test_missing_input_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no .jsonl or .jsonl.zst shards"):
        looped_main(["prepare", "pile", "--input", str(tmp_path / "nothing*"), "--output", str(tmp_path / "o")])


def test_a_prepared_directory_names_its_own_tokenizer(prepared, tmp_path):
    """``load_tokenizer(DIR)`` (what the lm-eval adapter is given) is the tokenizer DIR was prepared with."""
    from looped.tokenizer import load_tokenizer

    root, _, _ = prepared
    assert isinstance(load_tokenizer(str(root / "data")), ByteTokenizer)  # prepared without a tokenizer file
    out = tmp_path / "tokenizer.json"
    looped_main(["prepare", "tokenizer", "--input", str(root / "shards"), "--vocab-size", "300", "--output", str(out)])
    prepare_dataset(find_sources(str(root / "shards")), str(tmp_path / "bpe"), str(out), val_fraction=0.2, workers=1)
    assert load_tokenizer(str(tmp_path / "bpe")).sha256 == load_tokenizer(str(out)).sha256
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "shards_missing"))
