"""``python -m cm3_pyg.cli``: the training command (``cm3-pyg train``)."""

import sys

from cm3_pyg.cli.train import main

sys.exit(main())
