"""The command line: `branching run | predict | compare | probe-layers | selfeval`, the shared flags
and one-line errors, and the entry points of the original's scripts.

Imports: anything.
"""
