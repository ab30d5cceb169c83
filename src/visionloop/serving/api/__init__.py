"""The HTTP API, laid out like FastAPI's full-stack template: ``deps.py`` for shared state, one router per
concern under ``routes/`` (predict, feedback, ops, v2), and ``main.py`` putting them together."""
