"""Reports people read: a run's report.md, report.html and plots, the summary over seeds, and the
tables and figures of compare and selfeval.

Imports: models, acceptance, config and the base modules.
"""
