"""The one exception type for mistakes in what a user typed: a recipe key, a path, a command-line flag.

``looped``'s command line prints an ``InputError`` as one last line, ``looped: error: <message>``,
and exits with status 2, without a traceback (``--debug`` or ``LOOPED_DEBUG=1`` shows it). Its
message names the recipe key as the user types it (``model.init_args.config.d_model``,
``data.hops``) and the fix. Anything else that escapes is a bug and keeps its traceback.

It is a ``ValueError``, so code that catches ``ValueError`` (jsonargparse's argument checks among
it) keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator

MODEL_CONFIG = "model.init_args.config"
"""Where a recipe sets ``LoopedConfig``'s fields: messages name ``model.init_args.config.d_model``."""


class InputError(ValueError):
    """Bad input from the user: the message names the field as the user types it, and the fix."""


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it was raised from (``__cause__``) or during (``__context__``), innermost last.

    jsonargparse wraps an exception raised while it builds a recipe's classes in its own
    (``raise ValueError(...) from error``), once per nesting level; this walks back through them.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def find_input_error(error: BaseException) -> InputError | None:
    """The ``InputError`` that ``error`` is or was raised from (the outermost one), else None."""
    return next((e for e in exception_chain(error) if isinstance(e, InputError)), None)
