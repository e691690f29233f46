"""``PileDataModule``: streams the token chunks written by ``looped prepare pile``, resumable to the batch.

Training blocks of ``seq_len + 1`` tokens come from ``DIR/train`` through
litdata's ``StreamingDataset`` + ``TokensLoader`` (shuffled, sharded over ranks
and workers); a batch is ``{input_ids: block[:-1], labels: block[1:]}``.
Validation is a list of named sets (``eval_names``), in order:

* ``pile`` — held-out documents from ``DIR/val`` (perplexity = exp(val/loss_pile));
* ``primitives_{math,code}_d{0,1}`` — the paper's k-shot reasoning primitives
  (Table 3), rendered as text by ``ReasoningPrimitives`` and tokenized with the
  dataset's own tokenizer; only the answer's tokens are labelled.

Exact resume: the train loader's position lives in this module's
``state_dict``, which Lightning stores in every checkpoint and hands back before
training restarts. Lightning alone does not restore a ``StreamingDataLoader``
on ``fit(ckpt_path=...)`` (litData #775), and a loader built before the
restore (e.g. by reading ``trainer.estimated_stepping_batches``, Lightning
#20550) would miss it; both paths are covered here.
"""

from __future__ import annotations

import json
import os
import re
from itertools import islice
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from looped.contract import IGNORE
from looped.datamodules.base import _VAL, EvalSet
from looped.datamodules.primitives import ReasoningPrimitives
from looped.errors import InputError
from looped.tokenizer import MANIFEST, prepared_tokenizer, read_text

PRIMITIVE_SETS = [(flavour, depth) for flavour in ("math", "code") for depth in (0, 1)]


class PileDataModule(L.LightningDataModule):
    """Language modelling on a dataset prepared by ``looped prepare pile``.

    Args:
        path: the prepared directory (local, or an object-store URL litdata can stream from).
        seq_len: tokens per training sequence (the paper: 1280).
        batch_size: sequences per step and device (global batch = batch_size × devices × nodes ×
            accumulate_grad_batches; the paper: 512).
        eval_batch_size: sequences per validation batch (default: ``batch_size``).
        num_workers: loader processes per device.
        seed: shuffling seed (litdata reshuffles chunks and items every epoch from it).
        shuffle: shuffle the training stream.
        val_batches: validate on the first N batches of ``val`` (default: all of it).
        primitives_shots: solved examples before each reasoning-primitive query (the paper: 5).
        primitives_size: prompts per reasoning-primitive set; 0 leaves the sets out.
    """

    def __init__(
        self,
        path: str,
        seq_len: int = 1280,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        seed: int = 0,
        shuffle: bool = True,
        val_batches: int | None = None,
        primitives_shots: int = 5,
        primitives_size: int = 256,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("primitives_shots", primitives_shots, 0),
            ("primitives_size", primitives_size, 0),
        ):
            if value < low:
                raise InputError(f"data.{name} must be >= {low}, got {value}")
        if val_batches is not None and val_batches < 1:
            raise InputError(f"data.val_batches must be >= 1 or null, got {val_batches}")
        self.path = path.rstrip("/")
        self._seq_len = seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle, self.val_batches = num_workers, seed, shuffle, val_batches
        self.primitives_shots, self.primitives_size = primitives_shots, primitives_size
        self.manifest = self._read_manifest()
        self._train_loader = None
        self._pending_state: dict | None = None
        self._primitives: dict[str, EvalSet] | None = None
        self._tokenizer = None  # read from data.path when first needed

    # -- what the model links to --------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def tokenizer_sha256(self) -> str | None:
        """The prepared tokenizer's hash; checkpoints record it (``looped.training.checkpoint.check_same_data``)."""
        return self.manifest["tokenizer"].get("sha256")

    @property
    def eval_names(self) -> list[str]:
        """Names of the validation sets, in the order ``val_dataloader`` returns them."""
        names = ["pile"]
        if self.primitives_size:
            names += [f"primitives_{flavour}_d{depth}" for flavour, depth in PRIMITIVE_SETS]
        return names

    def _read_manifest(self) -> dict:
        if not self.path:
            raise InputError(
                "data.path is empty; give the directory `looped prepare pile --input SHARDS --output DIR` wrote"
            )
        url = f"{self.path}/{MANIFEST}"
        fix = f"prepare it with `looped prepare pile --input SHARDS --output {self.path}`"
        local = "://" not in self.path
        try:
            if local and not os.path.isdir(self.path):
                raise InputError(f"data.path: {self.path} does not exist; {fix}")
            manifest = json.loads(read_text(url))
            manifest["tokenizer"]["vocab_size"], manifest["splits"]["train"]["sources"]
        except FileNotFoundError:
            raise InputError(
                f"data.path: {self.path} has no {MANIFEST}, so `looped prepare pile` did not write it; {fix}"
            ) from None
        except InputError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"data.path: {url} is not a prepare manifest ({error!r}); {fix} again") from None
        except ImportError as error:
            raise ImportError(f"data.path: reading {url} needs an fsspec backend: {error}") from None
        if not manifest["splits"]["train"]["sources"]:
            raise InputError(f"data.path: {self.path} has no prepared training data yet; {fix}")
        return manifest

    def tokenizer(self):
        """The tokenizer the data was prepared with (``ByteTokenizer`` or the copied ``tokenizer.json``)."""
        if self._tokenizer is None:
            self._tokenizer = prepared_tokenizer(self.path, self.manifest)
        return self._tokenizer

    def decode(self, ids) -> str:
        """Readable text of a row of token ids (``-100`` labels dropped)."""
        return self.tokenizer().decode([i for i in ids if 0 <= i < self.vocab_size])

    # -- streams ----------------------------------------------------------------------------------
    def _dataset(self, split: str, shuffle: bool):
        from litdata import StreamingDataset
        from litdata.streaming.item_loader import TokensLoader

        if "://" not in self.path:  # a chunk lost or cut short since `looped prepare`: say which, before any step
            damaged = damaged_chunks(f"{self.path}/{split}")
            if damaged:
                raise InputError(chunk_message(damaged[0], self.path, more=len(damaged) - 1))
        try:
            return StreamingDataset(
                f"{self.path}/{split}",
                item_loader=TokensLoader(block_size=self.seq_len + 1),
                shuffle=shuffle,
                drop_last=True,
                seed=self.seed,
            )
        except (FileNotFoundError, ValueError) as error:
            raise InputError(
                f"data.path: cannot open the {split} chunks in {self.path}/{split} ({error}); prepare it again with "
                f"`looped prepare pile --input SHARDS --output {self.path}` (it resumes what is done)"
            ) from None

    def train_dataloader(self):
        from litdata import StreamingDataLoader

        loader = StreamingDataLoader(
            self._dataset("train", self.shuffle),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=shifted_pairs,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
        )
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> list:
        from litdata import StreamingDataLoader

        pile = StreamingDataLoader(
            self._dataset("val", False),
            batch_size=self.eval_batch_size,
            num_workers=min(self.num_workers, 1),
            collate_fn=shifted_pairs,
        )
        loaders: list = [pile if self.val_batches is None else FirstBatches(pile, self.val_batches)]
        for dataset in self.primitive_sets().values():
            loaders.append(DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False))
        return loaders

    def test_dataloader(self) -> list:
        """The held-out sets again (``looped run`` tests the final weights on them; the paper reports validation)."""
        return self.val_dataloader()

    # -- reasoning primitives -------------------------------------------------------------------------
    def primitive_sets(self) -> dict[str, EvalSet]:
        """``{name: EvalSet}`` of k-shot prompts tokenized with the dataset's tokenizer, built once."""
        if self._primitives is None:
            tokenizer, self._primitives = self.tokenizer(), {}
            for (flavour, depth), name in zip(PRIMITIVE_SETS, self.eval_names[1:]):
                task = ReasoningPrimitives(
                    depth=depth,
                    flavour=flavour,
                    shots=self.primitives_shots,
                    val_size=self.primitives_size,
                    test_size=self.primitives_size,
                    seed=self.seed,
                )
                ids, labels = task.eval_set(_VAL)
                prompts = [(task.decode(row), task.vocab[label[-1]]) for row, label in zip(ids, labels)]
                self._primitives[name] = EvalSet(*encode_prompts(prompts, tokenizer, self.seq_len, self.eos_id))
        return self._primitives

    # -- exact resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:  # built before the restore (Lightning #20550)
            self._train_loader.load_state_dict(state)
        else:
            self._pending_state = state


def damaged_chunks(folder: str) -> list[str]:
    """The chunks litdata's ``index.json`` in ``folder`` lists that are missing or shorter than it says, as
    ``"PATH is missing"`` / ``"PATH is truncated (N of M bytes)"``; empty when every chunk is whole."""
    index_path = os.path.join(folder, "index.json")
    if not os.path.isfile(index_path):
        return []  # litdata names a folder without its index itself
    damaged = []
    for chunk in json.loads(read_text(index_path)).get("chunks", []):
        path = os.path.join(folder, chunk["filename"])
        if not os.path.exists(path):
            damaged.append(f"{path} is missing")
        elif os.path.getsize(path) < chunk.get("chunk_bytes", 0):
            damaged.append(f"{path} is truncated ({os.path.getsize(path)} of {chunk['chunk_bytes']} bytes)")
    return damaged


def chunk_message(damaged: str, data_path: str, more: int = 0) -> str:
    """One line for a damaged chunk: which file, and the command that prepares its split again."""
    also = f" (and {more} more)" if more else ""
    return (
        f"data.path: the prepared chunk {damaged}{also}; prepare the data again with the command that wrote it, "
        f"`looped prepare pile --input SHARDS --output {data_path}` (or `looped prepare text ...`): it rewrites a "
        "damaged split. A resumed run continues from its checkpoint's data position"
    )


def chunk_error(error: BaseException) -> str | None:
    """The line for litdata's failure to read a chunk mid-training (a worker's error names it), else None."""
    found = re.search(r"waiting for chunk (\S+?\.bin)", str(error))
    if found is None:
        return None
    path = found.group(1)
    folder = os.path.dirname(path)
    damaged = [d for d in damaged_chunks(folder) if d.startswith(path + " ")]
    return chunk_message(damaged[0] if damaged else f"{path} could not be read", os.path.dirname(folder))


def shifted_pairs(blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Blocks of ``seq_len + 1`` tokens → next-token pairs (int64, as embeddings and the loss need)."""
    tokens = torch.stack(blocks).long()
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def encode_prompts(
    prompts: list[tuple[str, str]], tokenizer, seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt, answer)`` pairs → left-padded ``input_ids``/``labels`` ``[n t]``, labels on the answer only.

    Prompt and `` answer`` are encoded separately (a BPE merge across the boundary would
    hide where the answer starts); a space that encodes alone joins the prompt. Prompts longer than ``seq_len`` lose
    their earliest
    tokens (earlier shots), as evaluation harnesses truncate long contexts.
    """
    rows, space = [], tokenizer.encode(" ")
    for prompt, answer in prompts:
        context, target = tokenizer.encode(prompt), tokenizer.encode(" " + answer)
        if target[: len(space)] == space:  # the separator is its own token (bytes): context, not answer
            context, target = context + space, target[len(space) :]
        tokens = context + target
        labels = [IGNORE] * (len(context) - 1) + target  # label at t = token t+1
        rows.append((tokens[:-1][-seq_len:], labels[-seq_len:]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, width - len(ids) :] = ids
        labels[i, width - len(lab) :] = lab
    return input_ids, labels


class FirstBatches:
    """The first ``n`` batches of a loader (litdata loaders take no sampler to shorten them)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):
        return islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))
