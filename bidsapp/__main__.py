"""``python -m bidsapp`` is the ``brainage`` command."""

from .cli.run import main

main()
