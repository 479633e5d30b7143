"""``python -m kdfast``: the kdfast command (kdfast.cli)."""

import sys

from kdfast.cli import main

sys.exit(main())
