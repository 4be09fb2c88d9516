"""Neural Branching: specialise a frozen parent network with small branch networks.

    import branching
    tree = branching.load("runs/c6")     # a trained tree (branching.api.tree)
    tree.predict(["a.jpg"])
"""

__version__ = "0.1.0"

_API = ("load", "fit", "Tree", "Answer")
__all__ = ["__version__", *_API]


def __getattr__(name):  # the API is imported on first use: `python -m branching` and light modules stay light
    if name in _API:
        import branching.api.tree
        return getattr(branching.api.tree, name)
    raise AttributeError(f"module 'branching' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
