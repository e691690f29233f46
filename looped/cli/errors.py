"""How the console scripts end on a user's mistake: one last line, ``looped: error: <message>``, exit status 2.

``one_line_errors`` wraps everything ``looped`` and ``lightning`` run. What counts as the user's
mistake, and the line printed for it:

* an ``InputError`` — raised by project code, or wrapped by jsonargparse while it built the
  recipe's classes (found by walking the exception chain, ``looped.errors.find_input_error``):
  its message;
* jsonargparse's own parse errors (an unknown key, a value of the wrong type, a missing
  ``--config`` file), which the CLI asks it to raise instead of printing usage: its message,
  on one line, with the key as the user types it (``model.init_args.config.loops``) rebuilt
  from the nested exceptions jsonargparse chains, one per level of the key;
* malformed YAML: ``FILE:LINE:COLUMN: problem``, the file found by re-reading the recipe and
  the files it names with ``config:``;
* Lightning's ``MisconfigurationException`` (a trainer setting this machine cannot run);
* ``SystemExit("message")``, with which the tools stop, and argparse usage errors in the
  tools (``argparse_errors_raise``).

Anything else is a bug and keeps its traceback. ``--debug`` (or ``LOOPED_DEBUG=1``) prints the
traceback of a user's mistake too, above the same last line.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import jsonargparse
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from looped.datamodules.pile import chunk_error
from looped.errors import InputError, exception_chain, find_input_error

PROG = "looped"
# Where the running command looks for a user's modules (looped.cli.user_code), for an import error's line.
searched_folders: list[Path] = []
DEBUG_FLAG = "--debug"
DEBUG_ENV = "LOOPED_DEBUG"


def take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (anywhere before a ``--``), and whether a traceback was asked for."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [a for i, a in enumerate(argv) if i >= end or a != DEBUG_FLAG], debug


@contextlib.contextmanager
def one_line_errors(debug: bool, argv: list[str]) -> Iterator[None]:
    """Turn a user's mistake raised inside into ``looped: error: <message>`` on stderr and exit status 2."""
    try:
        with argparse_errors_raise():
            yield
    except SystemExit as exit_:
        if isinstance(exit_.code, str) and not isinstance(exit_, ErrorExit):  # a tool's SystemExit("message")
            fail(exit_.code)
        if isinstance(exit_, SIGTERMException):  # Lightning's stop after SIGTERM says status 0 ("success")
            # A scheduler or a wrapper script tells a pre-empted run from a finished one by the status: the
            # shell's 128 + SIGTERM. InterruptCheckpoint has printed the command that resumes.
            raise SystemExit(128 + signal.SIGTERM) from exit_
        raise
    except Exception as error:
        message = user_message(error, argv)
        if message is None:
            raise  # a bug: the traceback is what its reader needs
        if debug:
            traceback.print_exc()
        fail(message)


class ErrorExit(SystemExit):
    """Exit status 2 after a user's mistake; ``str()`` is the message (for callers of ``main`` from Python)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> None:
    """Print ``looped: error: <message>`` as the last line on stderr and exit with status 2."""
    message = one_line(message)
    sys.stdout.flush()
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise ErrorExit(message)


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


def user_message(error: BaseException, argv: list[str]) -> str | None:
    """The line to print for ``error`` if the user caused it, else None (a bug)."""
    found = find_input_error(error)
    if found is not None:
        return str(found)
    chain = list(exception_chain(error))
    misconfigured = next((e for e in chain if isinstance(e, MisconfigurationException)), None)
    if misconfigured is not None:
        return str(misconfigured)
    chunk = next((line for line in map(chunk_error, chain) if line), None)
    if chunk is not None:  # litdata could not read a prepared chunk mid-training (lost or cut short)
        return chunk
    strategy = next((m for m in map(_STRATEGY_NAME.search, map(str, chain)) if m), None)
    if strategy is not None:  # Trainer(strategy=...) takes a name or an instance; a class path typed flat is a name
        typed = next((arg for arg in argv if arg.lower() == strategy.group(1)), strategy.group(1))  # Lightning lowers
        return (
            f"trainer.strategy: {typed!r} is not a strategy name (auto, ddp, fsdp, ...); a class goes as "
            f"--trainer.strategy.class_path CLASS (in a recipe: trainer.strategy: {{class_path: CLASS}})"
        )
    if not isinstance(error, argparse.ArgumentError):
        return None
    # jsonargparse reports every exception raised while it checks a value as a parse error;
    # one raised in project code that is not an InputError is a bug, not the user's mistake.
    if any(raised_in_project(e) for e in chain):
        return None
    malformed = next((e for e in chain if isinstance(e, yaml.MarkedYAMLError)), None)
    if malformed is not None:
        return yaml_location(malformed, config_files(argv))
    return jsonargparse_message(chain, argv)


_STRATEGY_NAME = re.compile(r"You selected an invalid strategy name: `strategy='([^']*)'`")
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']*)':\s*(.*)$")
_UNION = "Does not validate against any of the Union subtypes"


def jsonargparse_message(chain: list[BaseException], argv: list[str] = ()) -> str:
    """jsonargparse's innermost message, prefixed with the full key it is about.

    jsonargparse re-raises an error once per level of a nested key, each naming its own level:
    ``Parser key "model"`` → ``Problem with given class_path 'looped.LoopedLM'`` (= ``init_args``)
    → ``Parser key "config.loops"`` → ``Expected a <class 'int'>. Got value: abc``. Joined:
    ``model.init_args.config.loops: Expected a <class 'int'>. Got value: abc``.
    """
    keys: list[str] = []
    leaf = ""
    previous = None
    class_path = None  # the class whose init_args the key is in
    for error in chain:
        text = str(error).strip()
        if text == previous:
            continue  # the same message re-raised by the next layer out
        previous = text
        first = text.splitlines()[0] if text else ""
        if first.startswith(_UNION):
            continue  # its first alternative (the class) is the next exception in the chain
        if match := _PARSER_KEY.match(first):
            keys.append(match.group(1))
            leaf = match.group(2) or leaf
        elif match := _CLASS_PATH.match(first):
            if not _importable(match.group(1)):  # the class itself is the mistake: name the key that names it
                return cannot_import(".".join([*keys, "class_path"]), match.group(1), _cause(text))
            keys.append("init_args")
            class_path = match.group(1)
            leaf = match.group(2) or leaf
        else:
            leaf = text
    key = ".".join(keys)
    if key == "config":
        key = "--config"  # the recipe file itself
    message = one_line(leaf)
    unknown = _unknown_option(message)
    if unknown is not None:
        full = ".".join([*keys, unknown])
        if class_path in _BASE_TYPES and keys:  # jsonargparse names the base type when a file sets init_args alone
            class_path = _class_in_recipes(keys[0], argv) or class_path
        message += did_you_mean(unknown, _accepted_keys(class_path), prefix=f"{key}." if key else "")
        message += _from_base(full, class_path, argv)
        message += "; `looped fit --config RECIPE --help` lists every key"
    return f"{key}: {message}" if key else message


_UNKNOWN = (
    re.compile(r"Option '([^']+)' is not accepted"),
    re.compile(r"Group '([^']+)' does not accept option '([^']+)'"),
    re.compile(r"does not accept option '([^']+)'"),
    re.compile(r"unrecognized arguments: --([^\s=]+)"),
)


_BASE_TYPES = ("lightning.LightningDataModule", "lightning.LightningModule", "lightning.pytorch.LightningDataModule")


def _class_in_recipes(section: str, argv: list[str]) -> str | None:
    """The ``SECTION.class_path`` the recipe files set: the recipe's own, else its nearest base's."""
    for path in config_files(list(argv)):
        found = _value(yaml_or_none(path), [section, "class_path"])
        if isinstance(found, str):
            return found
    return None


def _unknown_option(message: str) -> str | None:
    """The dotted key (below the message's own key) that jsonargparse did not accept, if that is the error."""
    for pattern in _UNKNOWN:
        if match := pattern.search(message):
            return ".".join(match.groups())
    return None


def _accepted_keys(class_path: str | None) -> list[str]:
    """Every dotted key a class takes as ``init_args`` (jsonargparse's view), or the top level of a recipe."""
    if class_path is None:
        from lightning.pytorch import Trainer

        top = ["seed_everything", "trainer", "model", "data", "ckpt_path", "optimizer", "lr_scheduler"]
        return top + [f"trainer.{name}" for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
    module, _, name = class_path.rpartition(".")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(getattr(importlib.import_module(module), name), fail_untyped=False)
    return list(parser.get_defaults().keys())


def _from_base(key: str, class_path: str | None, argv: list[str]) -> str:
    """``; KEY comes from the base recipe FILE ...`` when a recipe's ``config:`` base set ``key`` (in the
    ``init_args`` of another class than ``class_path``) and no recipe given on the command line did."""
    section, init_args, _ = key.partition(".init_args.")
    if not init_args or class_path is None:
        return ""
    given = [Path(p) for p in _given_recipes(argv)]
    if any(_value(yaml_or_none(path), key.split(".")) is not _UNSET for path in given):
        return ""  # the user wrote it
    for path in config_files(list(argv)):
        data = yaml_or_none(path)
        if _value(data, key.split(".")) is _UNSET:
            continue
        base_class = _value(data, [*section.split("."), "class_path"])
        if base_class not in (_UNSET, class_path):
            return (
                f"; {key} comes from the base recipe {path}, written for {section}.class_path {base_class}: "
                f"give {section}.init_args in full beside your {section}.class_path, or inherit a base written "
                "for your class"
            )
    return ""


_UNSET = object()


def _value(data, keys: list[str]):
    """What the YAML mapping ``data`` sets at the dotted ``keys`` (nested, or written as one dotted key), or _UNSET."""
    if not keys:
        return data
    for n in range(len(keys), 0, -1):
        head = ".".join(keys[:n])
        if isinstance(data, dict) and head in data:
            found = _value(data[head], keys[n:])
            if found is not _UNSET:
                return found
    return _UNSET


def yaml_or_none(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _cause(text: str) -> str:
    """jsonargparse's ``Problem with given class_path 'X': <cause>`` without its prefix."""
    return one_line(_CLASS_PATH.sub(r"\2", one_line(text)))


def cannot_import(key: str, class_path: str, cause: str) -> str:
    """The line for a recipe class that does not import: the key, the cause, and the fix — the closest class
    name when the module imports, else where modules were looked for."""
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ImportError:
        module = None
    if module is not None:
        classes = [n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")]
        return f"{key}: {module_name} has no class {name!r}{did_you_mean(name, classes, prefix=module_name + '.')}"
    where = ", ".join(str(folder) for folder in searched_folders) or "the working directory"
    top = class_path.partition(".")[0]
    return (
        f"{key}: cannot import {class_path!r}: {cause}; looked in {where} and the installed packages: run looped "
        f"from the folder that holds {top}/ (or put it beside the recipe), or `pip install -e` its project"
    )


def did_you_mean(wrong: str, valid: list[str], prefix: str = "") -> str:
    """`` (did you mean 'PREFIX+closest'?)`` when one of ``valid`` is close to ``wrong``, else nothing."""
    close = difflib.get_close_matches(wrong, valid, n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _importable(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name) if module else False
    except ImportError:
        return False


def yaml_location(error: yaml.MarkedYAMLError, files: list[Path]) -> str:
    """``FILE:LINE:COLUMN: problem (context)`` for a YAML syntax error; jsonargparse only knows the text it parsed."""
    mark = error.problem_mark
    failing = {path: _yaml_error_of(path) for path in files}
    failing = {path: mark_of for path, mark_of in failing.items() if mark_of is not False}
    # The file that fails where jsonargparse's parser failed (its parser may word the problem differently).
    position = (mark.line, mark.column) if mark is not None else None
    where = next((p for p, at in failing.items() if at == position), next(iter(failing), "the recipe"))
    place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(where)
    context = f" ({error.context})" if error.context else ""
    return f"{place}: malformed YAML: {error.problem}{context}"


def config_files(argv: list[str]) -> list[Path]:
    """The recipe files in ``argv`` — each ``--config FILE``, and the recipe that ``looped run RECIPE`` or
    ``looped test RECIPE`` takes first — and, recursively, the files they name with ``config:``."""
    found: list[Path] = []
    pending = [Path(p) for p in _given_recipes(argv)]
    while pending:
        path = pending.pop(0)
        if path in found or not path.is_file():
            continue
        found.append(path)
        data = yaml_or_none(path)
        bases = data.get("config") if isinstance(data, dict) else None
        for base in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else []:
            pending.append(path.parent / base)
    return found


def _given_recipes(argv: list[str]) -> list[str]:
    """The recipe files named on the command line: each ``--config FILE`` and a recipe given first."""
    given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    given += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return given + (argv[1:2] if len(argv) > 1 and argv[1].endswith((".yaml", ".yml")) else [])


def _yaml_error_of(path: Path) -> tuple[int, int] | None | bool:
    """Where ``path`` fails to parse as YAML (0-based line, column), None if nowhere known, False if it parses."""
    try:
        yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError):
        return False
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        return (mark.line, mark.column) if mark is not None else None
    return False


_PROJECT_DIRS = tuple(
    str(Path(__file__).resolve().parents[1] / folder) + os.sep for folder in ("looped", "datamodules", "callbacks")
)


def raised_in_project(error: BaseException) -> bool:
    """Whether ``error`` was raised by a line of this package (the innermost frame of its traceback)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_PROJECT_DIRS)


@contextlib.contextmanager
def argparse_errors_raise() -> Iterator[None]:
    """argparse usage errors in the tools raise ``InputError`` instead of exiting (argparse: exit status 2).

    A tool (``looped/tools/<name>.py``) parses its own arguments with ``argparse``, whose
    ``error`` prints usage and ``PROG: error: ...`` and exits; here it prints the usage and
    raises, so the last line is ``looped: error: ...`` like every other mistake. jsonargparse
    overrides ``error`` itself and is not affected.
    """

    def error(parser: argparse.ArgumentParser, message: str) -> None:
        parser.print_usage(sys.stderr)
        raise InputError(f"{parser.prog}: {message} (`{parser.prog} --help` lists the options)")

    with mock.patch.object(argparse.ArgumentParser, "error", error):
        yield
