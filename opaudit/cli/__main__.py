"""``python -m opaudit.cli``: the same as ``opaudit``."""

import sys

from opaudit.cli.main import main

sys.exit(main())
