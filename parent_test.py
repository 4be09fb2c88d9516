"""Evaluate the parent on the test split."""
import sys

from branching.cli.main import test_script

if __name__ == "__main__":
    sys.exit(test_script("parent"))
