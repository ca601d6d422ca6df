"""``python -m ticketlock``: see ``python -m ticketlock --help``."""

import sys

from ._cli import main

sys.exit(main())
