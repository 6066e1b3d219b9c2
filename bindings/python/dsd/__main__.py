"""`python -m dsd inspect|verify|convert|diff ...`: dsd's command-line tool (see dsd._cli)."""
import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
