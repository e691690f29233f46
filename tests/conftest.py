"""Shared paths and fixtures."""

import functools
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from looped.cli import resolve_recipe
from looped.model import LoopedConfig, LoopedTransformer

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


GOLDEN = ROOT / "tests" / "golden" / "resolved_recipes"
"""What every recipe row resolves to, one file per row (tests/test_recipes.py keeps them equal to the resolution)."""


def golden(path: Path) -> dict:
    """The recipe row's golden file: its resolution without resolving it (~1 s a row, too slow at collection
    time, where every pytest-xdist worker would pay it again). A row without one yet (tests/test_recipes.py
    names it) is resolved instead, so collection never fails on it."""
    file = GOLDEN / path.relative_to(RECIPES)
    return yaml.safe_load(file.read_text()) if file.is_file() else resolved(path)


TINY = dict(vocab_size=11, max_seq_len=16, d_model=16, n_heads=2, d_ff=32)
"""The smallest model every test starts from; a test states only the fields it is about."""


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    ``--cpus``), which ``os.cpu_count()`` and psutil (what ``-n auto`` asks) do not see."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per usable core, not per core of the host."""
    return usable_cores()


# Keep each test process to the cores CI has, and quiet Lightning's tips. Under pytest-xdist (the default:
# pyproject's addopts) the workers share the cores: threads beyond a worker's share only spin against each other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, usable_cores()) // WORKERS)))
if WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("PYTHONWARNINGS", "ignore")


# The longest tests, longest first (durations measured by CI's --durations). pytest-xdist's worksteal gives each
# worker a contiguous share of the collection and lets an idle worker take the far end of another's queue: a
# long test collected late would run alone at the end while the other worker waits.
LONGEST = (
    "tests/test_quickstart.py::",
    "tests/test_pile_recipes.py::test_pile_1b_4x6_smoke_run_on_cpu",
    "tests/test_plan.py::test_the_1b_recipe_on_64_h100s",
    "tests/test_benchmarks.py::test_gpu_check_dry_run",
    "tests/test_distributed.py::test_fsdp2_training_gradients_and_sharded_resume",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest tests first, then the other slow ones, then the rest (a stable sort: same order on every
    worker, as xdist requires)."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        known = next((i for i, prefix in enumerate(LONGEST) if item.nodeid.startswith(prefix)), len(LONGEST))
        return known, item.get_closest_marker("slow") is None

    items.sort(key=rank)


def console_script(name: str) -> str:
    """The installed console script ``name`` (``looped``, ``lightning``): the program a user runs."""
    found = shutil.which(name, path=str(ROOT / ".venv" / "bin")) or shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name!r} is not installed (pip install -e .)")
    return found


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A fresh working directory: each run writes its own runs/ tree (SaveConfigCallback never overwrites)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def no_leftover_process_group():
    """A test that trains under a distributed strategy in this process (Lightning's ModelParallelStrategy) leaves
    the default process group, its TCP store and MASTER_PORT behind; the next test that makes its own group, or a
    subprocess inheriting MASTER_PORT, would then fail. Each test leaves the process as it found it."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        if name in environ:
            os.environ[name] = environ[name]
        else:
            os.environ.pop(name, None)


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

    module_args = {
        k: fields.pop(k) for k in ("eos_id", "regularizer", "loop_schedule", "optimizer", "exit") if k in fields
    }
    torch.manual_seed(seed)
    return LoopedLM(tiny_config(**fields), warmup_steps=warmup_steps, decay_steps=decay_steps, **module_args)
