"""``python -m snapfmt`` runs the command line."""

from snapfmt.cli import main

main()
