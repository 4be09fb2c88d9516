"""The trained tree: its model files (checkpoint), the routed tree (routing) and its evaluation on a test split (evaluation), one node's predictions
and predict's inputs, self-evaluation judges at inference, and the cost and speed models.

Imports: models, acceptance, data, config, reports and the base modules.
"""
