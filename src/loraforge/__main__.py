"""``python -m loraforge``: the ``loraforge`` command."""

from loraforge.cli import main

main()
