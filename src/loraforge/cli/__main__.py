"""``python -m loraforge.cli``: the same as the ``loraforge`` command."""

from loraforge.cli import main

main()
