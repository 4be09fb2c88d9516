"""Data: CIFAR-100's files (and their download), the normalisation fitted on training images, and
TreeData, the splits a tree trains and tests on.

Imports: the base modules only.
"""
