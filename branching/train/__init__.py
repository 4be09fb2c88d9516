"""Training a tree: the parent and each branch (nodes), the activation cache (features), the judges
of self-evaluation (selfeval), and a whole run that trains, evaluates and writes OUT (run).

Imports: everything below it (models, acceptance, data, config, reports, tree) and the base modules.
"""
