"""A user's own package: where the command line finds it, and its mistakes as one line.

A recipe may name any importable class (``data: {class_path: mypkg.Parity}``). ``looped`` finds
modules the way ``python -m`` finds a script's neighbours, so a package next to where it runs
needs no install and no ``PYTHONPATH``: the working directory first, then the folder of each
recipe file it reads (the recipe and its ``config:`` bases), then the installed packages. When an
import still fails, the error lists the folders it looked in.

A ``ValueError`` or ``TypeError`` that the user's own class raises while the recipe builds it (a
task's argument check, say) is the user's mistake, not a bug in this package: ``user_class_error``
turns it into one line naming the recipe key and the class; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from looped.cli.errors import config_files, raised_in_project, searched_folders


def search_folders(argv: list[str]) -> list[Path]:
    """Where ``looped`` looks for a user's modules before the installed packages, in order."""
    folders = [Path.cwd()] + [path.resolve().parent for path in config_files(argv)]
    return list(dict.fromkeys(folders))


@contextlib.contextmanager
def user_code_importable(argv: list[str]) -> Iterator[None]:
    """Put ``search_folders(argv)`` first on ``sys.path`` for the command's lifetime (``python -m`` does the same
    with the working directory); restored afterwards, so an in-process caller's path is left as it was."""
    searched_folders[:] = search_folders(argv)  # also named by an import error's line
    saved = list(sys.path)
    sys.path[:0] = [str(folder) for folder in searched_folders if str(folder) not in sys.path]
    try:
        yield
    finally:
        sys.path[:] = saved


def _frames(tb: TracebackType | None) -> Iterator:
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def user_class_error(chain: list[BaseException], named: dict[type, str]) -> str | None:
    """One line for a ``ValueError``/``TypeError`` raised in the ``__init__`` of a user's class, else None.

    ``chain`` is the exception and what it was raised from (innermost last); ``named`` maps the classes the
    recipe names to their keys (``data``, ``model``, ``trainer.callbacks``). The innermost exception is the
    user's when the ``__init__`` of a named class defined outside this package is on its traceback (the user's
    check, or a library the user's code called with a bad value); one whose last frame is in this package
    is a bug here and keeps its traceback.
    """
    innermost = chain[-1]
    if not isinstance(innermost, (ValueError, TypeError)):
        return None
    if innermost.__traceback__ is None or raised_in_project(innermost):
        return None
    for frame in _frames(innermost.__traceback__):
        cls = type(frame.f_locals.get("self"))
        if frame.f_code.co_name == "__init__" and cls in named and not cls.__module__.startswith("looped"):
            return f"{named[cls]} ({cls.__module__}.{cls.__qualname__}): {type(innermost).__name__}: {innermost}"
    return None
