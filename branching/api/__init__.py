"""The Python API: a trained tree loaded in a notebook or a program, answering as `branching predict` does
(tree: `load`, `fit`, `Tree`, `Answer`).

Imports: studies, train, tree, reports, config, data, acceptance, models and the base modules.
"""

from branching.api.tree import Answer, Prepared, Tree, fit, load

__all__ = ["Answer", "Prepared", "Tree", "fit", "load"]
