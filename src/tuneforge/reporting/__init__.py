"""What a run shows a person: report.html, plots, TensorBoard events, terminal tables.

Numbers come from evaluation and the run directory; nothing here trains or evaluates.
"""
