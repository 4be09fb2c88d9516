"""Neural Branching: specialise a frozen parent network with small branch networks."""

__version__ = "0.1.0"
