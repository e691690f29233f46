"""Shared paths and fixtures."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

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
