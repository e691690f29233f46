"""The one exception type for mistakes in what a user typed: a recipe key, a path, a command-line flag.

``looped``'s command line prints an ``InputError`` as one last line, ``looped: error: <message>``,
and exits with status 2, without a traceback (``--debug`` or ``LOOPED_DEBUG=1`` shows it). Its
message names the recipe key as the user types it (``model.init_args.config.d_model``,
``data.hops``) and the fix. Anything else that escapes is a bug and keeps its traceback.

It is a ``ValueError``, so code that catches ``ValueError`` (jsonargparse's argument checks among
it) keeps working.
"""


class InputError(ValueError):
    """Bad input from the user: the message names the field as the user types it, and the fix."""
