"""Evaluate a branch on the test split, with its reject option: the flower branch, or any branch of
--config with --branch NAME."""
import sys

from branching.cli.main import test_script

if __name__ == "__main__":
    sys.exit(test_script("flower"))
