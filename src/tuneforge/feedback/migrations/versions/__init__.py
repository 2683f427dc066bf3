"""The revisions, oldest first: 0001 responses + feedback, 0002 exports, retrain runs, lineage.

A new revision adds; downgrades are refused (they would drop rows): restore a backup instead.
"""
