"""Monitoring production traffic: the prediction store, reference profiles, drift tests, the monitor, the report.

Serving imports only ``store``, ``stats`` and ``schema`` from here (no scipy, no torch); the drift tests
(``drift``), the monitor service (``monitor``) and the report (``report``) run in the monitor's process.
"""
