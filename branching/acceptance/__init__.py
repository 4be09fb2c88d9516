"""Acceptance and its statistics: confidence scores, calibration, selective prediction, the rule that
accepts or rejects (threshold, coverage, risk), a node's test metrics and intervals. NumPy and SciPy
only: nothing here runs a network.

Imports: the base modules (errors, fileio, tables) and models.meta (the model files' schema) only.
"""
