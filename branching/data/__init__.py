"""Data: CIFAR-100's files (and their download), image folders and their cache, text folders and their
encoded vectors, the normalisation fitted on training images, and TreeData, the splits a tree trains and
tests on.

Imports: models (a text parent's transformer encodes texts), acceptance and the base modules.
"""
