"""``python -m kdfast``: the kdfast command (kdfast.cli)."""

import sys

from kdfast.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it
    sys.exit(main())
