"""``python -m looped.cli ...`` is the ``looped`` command (``torchrun ... -m looped.cli run RECIPE``)."""

from looped.cli.app import main

main()
