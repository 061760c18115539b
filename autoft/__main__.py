"""``python -m autoft``: the ``autoft`` command, for environments without its script on PATH."""

from autoft.cli import main

main()
