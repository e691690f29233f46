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
import importlib
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

from looped.errors import InputError, exception_chain, find_input_error

PROG = "looped"
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
    if not isinstance(error, argparse.ArgumentError):
        return None
    # jsonargparse reports every exception raised while it checks a value as a parse error;
    # one raised in project code that is not an InputError is a bug, not the user's mistake.
    if any(_raised_in_project(e) for e in chain):
        return None
    malformed = next((e for e in chain if isinstance(e, yaml.MarkedYAMLError)), None)
    if malformed is not None:
        return yaml_location(malformed, config_files(argv))
    return jsonargparse_message(chain)


_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']*)':\s*(.*)$")
_UNION = "Does not validate against any of the Union subtypes"


def jsonargparse_message(chain: list[BaseException]) -> str:
    """jsonargparse's innermost message, prefixed with the full key it is about.

    jsonargparse re-raises an error once per level of a nested key, each naming its own level:
    ``Parser key "model"`` → ``Problem with given class_path 'looped.LoopedLM'`` (= ``init_args``)
    → ``Parser key "config.loops"`` → ``Expected a <class 'int'>. Got value: abc``. Joined:
    ``model.init_args.config.loops: Expected a <class 'int'>. Got value: abc``.
    """
    keys: list[str] = []
    leaf = ""
    previous = None
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
                return f"{'.'.join(keys) or 'class_path'}: cannot import {match.group(1)!r} ({one_line(text)})"
            keys.append("init_args")
            leaf = match.group(2) or leaf
        else:
            leaf = text
    key = ".".join(keys)
    if key == "config":
        key = "--config"  # the recipe file itself
    message = one_line(leaf)
    if "unrecognized arguments" in message or "does not accept option" in message:
        message += "; `looped fit --config RECIPE --help` lists every key"
    return f"{key}: {message}" if key else message


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
    given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    given += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    given += argv[1:2] if len(argv) > 1 and argv[1].endswith((".yaml", ".yml")) else []
    found: list[Path] = []
    pending = [Path(p) for p in given]
    while pending:
        path = pending.pop(0)
        if path in found or not path.is_file():
            continue
        found.append(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        bases = data.get("config") if isinstance(data, dict) else None
        for base in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else []:
            pending.append(path.parent / base)
    return found


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


def _raised_in_project(error: BaseException) -> bool:
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
