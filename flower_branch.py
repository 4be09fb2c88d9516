"""Train a branch on the frozen parent's hidden activations: the flower branch (models/flowernet_2.pt), or
any branch of --config with --branch NAME (models/NAMEnet_2.pt)."""
import sys

from branching.cli.main import train_script

if __name__ == "__main__":
    sys.exit(train_script("flower"))
