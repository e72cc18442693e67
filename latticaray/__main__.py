"""``python -m latticaray``: the same command line as the ``latticaray`` script."""

import sys

from .cli import main

sys.exit(main())
