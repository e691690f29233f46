"""A run's ``config.yaml`` saved before ``looped/`` had folders still runs after the move.

``tests/golden/saved_runs/*_a7f40f5.yaml`` are the ``config.yaml`` files two quickstart runs wrote on commit
a7f40f5 (before the folders): they name ``looped.optim.Adafactor``, ``looped.module.batch_size``,
``looped.halting``'s exit objective and ``looped.regularizer``'s regulariser by their old paths.
"""

import subprocess

import pytest

from conftest import ROOT
from conftest import console_script as _console

SAVED = sorted((ROOT / "tests" / "golden" / "saved_runs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("config", SAVED, ids=[p.stem for p in SAVED])
def test_a_config_saved_before_the_move_still_runs_with_looped_fit(config, run_dir):
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    out = subprocess.run(
        [_console("looped"), "fit", "--config", str(config), *steps], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in out.stdout + out.stderr
    written = next(run_dir.glob("runs/*/version_0/config.yaml")).read_text()
    for old_path in ("looped.module.batch_size", "looped.LoopedLM"):  # resolved, and saved again as named
        assert old_path in written


def test_the_saved_configs_name_the_old_paths():
    """What the test above relies on: the files really use the paths from before the move."""
    text = "\n".join(p.read_text() for p in SAVED)
    for old_path in ("looped.optim.Adafactor", "looped.module.batch_size", "regularizer:", "exit:"):
        assert old_path in text
