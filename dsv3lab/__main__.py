"""``python -m dsv3lab ...`` runs the command line; torchrun launches it as ``torchrun ... -m dsv3lab train ...``."""

import sys

from .cli import main

sys.exit(main())
