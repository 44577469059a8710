"""Make ``peftkit_bitfit`` importable when the tests run from the source folder without ``pip install``.

Installed (``pip install .``), the installed package is used; otherwise the source next to this folder.
"""

import sys
from pathlib import Path

try:
    import peftkit_bitfit  # noqa: F401
except ImportError:
    sys.path.append(str(Path(__file__).resolve().parents[1]))
