"""``python -m shared_core``: the state server and its helpers."""

import sys

from ._cli import main

sys.exit(main())
