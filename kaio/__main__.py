"""``python -m kaio``: the same as the ``kaio`` command."""

from kaio.cli import main

main()
