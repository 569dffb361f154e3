"""``python -m opaudit``: the same as the ``opaudit`` command."""

import sys

from opaudit.cli import main

sys.exit(main())
