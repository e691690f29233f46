"""Every code block in README.md and docs/*.md that is meant to run, runs here: an example cannot rot.

A block's language says what it is:

* ``python``: executed, at toy size — a context from ``PYTHON`` first (a tiny model, an exported folder),
  and sizes swapped for toy ones where a block names a cluster's (``TOY``, each swap written out);
* ``bash``: each command, its ``\\`` continuations joined and the block's own variables expanded, is
  checked by what it runs: ``looped run``/``fit``/``lightning run`` resolve the recipe with every
  override (the parser and the recipe's classes, without training), ``looped TOOL`` and ``python
  benchmarks/X.py`` parse their arguments with the tool's own parser (stopped right after parsing;
  ``looped plan`` also resolves its recipe with the overrides it hands on);
  the README's install lines are checked against ``.ci/run`` and the recipe they run;
* ``yaml``: a recipe fragment, resolved on top of the recipe it belongs to (``YAML_BASE``);
* ``text``: output shown to the reader, not run.

Blocks with ``title="PATH"`` (docs/extending.md) are files of a user's package: ``tests/test_extending.py``
writes them out and runs the page, as are that page's other blocks. ``test_every_block_is_checked`` counts
them all, so a new block must say what it is.
"""

import argparse
import contextlib
import os
import re
import runpy
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from conftest import RECIPES, ROOT
from looped.cli import TOOLS, resolve_recipe
from looped.tools.plan import parse_args as plan_arguments

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.S | re.M)
DELEGATED = {"docs/extending.md": "tests/test_extending.py"}  # pages run as a whole by their own test


def blocks() -> list[tuple[str, int, str, str, str]]:
    """``(page, line, language, info, code)`` of every fenced block."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((str(path.relative_to(ROOT)), line, match.group(1), match.group(2).strip(), match.group(3)))
    return found


def of(language: str) -> list:
    return [
        pytest.param(page, code, id=f"{page}:{line}")
        for page, line, lang, _, code in blocks()
        if lang == language and page not in DELEGATED
    ]


def test_every_block_is_checked():
    """Each block is python, bash, yaml (run or resolved here or in its page's test) or text (output)."""
    kinds = {}
    for page, line, language, _, _ in blocks():
        assert language in ("python", "bash", "yaml", "text"), f"{page}:{line}: say what the block is (```text ...)"
        kinds[language] = kinds.get(language, 0) + 1
    assert kinds["python"] >= 6 and kinds["bash"] >= 15 and kinds["yaml"] >= 3  # the pages' examples are found


# -- bash ---------------------------------------------------------------------------------------------------------


def commands(code: str) -> list[list[str]]:
    """The block's commands as argv lists: continuations joined, comments dropped, its variables expanded."""
    code = re.sub(r"\\\n\s*", " ", code)
    variables: dict[str, str] = {}
    found = []
    for statement in re.split(r"\n(?=\S)", code):
        if statement.lstrip().startswith("#"):
            continue
        if assignment := re.match(r'^(\w+)="(.*)"$', statement.strip(), re.S):
            variables[assignment.group(1)] = " ".join(assignment.group(2).split())
            continue
        statement = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], statement)
        for part in statement.split("&&"):
            argv = shlex.split(part, comments=True)
            argv = argv[: argv.index(">")] if ">" in argv else argv
            if argv:
                found.append(argv)
    return found


class Parsed(Exception):
    """Raised by the patched ``parse_args``: the command's arguments were accepted; nothing more runs."""


@contextlib.contextmanager
def stop_after_parsing():
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        yield


def without_launcher(argv: list[str]) -> list[str]:
    """``looped ...`` as the command a launcher (``srun``, ``torchrun -m looped.cli``) or a venv path starts."""
    if argv[0] == "srun":
        argv = argv[1:]
    if argv[0] == "torchrun":
        argv = ["looped", *argv[argv.index("looped.cli") + 1 :]]
    return [Path(argv[0]).name if argv[0].endswith(("/looped", "/lightning")) else argv[0], *argv[1:]]


def check_command(argv: list[str]) -> str:
    """Check one documented command by what it runs; return what was checked (the test's record)."""
    argv = without_launcher(argv)
    program, args = argv[0], argv[1:]
    if program in ("python3", "python") and args[:2] == ["-m", "venv"]:
        return "venv"
    if program.endswith(("pip", "ruff")):
        return program
    if program.endswith("pytest"):
        return "pytest"
    if program in ("python", "python3") and args[0].startswith("benchmarks/"):
        script = ROOT / args[0]
        path = [str(script.parent), *sys.path]  # as `python SCRIPT` sees it: the script's neighbours importable
        with stop_after_parsing(), mock.patch.object(sys, "argv", args), mock.patch.object(sys, "path", path):
            with pytest.raises(Parsed):
                runpy.run_path(str(script), run_name="__main__")
        return "parsed"
    assert program in ("looped", "lightning"), f"unknown program {program!r}"
    if args[0] == "run" or args[0] == "fit":
        recipe, overrides = (args[1], args[2:]) if args[0] == "run" else (args[2], args[3:])
        if "--ckpt_path" in overrides:  # a checkpoint of a run these docs describe; checked by the resume tests
            at = overrides.index("--ckpt_path")
            overrides = overrides[:at] + overrides[at + 2 :]
        overrides = [a for a in overrides if a != "--print_config"]
        assert "class_path" in resolve_recipe(str(ROOT / recipe), *overrides)
        return "resolved"
    assert args[0] in TOOLS, f"looped {args[0]} is not a subcommand"
    if args[0] == "plan":  # its own flags, then the recipe with the overrides it hands on (as fit would take them)
        options, overrides = plan_arguments(args[1:])
        assert "class_path" in resolve_recipe(str(ROOT / options.recipe), *overrides)
        return "resolved"
    tool = __import__(TOOLS[args[0]], fromlist=["main"])
    with stop_after_parsing(), mock.patch.object(sys, "argv", ["looped", *args]), pytest.raises(Parsed):
        tool.main(args[1:])
    return "parsed"


@pytest.mark.parametrize(("page", "code"), of("bash"))
def test_bash_block(page, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    checked = [check_command(argv) for argv in commands(code)]
    assert checked and all(checked)
    if "pytest" in checked:  # the README's test command is what CI runs, word for word
        assert code.strip() in (ROOT / ".ci" / "run").read_text()


def test_commands_expand_continuations_variables_and_launchers():
    """The splitter the bash blocks go through (a wrong split would check a different command)."""
    code = 'V="--a 1\n  --b 2"\nlooped run r.yaml $V  # note\ntorchrun --nnodes 2 -m looped.cli run r.yaml \\\n  --c 3'
    assert [without_launcher(c) for c in commands(code)] == [
        ["looped", "run", "r.yaml", "--a", "1", "--b", "2"],
        ["looped", "run", "r.yaml", "--c", "3"],
    ]


def test_a_command_the_tool_refuses_fails_the_check(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):  # argparse's usage error
        check_command(["looped", "report", "runs", "--output", "out", "--no-such-flag"])
    with pytest.raises(ValueError, match="did you mean 'data.init_args.hops'"):
        check_command(["looped", "plan", "recipes/quickstart.yaml", "--data.hopz", "4"])
    with pytest.raises(ValueError, match="does not resolve"):
        check_command(["looped", "run", "recipes/quickstart.yaml", "--data.hopz", "4"])


# -- yaml ---------------------------------------------------------------------------------------------------------

# The recipe a page's fragments belong to (the page's subject); the quickstart elsewhere.
YAML_BASE = {"docs/pile_fsdp.md": RECIPES / "pile_1b_4x6.yaml"}


@pytest.mark.parametrize(("page", "code"), of("yaml"))
def test_yaml_block_resolves_on_its_recipe(page, code, tmp_path):
    fragment = yaml.safe_load(code)
    base = YAML_BASE.get(page, RECIPES / "quickstart.yaml")
    if "config" in fragment:  # a row of its own: its base is named relative to recipes/
        base = RECIPES / fragment.pop("config")
    recipe = tmp_path / "fragment.yaml"
    recipe.write_text(yaml.safe_dump({"config": str(base), **fragment}))
    resolved = yaml.safe_load(resolve_recipe(str(recipe)))
    for key, value in fragment.items():  # every key the fragment sets is in the resolved run
        assert key.split(".")[0] in resolved and value is not None


# -- python -------------------------------------------------------------------------------------------------------


def tiny_phop_export(out: Path, length: int, hops: int) -> None:
    """A small random (2⊗2) model on p-hop's tokens, exported the way `looped export hf` writes a run."""
    from test_hf import fake_run

    from looped import LoopedConfig, LoopedLM
    from looped.datamodules import PHop
    from looped.tools.export import export_hf

    data = PHop(length=length, hops=hops)
    config = LoopedConfig(
        vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_heads=2, d_ff=64, block_layers=2, loops=2
    )
    checkpoint = fake_run(out.parent, LoopedLM(config), [0.5, 0.5, 0.5, 0.5])
    export_hf(str(checkpoint), str(out))


def decoding_context(tmp_path: Path) -> dict:
    from looped import LoopedConfig, LoopedTransformer
    from looped.model.cache import DecodeCache

    model = LoopedTransformer(LoopedConfig(vocab_size=11, max_seq_len=64, d_model=16, n_heads=2, d_ff=32))
    prompt, next_ids = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 1))
    return {"model": model, "prompt": prompt, "next_ids": next_ids, "DecodeCache": DecodeCache}


def speculative_context(tmp_path: Path) -> dict:
    """``model``: a transformers ``LoopedForCausalLM`` of a tiny (2⊗3); ``prompt``/``input_ids``: one prompt."""
    from looped import LoopedConfig, LoopedTransformer
    from looped.hf.modeling import from_looped

    config = LoopedConfig(vocab_size=11, max_seq_len=96, d_model=16, n_heads=2, d_ff=32, block_layers=2, loops=3)
    prompt = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(0))
    return {"model": from_looped(LoopedTransformer(config)).eval(), "prompt": prompt, "input_ids": prompt}


def fsdp_context(tmp_path: Path) -> dict:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from looped import LoopedConfig, LoopedLM
    from looped.datamodules import PHop
    from looped.training.module import transformer_on_meta

    data = PHop(length=8, hops=2, batch_size=4, val_size=8, test_size=8)
    config = LoopedConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=16, n_heads=2, d_ff=32)
    names = {"L": L, "ModelParallelStrategy": ModelParallelStrategy, "transformer_on_meta": transformer_on_meta}
    return {**names, "LoopedLM": LoopedLM, "config": config, "data": data}


# Context a block reads but does not define, by the block's first line; made in the block's working directory.
PYTHON = {
    "out = model.eval().generate(": decoding_context,
    "import looped  # any looped import": lambda tmp: tiny_phop_export(tmp / "out", length=8, hops=2) or {},
    "import torch, looped.datamodules": lambda tmp: tiny_phop_export(tmp / "out", length=32, hops=3) or {},
    "trainer = L.Trainer(strategy=ModelParallelStrategy()": fsdp_context,
    "model.model.generate(prompt, 64, draft_loops=2": speculative_context,
}
# Sizes swapped for toy ones: (block's first line, what the page says, what runs here).
TOY = [
    ("import torch, looped.datamodules", "test_size=2048", "test_size=64"),
    (
        "trainer = L.Trainer(strategy=ModelParallelStrategy()",
        'devices=8, num_nodes=4, precision="bf16-mixed"',
        'devices=1, num_nodes=1, precision="32-true", max_steps=2, logger=False, enable_checkpointing=False, '
        "limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False",
    ),
]
# After a block that only defines something, the call that shows the definition works.
THEN = {
    "import torch.nn.functional as F": (
        "from looped import LoopedConfig\n"
        "m = WeightedLM(LoopedConfig(vocab_size=11, max_seq_len=8, d_model=16, n_heads=2, d_ff=32))\n"
        "labels = torch.full((2, 8), -100); labels[:, -1] = 3\n"
        "assert torch.isfinite(m.compute_loss(torch.randn(2, 8, 11), labels))\n"
    ),
}


def first_line(code: str) -> str:
    return code.strip().splitlines()[0]


@pytest.mark.parametrize(("page", "code"), of("python"))
def test_python_block_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = first_line(code)
    for start, page_says, toy in TOY:
        if line.startswith(start):
            assert page_says in code, f"{page}: the toy swap {page_says!r} no longer matches the block"
            code = code.replace(page_says, toy)
    context = next((make for start, make in PYTHON.items() if line.startswith(start)), lambda tmp: {})
    namespace = {"__name__": "__docs__", **context(tmp_path)}
    then = next((check for start, check in THEN.items() if line.startswith(start)), "")
    with mock.patch.dict(os.environ, {"TOKENIZERS_PARALLELISM": "false"}):
        exec(compile(code + "\n" + then, f"{page}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code


def test_every_context_and_swap_is_used():
    """A renamed or rewritten block must not leave its context or toy swap silently unused."""
    firsts = [first_line(code) for _, _, language, _, code in blocks() if language == "python"]
    for start in [*PYTHON, *THEN, *(swap[0] for swap in TOY)]:
        assert any(line.startswith(start) for line in firsts), start
