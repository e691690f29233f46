"""Every Sudoku, maze and ARC recipe (recipes/sudoku/, recipes/maze/, recipes/arc/) trains 2 steps and tests, at toy
size, in its own settings: its precision, model class, recursion, halting objective and callbacks; only the width, the
puzzle size, the data sizes and the supervision steps shrink, through the overrides a user would type."""

from pathlib import Path

import pytest

from conftest import RECIPES
from looped.cli import run
from looped.training.deep_supervision import DeepSupervision

ROWS = sorted(p for family in ("sudoku", "maze", "arc") for p in (RECIPES / family).glob("*.yaml") if p.name[0] != "_")
TINY = [
    *("--model.init_args.config.d_model", "16", "--model.init_args.config.n_heads", "2"),
    *("--model.init_args.config.d_ff", "32", "--model.init_args.config.mixer_options", "{mlp: {multiple_of: 8}}"),
    *("--model.init_args.eval_steps", "3", "--model.init_args.warmup_steps", "1"),
    *("--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"),
    *("--data.batch_size", "4", "--data.eval_batch_size", "8", "--data.val_size", "8", "--data.test_size", "8"),
]
DATA = {
    "sudoku": ["--data.size", "4", "--data.givens", "6", "--data.train_puzzles", "8"],
    "maze": ["--data.size", "7", "--data.min_path", "0", "--data.train_size", "8"],
    # Two tasks with small grids (one training, one evaluation), 2 views: the 900-cell canvas stays.
    "arc": ["--data.augmentations", "1", "--data.test_views", "2", "--data.tasks", "[0d3d703e, 66e6c45b]"],
    "arc2": ["--data.augmentations", "1", "--data.test_views", "2", "--data.tasks", "['00576224', '28a6681f']"],
}


def name(path: Path) -> str:
    return str(path.relative_to(RECIPES))


def test_every_family_has_paper_and_cpu_rows():
    names = {name(p) for p in ROWS}
    assert {"sudoku/trm_mlp.yaml", "sudoku/hrm.yaml", "sudoku/cpu_trm_mlp.yaml", "maze/trm.yaml"} <= names
    assert {"arc/trm.yaml", "arc/trm_arc2.yaml", "arc/hrm.yaml", "arc/cpu_toy.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", ROWS, ids=name)
def test_recipe_trains_two_steps_and_tests(path, run_dir):
    steps = "1" if "no_ds" in path.name else "2"
    data = DATA["arc2" if path.stem.endswith("arc2") else path.parent.name]
    cli = run([str(path), *TINY, "--model.init_args.supervision_steps", steps, *data])
    assert isinstance(cli.model, DeepSupervision) and cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert {"test/exact_match", "test/exact_match_step3", "test/cell_accuracy_step1"} <= set(metrics)
    if path.parent.name == "arc":  # scored as ARC Prize scores, the puzzle embedding sized from the data
        assert 0.0 <= float(metrics["test/arc_score"]) <= 1.0
        assert cli.model.config.puzzle_ids == cli.datamodule.num_puzzle_ids == 1 + 2 * 2
