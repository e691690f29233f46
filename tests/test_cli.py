"""The command line end to end, recipe parsing, and the errors a user sees for bad input."""

import subprocess
import sys

import pytest
import torch

from conftest import RECIPES
from conftest import console_script as _console
from looped.cli import LoopedCLI, lightning_main


@pytest.mark.slow
def test_console_fit_fast_dev_run(run_dir):
    out = subprocess.run(
        [_console("looped"), "fit", "--config", str(RECIPES / "quickstart.yaml"), "--trainer.fast_dev_run", "true"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train/loss" in out.stdout + out.stderr


@pytest.mark.slow
def test_lightning_run_trains_then_tests_with_per_loop_table(run_dir):
    overrides = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.test_size", "64"]
    out = subprocess.run(
        [_console("lightning"), "run", str(RECIPES / "quickstart.yaml"), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    # One evaluation table (looped.tools.eval_table): the metrics as columns, PerLoopAccuracy's loops 1..2L
    # among them with the trained L=4 starred; Lightning's own per-dataloader table is not printed.
    header = next(line for line in out.stdout.splitlines() if "exact match %" in line).split()
    assert header[:6] == ["set", "exact", "match", "%", "token", "acc"]
    assert header[-8:] == ["loop1", "loop2", "loop3", "loop4*", "loop5", "loop6", "loop7", "loop8"]
    assert "Test metric" not in text  # the header of Lightning's table
    # fit wrote a resolved config and a best checkpoint that test loaded
    run = run_dir / "runs" / "quickstart" / "version_0"
    assert (run / "config.yaml").exists() and list((run / "checkpoints").glob("*.ckpt"))


def test_lightning_without_sdk_explains(monkeypatch):
    monkeypatch.setattr("looped.cli.app._lightning_sdk_entry_point", lambda: None)
    with pytest.raises(SystemExit, match="lightning run recipes/NAME.yaml"):
        lightning_main(["login"])


def test_lightning_hands_other_commands_to_sdk(monkeypatch):
    seen = {}

    def fake_sdk():
        seen["argv"] = list(sys.argv)
        return 0

    monkeypatch.setattr("looped.cli.app._lightning_sdk_entry_point", lambda: fake_sdk)
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["studio", "list"])
    assert exit_info.value.code == 0 and seen["argv"] == ["lightning", "studio", "list"]


def _parse_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        LoopedCLI(args=["--config", str(RECIPES / "quickstart.yaml"), *args], run=False)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_unknown_recipe_key_is_named(capsys, run_dir):
    err = _parse_error(capsys, "--model.init_args.config.d_modle", "64")
    assert "d_modle" in err


def test_heads_not_dividing_width_is_named(run_dir):
    with pytest.raises(ValueError, match="model.init_args.config.d_model: 100 is not divisible by n_heads=8"):
        LoopedCLI(
            args=[
                "--config",
                str(RECIPES / "quickstart.yaml"),
                "--model.init_args.config.d_model",
                "100",
                "--model.init_args.config.n_heads",
                "8",
            ],
            run=False,
        )


def test_impossible_hops_are_named(run_dir):
    with pytest.raises(ValueError, match="data.hops=40 is impossible"):
        LoopedCLI(
            args=["--config", str(RECIPES / "quickstart.yaml"), "--data.hops", "40", "--data.length", "12"], run=False
        )


def test_fsdp2_recipes_build_the_transformer_on_the_meta_device(run_dir):
    """Under ModelParallelStrategy no rank builds the whole model: configure_model shards, then materialises.

    (The sharded training that follows is run end to end by tests/test_pile_recipes.py's smoke run.)
    """
    args = ["--config", str(RECIPES / "quickstart.yaml")]
    strategy = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}'
    sharded = LoopedCLI(args=[*args, "--trainer.strategy", strategy], run=False)
    assert all(p.is_meta for p in sharded.model.model.parameters())
    assert not any(m.mean_value.is_meta for m in [sharded.model.val_metrics["loss"]])  # metrics stay real
    whole = LoopedCLI(args=[*args, "--trainer.strategy", "ddp"], run=False)
    assert not any(p.is_meta for p in whole.model.model.parameters())


def test_vocabulary_mismatch_is_named_before_training(run_dir):
    cli = LoopedCLI(args=["--config", str(RECIPES / "quickstart.yaml"), "--trainer.fast_dev_run", "true"], run=False)
    cli.model.config.vocab_size = 3  # as if a user hard-coded a smaller vocabulary
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_non_finite_loss_stops_with_a_fix(run_dir):
    cli = LoopedCLI(args=["--config", str(RECIPES / "quickstart.yaml"), "--trainer.fast_dev_run", "true"], run=False)
    with torch.no_grad():
        cli.model.model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="Lower the learning rate"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_every_subcommand_takes_its_recipe_first_like_run(run_dir):
    """``looped test RECIPE --trainer.logger.init_args.name X`` reads the recipe before the override, as ``looped
    test --config RECIPE`` does (LightningCLI alone refused the path, or, with a logger override, reported an
    abstract Logger)."""
    from looped.cli import main

    main(["test", str(RECIPES / "quickstart.yaml"), "--trainer.logger.init_args.name", "renamed",
          "--data.test_size", "16", "--trainer.limit_test_batches", "1"])  # fmt: skip
    assert (run_dir / "runs" / "renamed" / "version_0" / "config.yaml").exists()
