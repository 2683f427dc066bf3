"""Data layer: read files (formats), render chat templates (templates), tokenise and batch (pipeline).

Import the submodules directly; this package re-exports nothing so that `formats` stays torch-free.
"""
