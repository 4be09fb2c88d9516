"""Train the parent network (models/parent_2.pt, parent_X_mean.npy, parent_X_std.npy)."""
import sys

from branching.cli.main import train_script

if __name__ == "__main__":
    sys.exit(train_script("parent"))
