"""Alembic's entry point: runs the revisions on the connection `FeedbackStore` hands over.

No ini file, no logging set-up and no URL here: the store owns the engine and the transaction.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
