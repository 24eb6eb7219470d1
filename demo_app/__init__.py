"""A small ledger service built on ``middleware_sessions``.

Run it with ``python -m demo_app`` (or ``uvicorn demo_app.main:app``); see
``demo_app/README.md`` for a curl walkthrough.
"""
