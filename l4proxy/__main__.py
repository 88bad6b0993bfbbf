"""``python -m l4proxy`` runs the same command as ``l4proxy``."""

from .cli import main

main()
