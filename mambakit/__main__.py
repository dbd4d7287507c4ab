"""``python -m mambakit``: the same command line as the ``mambakit`` script."""
import sys

from mambakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
