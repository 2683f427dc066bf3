"""Training: optimiser and schedules (optim), the loop (loop), run-directory files (rundir).

The recipe (recipe.py) wires config, data, model and method into one run.
"""
