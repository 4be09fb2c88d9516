"""Train the fish branch on the frozen parent's hidden activations (models/fishnet_2.pt)."""
import sys

from branching.cli import train_script

if __name__ == "__main__":
    sys.exit(train_script("fish"))
