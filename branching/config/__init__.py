"""The tree configuration: the TOML schema (tree), its reader with one-line errors (parse), and the
training recipes.

Imports: models, acceptance, data and the base modules.
"""
