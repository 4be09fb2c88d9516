"""The studies: compare (a branch against its baselines, with k-shot curves), probe-layers, and
selfeval (judges against max softmax).

Imports: every subpackage but cli.
"""
