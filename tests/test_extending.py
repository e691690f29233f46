"""A researcher's own package, as docs/extending.md builds it: found, trained, loaded, and its mistakes in one line.

The files are the page's own code blocks (each ```python title="PATH"```), written into a temporary folder
outside this repository, and the commands are the page's; the installed console script runs them, with no
``PYTHONPATH``. So the page is what a new user can follow, and it cannot drift from the code.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, console_script
from looped import LoopedConfig, LoopedLM
from looped.cli import LoopedCLI, resolve_recipe
from looped.cli.errors import _from_base

DOC = ROOT / "docs" / "extending.md"
BLOCK = re.compile(r"^```(\w+)(?: title=\"([^\"]+)\")?\n(.*?)^```", re.S | re.M)
QUICK = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
SMALL = ["--data.init_args.val_size", "64", "--data.init_args.test_size", "64"]


def doc_blocks() -> list[tuple[str, str | None, str]]:
    """``(language, title, code)`` of every fenced block of docs/extending.md, in order."""
    return BLOCK.findall(DOC.read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """``myproject/`` with the page's files, outside the repository."""
    root = tmp_path_factory.mktemp("myproject")
    assert not root.resolve().is_relative_to(ROOT)
    for _, title, code in doc_blocks():
        if title:
            (root / title).parent.mkdir(parents=True, exist_ok=True)
            (root / title).write_text(code)
    assert {"mypkg/sort.py", "mypkg/smoothed.py", "mypkg/callbacks.py", "recipes/sort.yaml"} <= {
        str(p.relative_to(root)) for p in root.rglob("*.*")
    }
    return root


def looped(args: list[str], cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    """The installed ``looped`` as a user runs it: no PYTHONPATH, so only the documented search finds mypkg."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOOPED_DEBUG")}
    extra = ["--debug"] if debug else []
    return subprocess.run(
        [console_script("looped"), *args, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def mypkg(project, monkeypatch):
    monkeypatch.syspath_prepend(str(project))
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, name)
    import mypkg

    return mypkg


def test_the_task_labels_the_sorted_digits_as_a_slow_loop_computes_them(mypkg):
    task = mypkg.Sort(length=6, val_size=16, test_size=16)
    input_ids, labels = task.generate(np.random.default_rng(0), 50)
    assert input_ids.shape == labels.shape == (50, 12)
    for row, label in zip(input_ids.tolist(), labels.tolist()):
        digits, written = row[:6], row[7:]
        assert row[6] == 10 and written == sorted(digits)[:-1]  # "=", then the answer so far
        assert label == [-100] * 6 + sorted(digits)
    assert len({tuple(r) for r in input_ids.tolist()}) == 50  # not one sample repeated


def test_the_recipe_resolves_from_its_own_folder_with_the_users_classes(project, monkeypatch):
    """``resolve_recipe`` (what the golden tests use) finds mypkg in the working directory, as the command line does."""
    monkeypatch.chdir(project)
    text = resolve_recipe(str(project / "recipes" / "sort.yaml"))
    assert "class_path: mypkg.SmoothedLM" in text and "label_smoothing: 0.1" in text and "length: 8" in text


def test_the_cli_class_finds_the_package_as_the_command_line_does(project, monkeypatch):
    """``LoopedCLI`` itself searches (so ``pytest`` and ``python -m pytest`` agree on a recipe naming mypkg),
    and leaves ``sys.path`` as it found it."""
    monkeypatch.chdir(project)
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, name)
    path = list(sys.path)
    cli = LoopedCLI(args=["--config", "recipes/sort.yaml", "--trainer.logger", "false"], run=False)
    assert type(cli.datamodule).__module__ == "mypkg.sort" and type(cli.model).__name__ == "SmoothedLM"
    assert sys.path == path


@pytest.mark.slow
def test_a_new_user_trains_loads_and_reads_every_loop_from_their_own_package(project):
    result = looped(["run", "recipes/sort.yaml", *QUICK, *SMALL], cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"loop1 +loop2 +loop3 +loop4\* +loop5", result.stdout)  # the test table, every loop
    (snippet,) = [code for language, title, code in doc_blocks() if language == "python" and not title]
    snippet = snippet.replace("test_size=256", "test_size=64")  # the test set this run was tested on
    loaded = subprocess.run([sys.executable, "-c", snippet], cwd=project, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    lines = loaded.stdout.splitlines()
    assert lines[0] == "label_smoothing 0.1"
    assert [line.split(":")[0] for line in lines[1:]] == [f"loop {n}" for n in range(1, 9)]


@pytest.mark.slow
def test_mistakes_in_a_users_package_are_one_line_naming_the_key(project, tmp_path):
    recipe = str(project / "recipes" / "sort.yaml")
    # A plain ValueError from the user's __init__: the key and the class, no traceback (it is there with --debug).
    args = ["fit", "--config", recipe, "--model.init_args.label_smoothing", "-1", "--trainer.fast_dev_run", "true"]
    result = looped(args, cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result) == (
        "looped: error: model (mypkg.smoothed.SmoothedLM): ValueError: label_smoothing must be in [0, 1), got -1.0"
    )
    assert "Traceback" in looped(args, cwd=project, debug=True).stderr
    # A misspelled key: the closest one.
    result = looped(["fit", "--config", recipe, "--data.init_args.lenght", "4"], cwd=project)
    assert result.returncode == 2
    assert "Option 'lenght' is not accepted (did you mean 'data.init_args.length'?)" in last_line(result)
    # Run from elsewhere: mypkg is neither in the working directory nor beside the recipe; where it looked.
    result = looped(["fit", "--config", recipe, "--print_config"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = last_line(result)
    assert line.startswith("looped: error: model.class_path: cannot import 'mypkg.SmoothedLM': No module named 'mypkg'")
    assert f"looked in {tmp_path}, {project / 'recipes'} and the installed packages" in line
    # A recipe beside the package is found from anywhere (its folder is searched).
    (project / "beside.yaml").write_text("config: recipes/sort.yaml\n")
    result = looped(["fit", "--config", str(project / "beside.yaml"), "--print_config"], cwd=tmp_path)
    assert result.returncode == 0 and "class_path: mypkg.Sort" in result.stdout


def test_a_class_in_a_module_that_has_not_it_names_the_closest_class(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "quickstart.yaml"
    with pytest.raises(ValueError) as error:
        resolve_recipe(str(recipe), "--data", "looped.datamodules.Addition")
    message = str(error.value)
    assert message == (
        f"{recipe} does not resolve: data.class_path: looped.datamodules has no class 'Addition' "
        "(did you mean 'looped.datamodules.NaryAddition'?)"
    )


def test_the_golden_update_tool_gets_the_cause_not_a_usage_dump(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "row.yaml").write_text(
        f"config: {ROOT / 'recipes' / 'quickstart.yaml'}\ndata:\n  init_args:\n    hop: 2\n"
    )
    with pytest.raises(ValueError) as error:
        resolve_recipe(str(tmp_path / "row.yaml"))
    message = str(error.value)
    assert "\n" not in message and "usage:" not in message
    assert "data.init_args: Option 'hop' is not accepted (did you mean 'data.init_args.hops'?)" in message


def test_an_argument_inherited_from_a_base_written_for_another_class_is_said_to_come_from_it(tmp_path):
    """When a base recipe's init_args reach a class it was not written for, the line names the base."""
    base = tmp_path / "base.yaml"
    base.write_text("data:\n  class_path: looped.datamodules.PHop\n  init_args:\n    hops: 3\n")
    row = tmp_path / "row.yaml"
    row.write_text("config: base.yaml\ndata:\n  class_path: mypkg.Sort\n")
    said = _from_base("data.init_args.hops", "mypkg.Sort", ["fit", "--config", str(row)])
    assert said.startswith(f"; data.init_args.hops comes from the base recipe {base}, written for ")
    assert "data.class_path looped.datamodules.PHop" in said
    assert _from_base("data.init_args.length", "mypkg.Sort", ["fit", "--config", str(row)]) == ""  # not set
    row.write_text("config: base.yaml\ndata:\n  init_args:\n    hops: 3\n")  # the user's own file sets it
    assert _from_base("data.init_args.hops", "mypkg.Sort", ["fit", "--config", str(row)]) == ""


class AnswerWeighted(LoopedLM):
    """A subclass with arguments of its own: a number, a list, and a callable (not saved)."""

    def __init__(self, answer_weight: float = 2.0, positions: tuple = (0,), scorer=len, **kwargs) -> None:
        super().__init__(**kwargs)
        self.answer_weight, self.positions, self.scorer = answer_weight, list(positions), scorer


def test_a_subclass_comes_back_from_its_checkpoint_with_its_own_arguments(tmp_path):
    module = AnswerWeighted(answer_weight=0.25, positions=[3, 4], scorer=max, config=LoopedConfig(**TINY))
    assert module.hparams["answer_weight"] == 0.25 and "scorer" not in module.hparams
    path = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": "2"},
        path,
    )
    loaded = AnswerWeighted.load_from_checkpoint(path)
    assert type(loaded) is AnswerWeighted
    assert loaded.answer_weight == 0.25 and loaded.positions == [3, 4] and loaded.scorer is len  # the default
    assert loaded.config == module.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.state_dict().values()))
    # LoopedLM's own hyper-parameters are unchanged by the mechanism (saved runs stay byte-identical).
    assert set(LoopedLM(LoopedConfig(**TINY)).hparams) == set(module.hparams) - {"answer_weight", "positions"}


@pytest.mark.slow
def test_looped_new_task_writes_a_skeleton_whose_own_test_passes(tmp_path):
    (command,) = [code for language, _, code in doc_blocks() if language == "bash" and " new task " in code]
    argv = command.split()
    assert argv[:3] == ["looped", "new", "task"]
    result = looped(argv[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*")}
    assert written == {"mypkg/__init__.py", "mypkg/reverse.py", "recipes/_base.yaml", "recipes/reverse.yaml"} | {
        "tests/test_reverse.py"
    }
    own = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_reverse.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert own.returncode == 0 and "2 passed" in own.stdout, own.stdout[-2000:]
    again = looped(argv[1:], cwd=tmp_path)  # nothing is overwritten
    assert again.returncode == 2 and "already exist; nothing written" in last_line(again)
    bad = looped(["new", "task", "My-Task", "--package", "mypkg"], cwd=tmp_path)
    assert last_line(bad) == "looped: error: NAME: 'My-Task' is not a lower-case Python module name; e.g. my_task"
