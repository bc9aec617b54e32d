"""``python -m sidusctl`` runs the command-line interface."""

from sidusctl.cli.main import main

main()
