"""A user's mistake ends ``looped``/``lightning`` with one last line, ``looped: error: ...``, exit status 2.

Each case of the issue runs the real console script in a subprocess and checks the exit status,
the last line on stderr (which names the key as the user types it) and that no traceback is
shown. The pieces (jsonargparse's chains, YAML locations, checkpoints, help) are also checked in
process, where they are cheap.
"""

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, console_script
from looped.cli import LoopedCLI, lightning_main, main
from looped.errors import InputError, find_input_error
from looped.tools.prepare import find_sources, prepare_dataset, train_tokenizer
from looped.training.checkpoint import SHARDED_INDEX, SHARDED_META
from pile_data import prepared_pile

QUICKSTART = str(RECIPES / "quickstart.yaml")
SUDOKU = str(RECIPES / "sudoku" / "cpu_trm_mlp.yaml")
PILE = str(RECIPES / "pile" / "4x2.yaml")
# A Pile row at a size the CPU builds in a moment: one process, no FSDP, a small model, no primitives sets.
PILE_SMALL = [
    *("--trainer.strategy", "auto", "--trainer.devices", "1", "--trainer.num_nodes", "1"),
    *("--trainer.precision", "32-true", "--model.init_args.config.d_model", "32"),
    *("--model.init_args.config.n_heads", "2", "--model.init_args.config.d_ff", "64", "--data.seq_len", "32"),
    *("--data.batch_size", "2", "--data.num_workers", "0", "--data.val_batches", "1", "--data.primitives_size", "0"),
]


@contextlib.contextmanager
def _argv_and_cwd(cwd: Path):
    argv, here = sys.argv, os.getcwd()
    sys.argv = ["looped"]
    os.chdir(cwd)
    try:
        yield
    finally:
        sys.argv = argv
        os.chdir(here)


def _fast_dev_run_checkpoint(args: list[str], path: Path) -> Path:
    """One training step of a recipe, in this process, saved as a checkpoint at ``path``."""
    cli = LoopedCLI(args=[*args, "--trainer.fast_dev_run", "true"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Checkpoints good and bad, and two Pile directories prepared with different tokenizers."""
    root = tmp_path_factory.mktemp("cli_errors")
    with _argv_and_cwd(root):
        good = _fast_dev_run_checkpoint(["--config", QUICKSTART, "--data.val_size", "64"], root / "quickstart.ckpt")
        bytes_data = prepared_pile(root / "bytes", shards=2, per_shard=40, val_fraction=0.2, workers=1)
        sources = find_sources(str(root / "bytes" / "shards"))
        train_tokenizer(sources, 300, str(root / "bpe.json"))
        prepare_dataset(
            sources, str(root / "bpe"), str(root / "bpe.json"), val_fraction=0.2, workers=1, chunk_bytes="4kb"
        )
        pile = _fast_dev_run_checkpoint(
            ["--config", PILE, *PILE_SMALL, "--data.path", str(bytes_data)], root / "pile.ckpt"
        )
    # The checkpoint records the tokenizer its data was prepared with (LoopedLM.on_save_checkpoint).
    manifest = (bytes_data / "manifest.json").read_text()
    assert torch.load(pile, weights_only=True)["data"]["tokenizer_sha256"] in manifest
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "notes.ckpt").write_text("not a checkpoint\n")
    (root / "empty").mkdir()
    (root / "unprepared").mkdir()
    (root / "unprepared" / "shard.jsonl").write_text('{"text": "raw, not prepared"}\n')
    (root / "bad.yaml").write_text(f"config: {QUICKSTART}\nmodel:\n  init_args:\n    config: {{d_model: 64\n  x: [\n")
    return {
        "root": str(root),
        "ckpt": str(good),
        "pile_ckpt": str(pile),
        "bytes": str(bytes_data),
        "bpe": str(root / "bpe"),
    }


def run_console(script: str, args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOOPED_DEBUG", None)
    return subprocess.run(
        [console_script(script), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def last_error_line(out: subprocess.CompletedProcess) -> str:
    """The one line a user reads, after checking the exit status and that no traceback was printed."""
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("looped: error: "), out.stderr[-3000:]
    return last


D = "--model.init_args.config."
# (id, script, arguments with {placeholders} for the fixture's files ({{ for a brace), the last line's parts)
CASES = [
    ("d_model", "looped", ["fit", "--config", QUICKSTART, D + "d_model", "100", D + "n_heads", "8"],
     ["model.init_args.config.d_model: 100 is not divisible by n_heads=8", "e.g. 96"]),
    ("loops", "looped", ["fit", "--config", QUICKSTART, D + "loops", "0"],
     ["model.init_args.config.loops: must be >= 1, got 0"]),
    ("block_layers", "looped", ["fit", "--config", QUICKSTART, D + "block_layers", "0"],
     ["model.init_args.config.block_layers: must be >= 1, got 0"]),
    ("unknown_mixer", "looped", ["fit", "--config", QUICKSTART, D + "attention", "flash"],
     ["model.init_args.config.attention: unknown mixer 'flash'", "'softmax'"]),
    ("bad_mixer_option", "looped",
     ["fit", "--config", QUICKSTART, D + "attention", "linear",
      D + "mixer_options", '{{"linear": {{"chunk_size": 0}}}}'],
     ["model.init_args.config.mixer_options.linear.chunk_size: must be >= 1, got 0"]),
    ("deep_supervision_q_head", "looped", ["fit", "--config", SUDOKU, D + "q_head", "false"],
     ["model.init_args.halting: trm trains a halting Q-head", "model.init_args.config.q_head: true"]),
    ("mlp_mixer_causal", "looped", ["fit", "--config", SUDOKU, D + "causal", "true"],
     ["model.init_args.config.causal: must be false with attention: mlp"]),
    ("hops", "lightning", ["run", QUICKSTART, "--data.hops", "40"],
     ["data.hops=40 is impossible for data.length=32", "data.length > data.hops"]),
    ("unknown_key", "looped", ["fit", "--config", QUICKSTART, D + "d_modle", "64"],
     ["model.init_args: unrecognized arguments: --config.d_modle=64", "--help"]),
    ("missing_recipe", "looped", ["run", "{root}/nope.yaml"],
     ["recipe {root}/nope.yaml does not exist", "looped run --help"]),
    ("malformed_yaml", "looped", ["fit", "--config", "{root}/bad.yaml"],
     ["{root}/bad.yaml:5:4: malformed YAML"]),
    ("data_path_missing", "looped", ["fit", "--config", PILE, "--data.path", "{root}/nowhere"],
     ["data.path: {root}/nowhere does not exist", "looped prepare pile --input SHARDS --output {root}/nowhere"]),
    ("data_path_empty", "looped", ["fit", "--config", PILE, "--data.path", ""],
     ["data.path is empty", "looped prepare pile"]),
    ("data_path_unprepared", "looped", ["fit", "--config", PILE, "--data.path", "{root}/unprepared"],
     ["data.path: {root}/unprepared has no manifest.json, so `looped prepare pile` did not write it"]),
    ("tokenizer_differs", "looped",
     ["fit", "--config", PILE, *PILE_SMALL, "--data.path", "{bpe}", "--ckpt_path", "{pile_ckpt}"],
     ["data.path {bpe} was prepared with another tokenizer", "--ckpt_path was trained with"]),
    ("ckpt_missing", "looped", ["fit", "--config", QUICKSTART, "--ckpt_path", "{root}/gone.ckpt"],
     ["--ckpt_path {root}/gone.ckpt does not exist"]),
    ("ckpt_not_a_checkpoint", "looped", ["test", "--config", QUICKSTART, "--ckpt_path", "{root}/notes.ckpt"],
     ["--ckpt_path {root}/notes.ckpt is not a checkpoint"]),
    ("ckpt_truncated", "looped", ["fit", "--config", QUICKSTART, "--ckpt_path", "{root}/truncated.ckpt"],
     ["--ckpt_path {root}/truncated.ckpt is truncated or corrupt"]),
    ("ckpt_directory", "looped", ["fit", "--config", QUICKSTART, "--ckpt_path", "{root}/empty"],
     ["--ckpt_path {root}/empty is a directory but not a sharded checkpoint"]),
    ("model_differs", "looped", ["fit", "--config", QUICKSTART, D + "d_model", "64", "--ckpt_path", "{ckpt}"],
     ["--ckpt_path {ckpt} holds another model than the recipe", "model.init_args.config.d_model: 128 → 64"]),
    ("non_finite_loss", "looped",
     ["fit", "--config", QUICKSTART, "--model.init_args.optimizer.init_args.lr", "1e30", "--trainer.max_steps", "4",
      "--trainer.val_check_interval", "4", "--data.val_size", "64", "--trainer.enable_progress_bar", "false"],
     ["the training loss is nan at step 1", "model.init_args.optimizer.init_args.lr"]),
    ("devices", "looped", ["fit", "--config", QUICKSTART, "--trainer.devices", "100000"],
     ["trainer.devices=100000, but this machine has"]),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_ends_with_one_line(files, script, args, expected):
    out = run_console(script, [a.format(**files) for a in args], cwd=files["root"])
    last = last_error_line(out)
    for fragment in expected:
        assert fragment.format(**files) in last, last


@pytest.mark.slow
def test_debug_shows_the_traceback_above_the_same_line(files):
    out = run_console("looped", ["--debug", *CASES[0][2]], cwd=files["root"])
    assert out.returncode == 2 and "Traceback" in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("looped: error: model.init_args.config.d_model: 100")


@pytest.mark.slow
def test_lightning_run_recipe_help_lists_the_recipe_options(files):
    out = subprocess.run(
        [console_script("lightning"), "run", QUICKSTART, "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--trainer.max_steps" in out.stdout and "--model.config.loops" in out.stdout and "--data.hops" in out.stdout


# -- in process: the same machinery, without the cost of starting Python ---------------------------------------
def _main(capsys, entry, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a console script's ``main(argv)`` run in this process."""
    try:
        entry(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _last_line(capsys, argv: list[str], entry=main) -> str:
    code, _, err = _main(capsys, entry, argv)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_jsonargparse_errors_name_the_whole_key(capsys, run_dir):
    last = _last_line(capsys, ["fit", "--config", QUICKSTART, D + "loops", "abc"])
    assert last == "looped: error: model.init_args.config.loops: Expected a <class 'int'>. Got value: abc"
    last = _last_line(capsys, ["fit", "--config", QUICKSTART, "--trainer.max_stepz", "3"])
    assert last.startswith("looped: error: unrecognized arguments: --trainer.max_stepz 3")
    last = _last_line(capsys, ["validate", "--config", str(run_dir / "gone.yaml")])
    assert last == f"looped: error: --config: File does not exist: '{run_dir / 'gone.yaml'}'"


def test_a_class_path_that_does_not_import_and_a_bad_schedule_are_named(capsys, run_dir):
    last = _last_line(capsys, ["fit", "--config", QUICKSTART, "--data", "looped.datamodules.Nope"])
    assert last.startswith("looped: error: data.class_path: looped.datamodules has no class 'Nope'")
    last = _last_line(capsys, ["fit", "--config", QUICKSTART, "--model.init_args.warmup_steps", "-5"])
    assert last == "looped: error: model.init_args.warmup_steps must be >= 0, got -5"


def test_a_strategy_class_typed_as_a_flat_value_names_the_class_path_key(capsys, run_dir):
    strategy = "lightning.pytorch.strategies.ModelParallelStrategy"
    last = _last_line(capsys, ["fit", "--config", QUICKSTART, "--trainer.strategy", strategy])
    assert last == (
        f"looped: error: trainer.strategy: '{strategy}' is not a strategy name (auto, ddp, fsdp, ...); a class goes "
        "as --trainer.strategy.class_path CLASS (in a recipe: trainer.strategy: {class_path: CLASS})"
    )


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a machine without GPU"
)
def test_asking_for_a_gpu_without_one_names_the_accelerator(capsys, run_dir):
    last = _last_line(capsys, ["fit", "--config", QUICKSTART, "--trainer.accelerator", "gpu"])
    assert last.startswith("looped: error: trainer.accelerator=gpu, but torch sees no GPU")


def test_unknown_key_in_a_recipe_file_and_yaml_errors_in_a_base(capsys, run_dir):
    (run_dir / "typo.yaml").write_text(f"config: {QUICKSTART}\nmodel:\n  init_args:\n    config:\n      d_modle: 64\n")
    last = _last_line(capsys, ["fit", "--config", str(run_dir / "typo.yaml")])
    assert last.startswith("looped: error: model.init_args: Group 'config' does not accept option 'd_modle'")
    # The malformed file is the base a recipe names with `config:`, and the line names the base.
    (run_dir / "base.yaml").write_text("trainer:\n  max_steps: [1\n")
    (run_dir / "row.yaml").write_text("config: base.yaml\n")
    last = _last_line(capsys, ["fit", "--config", str(run_dir / "row.yaml")])
    assert last.startswith(f"looped: error: {run_dir / 'base.yaml'}:3:1: malformed YAML")


@pytest.mark.parametrize("subcommand", ["run", "test"])
def test_a_malformed_recipe_given_first_is_named_by_its_path(capsys, run_dir, subcommand):
    """``looped run RECIPE`` (and ``test RECIPE``) name the recipe's file, not "the recipe" (issue 34)."""
    (run_dir / "row.yaml").write_text(f"config: {QUICKSTART}\ntrainer:\n  max_steps: [1\n")
    last = _last_line(capsys, [subcommand, str(run_dir / "row.yaml")])
    assert last.startswith(f"looped: error: {run_dir / 'row.yaml'}:4:1: malformed YAML")


def test_unknown_mixer_option_is_named(capsys, run_dir):
    options = '{"sparse": {"widow": 8}}'
    last = _last_line(capsys, ["fit", "--config", QUICKSTART, D + "attention", "sparse", D + "mixer_options", options])
    assert last.startswith("looped: error: model.init_args.config.mixer_options.sparse: ") and "widow" in last


def test_resuming_a_sharded_checkpoint_with_another_model_names_the_fields(capsys, run_dir):
    """FSDP2 checkpoints are folders (torch.distributed.checkpoint's index + Lightning's meta.pt)."""
    folder = run_dir / "last.ckpt"
    folder.mkdir()
    (folder / SHARDED_INDEX).write_bytes(b"")
    config = {"d_model": 128, "n_heads": 4, "block_layers": 1, "loops": 4, "vocab_size": 5}
    torch.save({"hyper_parameters": {"config": config}, "global_step": 7}, folder / SHARDED_META)
    argv = ["fit", "--config", QUICKSTART, D + "loops", "3", D + "block_layers", "2", "--ckpt_path", str(folder)]
    last = _last_line(capsys, argv)
    assert "model.init_args.config.block_layers: 1 → 2; model.init_args.config.loops: 4 → 3" in last


def test_read_checkpoint_names_what_a_file_is_not(tmp_path):
    """Files torch.load refuses for different reasons, each named for what it is (independent of the CLI)."""
    import fractions

    from looped.training.checkpoint import read_checkpoint

    state = {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"config": {"d_model": 8}}}
    torch.save(state, tmp_path / "good.ckpt")
    assert read_checkpoint(tmp_path / "good.ckpt")["hyper_parameters"] == state["hyper_parameters"]
    torch.save({"weights": torch.ones(2)}, tmp_path / "bare.pt")
    torch.save({"state_dict": {}, "x": fractions.Fraction(1, 3)}, tmp_path / "pickled.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:-100])
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")  # the legacy unpickler reads it as bad opcodes
    for name, said in [
        ("bare.pt", "is a torch file but not a Lightning checkpoint"),
        ("pickled.ckpt", "holds Python objects that torch.load(weights_only=True) refuses"),
        ("cut.ckpt", "is truncated or corrupt"),
        ("text.ckpt", "is not a checkpoint: torch.load cannot read it"),
    ]:
        with pytest.raises(InputError, match=rf"^--ckpt_path {tmp_path / name} {re.escape(said)}"):
            read_checkpoint(tmp_path / name)


def test_loops_from_python_raise_input_error_named_like_the_recipe():
    from looped import LoopedConfig

    with pytest.raises(InputError, match=r"^model\.init_args\.config\.loops: must be >= 1, got 0$"):
        LoopedConfig(vocab_size=5, max_seq_len=8, loops=0)


def test_find_input_error_walks_causes_and_contexts():
    inner = InputError("data.hops: too many")
    try:
        try:
            raise inner
        except InputError as err:
            raise ValueError("Does not validate against any of the Union subtypes") from err
    except ValueError as wrapped:
        try:
            raise RuntimeError("while handling") from None
        except RuntimeError:
            pass
        assert find_input_error(wrapped) is inner
    assert find_input_error(ValueError("a bug")) is None


def test_debug_env_shows_the_traceback(capsys, run_dir, monkeypatch):
    monkeypatch.setenv("LOOPED_DEBUG", "1")
    code, _, err = _main(capsys, main, ["fit", "--config", QUICKSTART, D + "loops", "0"])
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].endswith("must be >= 1, got 0")


def test_a_bug_keeps_its_traceback(monkeypatch, run_dir):
    def broken(args):
        raise ZeroDivisionError("a bug, not the user's input")

    monkeypatch.setattr("looped.cli.app.console_cli", broken)
    with pytest.raises(ZeroDivisionError):
        main(["fit", "--config", QUICKSTART])


def test_a_plain_value_error_from_project_code_is_a_bug(monkeypatch, run_dir):
    """Only InputError is the user's: a ValueError raised by our code while jsonargparse builds a class is a bug."""

    def post_init(self):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr("looped.model.LoopedConfig.__post_init__", post_init)
    with pytest.raises(ValueError) as raised:
        main(["fit", "--config", QUICKSTART])
    assert find_input_error(raised.value) is None


def test_tool_usage_errors_and_tool_exits_end_with_the_same_line(capsys, run_dir):
    last = _last_line(capsys, ["report", str(run_dir)])
    assert last.startswith("looped: error: looped report: the following arguments are required: --output")
    last = _last_line(capsys, ["report", str(run_dir / "nothing"), "--output", str(run_dir / "out")])
    assert last == f"looped: error: looped report: {run_dir / 'nothing'} does not exist"
    last = _last_line(capsys, ["nonsense"])
    assert last.startswith("looped: error: ") and "nonsense" in last


def test_lightning_without_recipe_or_sdk_ends_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr("looped.cli.app._lightning_sdk_entry_point", lambda: None)
    assert "lightning run recipes/NAME.yaml" in _last_line(capsys, ["login"], entry=lightning_main)
    assert "needs a recipe" in _last_line(capsys, ["run"], entry=lightning_main)


# -- help --------------------------------------------------------------------------------------------------
def test_looped_help_lists_every_subcommand_on_one_line(capsys):
    from looped.cli import TOOLS

    code, out, _ = _main(capsys, main, ["--help"])
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for name in ["run", "fit", "validate", "test", "predict", *TOOLS]:
        assert name in lines and len(lines[name].split()) > 3, name  # the name and what it does
    assert "the paper's tables and figures from finished runs" in lines["report"]  # from the tool's docstring


@pytest.mark.parametrize("entry, prog", [(main, "looped run"), (lightning_main, "lightning run")])
def test_run_help_shows_usage_recipe_folders_and_how_to_see_options(capsys, entry, prog):
    code, out, _ = _main(capsys, entry, ["run", "--help"])
    assert code == 0
    assert out.startswith(f"usage: {prog} RECIPE.yaml")
    for folder in ("phop/", "addition/", "pile/", "quickstart.yaml"):
        assert folder in out
    assert f"{prog} RECIPE.yaml --help" in out


def test_lightning_help_is_usage(capsys, monkeypatch):
    monkeypatch.setattr("looped.cli.app._lightning_sdk_entry_point", lambda: None)
    code, out, _ = _main(capsys, lightning_main, ["--help"])
    assert code == 0 and out.startswith("usage: lightning run RECIPE.yaml")


def test_run_recipe_help_shows_trainer_model_and_data_options(capsys, run_dir):
    code, out, _ = _main(capsys, main, ["run", QUICKSTART, "--help"])
    assert code == 0
    assert "--trainer.max_steps" in out  # LightningCLI's fit --help
    assert "model: looped.LoopedLM" in out and "--model.config.loops" in out  # the recipe's model class
    assert "data: looped.datamodules.PHop" in out and "--data.hops" in out  # and its data class
