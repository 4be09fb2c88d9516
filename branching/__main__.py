"""`python -m branching`: the same command line as the installed `branching`."""
import sys

from branching.cli.main import main

sys.exit(main())
