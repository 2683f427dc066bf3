"""Alembic migrations of the feedback store, run by `FeedbackStore` on open (upgrade to head).

Every revision only adds (tables, nullable or defaulted columns); none drops or rewrites data.
"""
