"""The tokenizer a run was trained with, as a ``transformers`` tokenizer (``AutoTokenizer.from_pretrained``).

Each keeps the ids the model was trained on, token for token:

* ``vocab_tokenizer``: a synthetic task's vocabulary (``SyntheticTask.vocab``, id = index) as a
  word-level tokenizer over space-separated tokens: ``"a b c d ="``. Spaces, not the tasks'
  concatenated ``decode`` text, because tokens such as ``10`` or ``01234`` would make plain
  concatenation ambiguous; ``decode`` gives the tokens back space-separated.
* ``byte_tokenizer``: ``looped.tokenizer.ByteTokenizer`` (UTF-8 bytes 0..255, end of text 256) as
  a byte-level tokenizer with no merges.
* ``file_tokenizer``: a prepared data set's ``tokenizer.json`` as it is, its end-of-text token
  found as ``looped.tokenizer`` finds it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from looped.tokenizer import ByteTokenizer, FileTokenizer, load_tokenizer

SPECIAL = ("<pad>", "<eos>", "<|endoftext|>", "<ans>", "<sep>", "<unk>")


def hf_tokenizer(tokenizer: Tokenizer, max_length: int, eos_token: str | None = None) -> PreTrainedTokenizerFast:
    """A ``transformers`` tokenizer around ``tokenizer`` (``<pad>`` pads when the vocabulary has it)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        eos_token=eos_token,
        pad_token="<pad>" if "<pad>" in vocab else None,
    )


def vocab_tokenizer(vocab: list[str], max_length: int, eos_id: int | None = None) -> PreTrainedTokenizerFast:
    """A synthetic task's tokens (id = index in ``vocab``), written and read space-separated."""
    bad = [token for token in vocab if not token or any(c.isspace() for c in token)]
    if bad or len(set(vocab)) != len(vocab):
        raise ValueError(f"a word-level tokenizer needs distinct tokens without spaces; this vocabulary has {bad}")
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(
        [t for t in SPECIAL if t in vocab]
    )  # never split, skipped by decode(skip_special_tokens)
    return hf_tokenizer(tokenizer, max_length, vocab[eos_id] if eos_id is not None else None)


def byte_alphabet() -> list[str]:
    """The printable character standing for each byte 0..255 in byte-level tokenizers (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shift = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shift)) for b in range(256)]


def byte_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """``ByteTokenizer``'s ids: byte ``b`` is id ``b``, ``<|endoftext|>`` is 256."""
    vocab = {char: byte for byte, char in enumerate(byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    assert tokenizer.token_to_id("<|endoftext|>") == ByteTokenizer.eos_id
    return hf_tokenizer(tokenizer, max_length, "<|endoftext|>")


def file_tokenizer(path: str | Path, max_length: int) -> tuple[PreTrainedTokenizerFast, int]:
    """A ``tokenizer.json`` (or a prepared data directory) and its vocabulary size (added tokens included)."""
    ours = load_tokenizer(str(path))
    if isinstance(ours, ByteTokenizer):  # a directory prepared with bytes
        return byte_tokenizer(max_length), ours.vocab_size
    assert isinstance(ours, FileTokenizer)
    tokenizer = Tokenizer.from_str(ours.text)
    return hf_tokenizer(tokenizer, max_length, tokenizer.id_to_token(ours.eos_id)), ours.vocab_size
