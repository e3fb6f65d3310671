"""``python -m cm3_pyg``: the same as the ``cm3-pyg`` command."""

import sys

from cm3_pyg.cli.app import main

sys.exit(main())
