"""``python -m peftkit``: the same as the ``peftkit`` command."""

import sys

from peftkit.cli import main

sys.exit(main())
