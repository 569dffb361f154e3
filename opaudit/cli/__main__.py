"""``python -m opaudit.cli``: the same as ``opaudit``."""

import sys

from opaudit.cli import main

sys.exit(main())
