"""One router per concern; each module imports on its own (its state comes from ``api/deps.py``)."""
