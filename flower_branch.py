"""Train the flower branch on the frozen parent's hidden activations (models/flowernet_2.pt)."""
import sys

from branching.cli import train_script

if __name__ == "__main__":
    sys.exit(train_script("flower"))
