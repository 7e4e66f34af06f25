"""``python -m asyncgone``: the same as the ``asyncgone`` command."""

import sys

from ._cli import main

sys.exit(main())
