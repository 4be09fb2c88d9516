"""`python -m branching`: the same command line as the installed `branching`."""
import sys

from .cli import main

sys.exit(main())
