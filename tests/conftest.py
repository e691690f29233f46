"""Shared paths and fixtures."""

import os
import sys
from pathlib import Path

import pytest
import torch

from looped.model import LoopedConfig, LoopedTransformer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

TINY = dict(vocab_size=11, max_seq_len=16, d_model=16, n_heads=2, d_ff=32)
"""The smallest model every test starts from; a test states only the fields it is about."""

# Keep each test process to the cores CI has, and quiet Lightning's tips.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A fresh working directory: each run writes its own runs/ tree (SaveConfigCallback never overwrites)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI(args=...) must not also see pytest's own command line."""
    monkeypatch.setattr(sys, "argv", ["looped"])


def tiny_config(**fields) -> LoopedConfig:
    """``LoopedConfig`` of ``TINY`` with ``fields`` changed (``block_layers=2, loops=3``, a mixer, ...)."""
    return LoopedConfig(**{**TINY, **fields})


def tiny_model(seed: int = 0, **fields) -> LoopedTransformer:
    """A seeded ``LoopedTransformer`` of ``tiny_config(**fields)`` in eval mode (no dropout)."""
    torch.manual_seed(seed)
    return LoopedTransformer(tiny_config(**fields)).eval()


def tiny_module(seed: int = 0, warmup_steps: int = 2, decay_steps: int = 10, **fields):
    """A seeded ``LoopedLM`` of ``tiny_config(**fields)`` with a short schedule (``**fields`` may hold LoopedLM's own
    arguments too: ``eos_id``, ``regularizer``, ``loop_schedule``...)."""
    from looped import LoopedLM

    module_args = {k: fields.pop(k) for k in ("eos_id", "regularizer", "loop_schedule", "optimizer") if k in fields}
    torch.manual_seed(seed)
    return LoopedLM(tiny_config(**fields), warmup_steps=warmup_steps, decay_steps=decay_steps, **module_args)
