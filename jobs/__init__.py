"""Ray jobs: one thin module per job, each a typed config plus a composition of library pieces.

Run one with ``python -m jobs.NAME ...`` (also under ``ray job submit --``) or ``retriever NAME``.
"""
