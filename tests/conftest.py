"""Shared paths and fixtures."""

import functools
import os
import sys
from pathlib import Path

import pytest
import yaml

from looped.cli import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# Every recipe a run starts from. `_*.yaml` are bases that rows start from (`config: _base.yaml`);
# recipes/sweeps/ holds grids over recipes for `looped sweep`, not recipes.
RECIPE_ROWS = sorted(
    p for p in RECIPES.rglob("*.yaml") if not p.name.startswith("_") and p.relative_to(RECIPES).parts[0] != "sweeps"
)


@functools.cache
def resolved_text(path: Path) -> str:
    """``looped fit --config PATH --print_config``, in this process (~0.3 s), once per test session."""
    return resolve_recipe(str(path))


def resolved(path: Path) -> dict:
    """The recipe as a run reads it: bases applied, every default filled in. Never ``yaml.safe_load`` a
    recipe itself: a row holds only what differs from its base."""
    return yaml.safe_load(resolved_text(path))

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
