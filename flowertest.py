"""Evaluate the flower branch on the test split, with its reject option."""
import sys

from branching.cli import test_script

if __name__ == "__main__":
    sys.exit(test_script("flower"))
